"""The routing cost model (gateway.routing_cost.plan_route), a pure function: every rule and its boundaries,
then random pools checked against the rules."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.routing_cost import (
    Candidate,
    PoolSnapshot,
    Route,
    RoutePlan,
    RoutingConfig,
    choose_transport,
    plan_route,
)
from kvmesh.mesh.workers import WorkerInfo, WorkerLoad, WorkerRole

BLOCK = 16
CONFIG = RoutingConfig(disagg_min_tokens=256)


def worker(
    worker_id: str,
    role: WorkerRole = WorkerRole.DECODE,
    *,
    num_blocks_free: int = 10,
    host_id: str = "host-a",
    transports: tuple[str, ...] = ("shm", "grpc"),
    fingerprint: str = "model-a",
    block_size: int = BLOCK,
) -> WorkerInfo:
    return WorkerInfo(
        worker_id=worker_id,
        role=role,
        address=f"127.0.0.1:{9000 + int(worker_id[1:])}",
        block_size=block_size,
        host_id=host_id,
        transports=transports,
        load=WorkerLoad(0, 0, num_blocks_free, 100),
        model_fingerprint=fingerprint,
    )


def decode(worker_id: str, load: int = 0, **kwargs: object) -> Candidate:
    return Candidate(worker(worker_id, WorkerRole.DECODE, **kwargs), load)  # type: ignore[arg-type]


def prefill(worker_id: str, load: int = 0, **kwargs: object) -> Candidate:
    return Candidate(worker(worker_id, WorkerRole.PREFILL, **kwargs), load)  # type: ignore[arg-type]


def snapshot(*candidates: Candidate, block_size: int = BLOCK) -> PoolSnapshot:
    return PoolSnapshot(
        decode=tuple(c for c in candidates if c.worker.role == WorkerRole.DECODE),
        prefill=tuple(c for c in candidates if c.worker.role == WorkerRole.PREFILL),
        block_size=block_size,
    )


def plan(
    pool: PoolSnapshot,
    num_tokens: int,
    cached: Mapping[str, int] | None = None,
    config: RoutingConfig = CONFIG,
    exclude: frozenset[str] = frozenset(),
) -> RoutePlan:
    result = plan_route(pool, cached or {}, num_tokens, config, exclude)
    assert result is not None
    return result


def ids(result: RoutePlan) -> tuple[str, str | None]:
    route = result.route
    return route.decode_worker.worker_id, route.prefill_worker.worker_id if route.prefill_worker else None


# --- the decode worker ---------------------------------------------------------------------------------


def test_no_decode_worker_no_route() -> None:
    assert plan_route(snapshot(), {}, 100, CONFIG) is None
    assert plan_route(snapshot(prefill("p0")), {}, 100, CONFIG) is None


def test_cold_prompt_goes_to_the_least_loaded_then_most_free_blocks_then_lowest_id() -> None:
    assert ids(plan(snapshot(decode("d0", 2), decode("d1", 1), decode("d2", 3)), 40))[0] == "d1"
    tie_on_load = snapshot(decode("d0", 1, num_blocks_free=4), decode("d1", 1, num_blocks_free=8))
    assert ids(plan(tie_on_load, 40))[0] == "d1"
    assert ids(plan(snapshot(decode("d1"), decode("d0")), 40))[0] == "d0"


def test_the_longest_prefix_wins_over_a_less_loaded_worker() -> None:
    pool = snapshot(decode("d0", 0), decode("d1", 3), decode("d2", 1))
    result = plan(pool, 640, {"d1": 30, "d2": 20})
    assert ids(result) == ("d1", None)
    assert result.decode_cached_blocks == 30 and result.decode_load == 3


def test_an_overloaded_holder_loses_its_prefix_to_the_next_best() -> None:
    cached = {"d0": 30, "d1": 20}
    # Imbalance 4: d0 at 4 above the least loaded still wins; at 5 above it is overloaded.
    at_limit = plan(snapshot(decode("d0", 5), decode("d1", 2), decode("d2", 1)), 640, cached)
    assert ids(at_limit)[0] == "d0" and at_limit.num_overloaded == 0
    over = plan(snapshot(decode("d0", 6), decode("d1", 2), decode("d2", 1)), 640, cached)
    assert ids(over)[0] == "d1" and over.num_overloaded == 1
    # The bound is the config's.
    strict = RoutingConfig(max_load_imbalance=0)
    assert ids(plan(snapshot(decode("d0", 2), decode("d1", 1)), 640, {"d0": 30}, strict))[0] == "d1"


def test_equal_prefixes_go_to_the_lower_total_cost() -> None:
    pool = snapshot(decode("d0", 3), decode("d1", 1), prefill("p2"))
    result = plan(pool, 640, {"d0": 10, "d1": 10})
    assert ids(result)[0] == "d1"
    assert result.decode_cost == 1.0


def test_decode_load_weight_scales_the_decode_cost() -> None:
    pool = snapshot(decode("d0", 3), prefill("p1"))
    assert plan(pool, 640).decode_cost == 3.0
    heavy = RoutingConfig(decode_load_weight=2.5)
    result = plan(pool, 640, config=heavy)
    assert result.decode_cost == 7.5
    assert result.total_cost == 7.5 + result.prefill_cost


def test_cached_blocks_are_clamped_to_the_prompt() -> None:
    result = plan(snapshot(decode("d0")), 100, {"d0": 50, "d9": 3})  # 100 tokens: 6 full blocks
    assert result.num_prompt_blocks == 6
    assert result.decode_cached_blocks == 6


# --- conditional disaggregation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_tokens", "decode_cached", "disaggregated"),
    [
        (2000, 0, True),  # cold: 2000 uncached tokens
        (2000, 120, False),  # 80 uncached: < 256
        (2000, 110, False),  # 240 uncached: < 256
        (2000, 100, True),  # 400 uncached: not < 256
        (200, 0, False),  # 200 < 256, all of the prompt: the share does not matter
        (13, 0, False),  # a 13-token cold prompt: no hops and transfer for a few ms of work
        (4000, 200, True),  # 800 uncached: not < 256
    ],
)
def test_a_short_uncached_part_stays_on_the_decode_worker(
    num_tokens: int, decode_cached: int, disaggregated: bool
) -> None:
    result = plan(snapshot(decode("d0"), prefill("p1")), num_tokens, {"d0": decode_cached})
    assert result.disaggregated == disaggregated
    assert result.prefill_reason == ("disaggregated" if disaggregated else "short-uncached")
    assert (result.route.prefill_worker is None) == (not disaggregated)


def test_disaggregation_thresholds_are_strict_and_configurable() -> None:
    pool = snapshot(decode("d0"), prefill("p1"))
    # Exactly at the token threshold is not short.
    at_tokens = RoutingConfig(disagg_min_tokens=160)
    assert plan(pool, 1600, {"d0": 90}, at_tokens).disaggregated  # 160 uncached
    assert not plan(pool, 1600, {"d0": 91}, at_tokens).disaggregated  # 144 uncached
    # A short uncached part stays local whatever share of the prompt it is: here all of it.
    assert not plan(pool, 13, {}, at_tokens).disaggregated
    # At 0: always disaggregated while a prefill worker is there, even on a full hit.
    never_local = RoutingConfig(disagg_min_tokens=0)
    assert plan(pool, 1600, {"d0": 100}, never_local).disaggregated


def test_short_prompts_never_use_a_prefill_worker() -> None:
    pool = snapshot(decode("d0"), prefill("p1"))
    config = RoutingConfig(use_prefill_min_tokens=101, disagg_min_tokens=0)
    result = plan(pool, 100, config=config)
    assert not result.disaggregated and result.prefill_reason == "short-prompt"
    assert plan(pool, 101, config=config).disaggregated


def test_no_prefill_worker_means_local_prefill() -> None:
    result = plan(snapshot(decode("d0", 2)), 2000)
    assert result.route == Route(result.route.decode_worker)
    assert result.prefill_reason == "no-prefill-worker"
    # The local cost: blocks to compute (2000 tokens: 125 blocks) times (1 + the decode worker's load).
    assert result.prefill_cost == 125 * 3 and result.prefill_load == 2


# --- the prefill worker ----------------------------------------------------------------------------------


def test_prefill_worker_minimizes_uncached_blocks_times_one_plus_load() -> None:
    pool = snapshot(decode("d0"), prefill("p1", 0), prefill("p2", 2))
    # 1600 tokens = 100 blocks. p1 idle, holds nothing: 100 * 1. p2 holds 80: 20 * 3 = 60.
    result = plan(pool, 1600, {"p2": 80})
    assert ids(result) == ("d0", "p2")
    assert result.prefill_cached_blocks == 80 and result.prefill_load == 2 and result.prefill_cost == 60
    # p2 holds only 60 now: 40 * 3 = 120 > 100, so idle p1 computes everything.
    result = plan(pool, 1600, {"p2": 60})
    assert ids(result) == ("d0", "p1") and result.prefill_cost == 100


def test_prefill_needs_its_own_cache_not_the_decode_workers() -> None:
    # The decode worker holds half, but a prefill worker needs the KV of every block before the ones it
    # computes: it must compute what it does not hold itself.
    pool = snapshot(decode("d0"), prefill("p1"))
    result = plan(pool, 3200, {"d0": 100})  # 1600 uncached on d0: not short
    assert result.disaggregated and result.prefill_cost == 200 and result.prefill_cached_blocks == 0


def test_prefill_ties_go_to_lower_load_then_most_free_blocks_then_lowest_id() -> None:
    pool = snapshot(decode("d0"), prefill("p1", 1), prefill("p2", 0))
    assert ids(plan(pool, 1600, {"p1": 50}))[1] == "p2"  # 50 * 2 = 100 * 1: the idle one
    pool = snapshot(decode("d0"), prefill("p2", num_blocks_free=5), prefill("p1", num_blocks_free=9))
    assert ids(plan(pool, 1600))[1] == "p1"
    pool = snapshot(decode("d0"), prefill("p2"), prefill("p1"))
    assert ids(plan(pool, 1600))[1] == "p1"


def test_prefill_workers_of_another_model_are_never_paired() -> None:
    pool = snapshot(decode("d0", fingerprint="model-a"), prefill("p1", fingerprint="model-b"))
    assert plan(pool, 2000).prefill_reason == "no-prefill-worker"
    pool = snapshot(
        decode("d0", fingerprint="model-a"),
        prefill("p1", fingerprint="model-b"),
        prefill("p2", 5, fingerprint="model-a"),
    )
    assert ids(plan(pool, 2000, {"p1": 125})) == ("d0", "p2")


def test_transports() -> None:
    same_host = prefill("p1", host_id="host-a")
    other_host = prefill("p2", host_id="host-b", num_blocks_free=50)
    pool = snapshot(decode("d0"), same_host, other_host)
    auto = plan(pool, 2000)
    assert ids(auto) == ("d0", "p2") and auto.route.transport == "grpc"
    shm = plan(pool, 2000, config=RoutingConfig(transport="shm"))
    assert ids(shm) == ("d0", "p1") and shm.route.transport == "shm"
    forced = plan(pool, 2000, {"p1": 100}, RoutingConfig(transport="grpc"))
    assert ids(forced) == ("d0", "p1") and forced.route.transport == "grpc"
    only_other = plan(snapshot(decode("d0"), other_host), 2000, config=RoutingConfig(transport="shm"))
    assert only_other.prefill_reason == "no-prefill-worker"
    assert choose_transport(same_host.worker, decode("d0", host_id="").worker) == "grpc"
    assert choose_transport(same_host.worker, decode("d0", transports=("grpc",)).worker) == "grpc"


GPU = ("cuda_ipc", "nccl", "grpc")
"""What a GPU worker offers: its pool is on the device, so no shm."""


@pytest.mark.parametrize(
    ("prefill_offers", "decode_offers", "same_host", "expected"),
    [
        (GPU, GPU, True, "cuda_ipc"),
        (GPU, GPU, False, "nccl"),  # CUDA IPC cannot cross hosts
        (GPU, ("nccl", "grpc"), True, "nccl"),
        (("cuda_ipc", "grpc"), GPU, True, "cuda_ipc"),
        (("cuda_ipc", "grpc"), ("cuda_ipc", "grpc"), False, "grpc"),
        (("nccl", "grpc"), ("grpc",), True, "grpc"),
        (("shm", "nccl", "grpc"), ("shm", "nccl", "grpc"), True, "shm"),  # CPU pools: a memcpy beats gloo
        (("shm", "nccl", "grpc"), ("shm", "nccl", "grpc"), False, "nccl"),
        (("shm", "grpc"), ("shm", "grpc"), False, "grpc"),
        (("grpc", "shm"), ("shm", "grpc"), True, "shm"),  # the order a worker lists them in does not matter
    ],
)
def test_choose_transport_prefers_device_transports_on_one_host_then_nccl_then_grpc(
    prefill_offers, decode_offers, same_host, expected
) -> None:
    p = prefill("p1", host_id="host-a", transports=prefill_offers)
    d = decode("d0", host_id="host-a" if same_host else "host-b", transports=decode_offers)
    assert choose_transport(p.worker, d.worker) == expected
    unknown_host = "nccl" if "nccl" in set(prefill_offers) & set(decode_offers) else "grpc"
    assert choose_transport(p.worker, replace(d.worker, host_id="")) == unknown_host


def test_auto_routing_ships_over_cuda_ipc_between_gpu_workers_of_one_host() -> None:
    pool = snapshot(
        decode("d0", transports=GPU),
        prefill("p1", transports=GPU),
        prefill("p2", 3, host_id="host-b", transports=GPU),
    )
    local = plan(pool, 2000)
    assert ids(local) == ("d0", "p1") and local.route.transport == "cuda_ipc"
    remote = plan(pool, 2000, {"p2": 120})  # p2 holds most of the prompt: worth crossing hosts
    assert ids(remote) == ("d0", "p2") and remote.route.transport == "nccl"
    assert plan(pool, 2000, config=RoutingConfig(transport="grpc")).route.transport == "grpc"


# --- failed workers --------------------------------------------------------------------------------------


def test_failed_workers_are_excluded_until_every_decode_worker_failed() -> None:
    pool = snapshot(decode("d0"), decode("d1", 3), prefill("p2"), prefill("p3", 1))
    assert ids(plan(pool, 2000, {"d0": 10}, exclude=frozenset({"d0"}))) == ("d1", "p2")
    assert ids(plan(pool, 2000, exclude=frozenset({"p2"}))) == ("d0", "p3")
    # Every decode worker failed: the least loaded one is tried again; failed prefill workers are not.
    everyone = frozenset({"d0", "d1", "p2", "p3"})
    result = plan(pool, 2000, exclude=everyone)
    assert ids(result) == ("d0", None) and result.prefill_reason == "no-prefill-worker"


# --- the plan as a record --------------------------------------------------------------------------------


def test_attributes_name_the_decision_and_its_inputs() -> None:
    result = plan(snapshot(decode("d0", 1), prefill("p1", 2)), 2000, {"d0": 3, "p1": 5})
    assert result.attributes() == {
        "kvmesh.prompt_tokens": 2000,
        "kvmesh.prompt_blocks": 125,
        "kvmesh.decode_worker": "d0",
        "kvmesh.prefill_worker": "p1",
        "kvmesh.transport": "shm",
        "kvmesh.disaggregated": True,
        "kvmesh.prefill_reason": "disaggregated",
        "kvmesh.decode_cached_blocks": 3,
        "kvmesh.prefill_cached_blocks": 5,
        "kvmesh.decode_load": 1,
        "kvmesh.prefill_load": 2,
        "kvmesh.decode_cost": 1.0,
        "kvmesh.prefill_cost": 120.0 * 3,
        "kvmesh.num_overloaded": 0,
    }


def test_config_checks_its_fields() -> None:
    for bad in (
        {"disagg_min_tokens": -1},
        {"decode_load_weight": -1.0},
        {"max_load_imbalance": -1},
        {"use_prefill_min_tokens": -1},
        {"transport": "carrier-pigeon"},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            RoutingConfig(**bad)  # type: ignore[arg-type]


def test_blocks_are_the_ones_the_workers_advertise() -> None:
    eight = plan(snapshot(decode("d0", block_size=8), block_size=8), 100, {"d0": 3})
    assert (eight.num_prompt_blocks, eight.decode_cached_blocks) == (12, 3)
    assert eight.prefill_cost == 10.0  # 100 - 3 * 8 = 76 tokens to compute: 10 blocks of 8
    with pytest.raises(ValueError, match=r"block sizes \[16, 32\]"):
        snapshot(decode("d0"), decode("d1", block_size=32))
    with pytest.raises(ValueError, match="block sizes"):
        snapshot(decode("d0"), block_size=8)


# --- random pools against the rules ----------------------------------------------------------------------


@st.composite
def routing_inputs(draw: st.DrawFn) -> tuple[PoolSnapshot, dict[str, int], int, RoutingConfig]:
    num_decode = draw(st.integers(1, 4))
    num_prefill = draw(st.integers(0, 3))
    block_size = draw(st.sampled_from([4, 16]))
    candidates = [
        decode(
            f"d{i}",
            draw(st.integers(0, 12)),
            fingerprint=draw(st.sampled_from(["a", "b"])),
            block_size=block_size,
        )
        for i in range(num_decode)
    ] + [
        prefill(
            f"p{10 + i}",
            draw(st.integers(0, 12)),
            fingerprint=draw(st.sampled_from(["a", "b"])),
            host_id=draw(st.sampled_from(["h1", "h2"])),
            block_size=block_size,
        )
        for i in range(num_prefill)
    ]
    num_tokens = draw(st.integers(1, 4000))
    cached = {c.worker_id: draw(st.integers(0, 300)) for c in candidates if draw(st.booleans())}
    config = RoutingConfig(
        disagg_min_tokens=draw(st.integers(0, 600)),
        decode_load_weight=draw(st.floats(0.0, 10.0)),
        max_load_imbalance=draw(st.integers(0, 6)),
        transport=draw(st.sampled_from(["auto", "shm", "grpc"])),
    )
    return snapshot(*candidates, block_size=block_size), cached, num_tokens, config


@settings(max_examples=300, deadline=None)
@given(routing_inputs())
def test_random_pools_obey_the_rules(inputs: tuple[PoolSnapshot, dict[str, int], int, RoutingConfig]) -> None:
    pool, cached, num_tokens, config = inputs
    frozen = copy.deepcopy((pool, cached))
    result = plan(pool, num_tokens, cached, config)
    assert plan(pool, num_tokens, cached, config) == result  # pure
    assert (pool, cached) == frozen  # inputs untouched
    num_blocks = num_tokens // pool.block_size

    def held(worker_id: str) -> int:
        return min(cached.get(worker_id, 0), num_blocks)

    chosen = result.route.decode_worker
    min_load = min(c.load for c in pool.decode)
    eligible = [c for c in pool.decode if c.load - min_load <= config.max_load_imbalance]
    assert chosen.worker_id in {c.worker_id for c in eligible}
    assert result.decode_cached_blocks == held(chosen.worker_id) == max(held(c.worker_id) for c in eligible)
    need = num_tokens - result.decode_cached_blocks * pool.block_size
    short = need < config.disagg_min_tokens
    if result.disaggregated:
        prefill_worker = result.route.prefill_worker
        assert prefill_worker is not None and not short
        assert prefill_worker.model_fingerprint == chosen.model_fingerprint
        assert result.route.transport == (
            "grpc" if config.transport == "grpc" else choose_transport(prefill_worker, chosen)
        )
        if config.transport == "shm":
            assert result.route.transport == "shm"
    else:
        assert result.route.transport == ""
        assert short or result.prefill_reason == "no-prefill-worker"
