"""Routing: least-loaded picks, in-flight counting, exclusion, transport choice, refresh from a real cache store."""

from __future__ import annotations

import asyncio

import grpc.aio

from cache_store.registry import WorkerInfo, WorkerLoad, WorkerRole
from cache_store.server import CacheStoreConfig, serve, worker_to_proto
from gateway.router import Route, WorkerPool, choose_transport, plan_route
from kvmesh.v1 import cache_store_pb2, cache_store_pb2_grpc


def make_worker(
    worker_id: str,
    role: WorkerRole = WorkerRole.DECODE,
    *,
    num_running: int = 0,
    num_waiting: int = 0,
    num_blocks_free: int = 10,
    host_id: str = "host-a",
    transports: tuple[str, ...] = ("shm", "grpc"),
) -> WorkerInfo:
    return WorkerInfo(
        worker_id=worker_id,
        role=role,
        address=f"127.0.0.1:{9000 + int(worker_id[1:])}",
        host_id=host_id,
        transports=transports,
        load=WorkerLoad(num_running, num_waiting, num_blocks_free, 16),
    )


def pick_id(
    pool: WorkerPool, role: WorkerRole = WorkerRole.DECODE, exclude: frozenset[str] = frozenset()
) -> str | None:
    worker = pool.pick(role, exclude)
    return worker.worker_id if worker is not None else None


def pick(pool: WorkerPool) -> WorkerInfo:
    worker = pool.pick(WorkerRole.DECODE)
    assert worker is not None
    return worker


def make_pool(*workers: WorkerInfo) -> WorkerPool:
    pool = WorkerPool("127.0.0.1:1", refresh_ms=500)
    pool.update(workers)
    return pool


def test_pick_least_loaded_then_most_free_blocks() -> None:
    pool = make_pool(
        make_worker("d0", num_running=2),
        make_worker("d1", num_running=1, num_waiting=1),
        make_worker("d2", num_running=1, num_blocks_free=4),
        make_worker("d3", num_waiting=1, num_blocks_free=8),
        make_worker("p4", WorkerRole.PREFILL),
    )
    # d2 and d3 both have load 1; d3 has more free blocks.
    assert pick_id(pool) == "d3"
    assert pick_id(pool, WorkerRole.PREFILL) == "p4"


def test_pick_ties_go_to_the_lowest_id_and_none_without_workers() -> None:
    pool = make_pool(make_worker("d1"), make_worker("d0"))
    assert pick_id(pool) == "d0"
    assert pool.pick(WorkerRole.PREFILL) is None
    assert make_pool().pick(WorkerRole.DECODE) is None


def test_in_flight_requests_spread_a_burst() -> None:
    d0, d1, d2 = make_worker("d0"), make_worker("d1"), make_worker("d2", num_running=1)
    pool = make_pool(d0, d1, d2)
    picked = []
    with pool.in_flight(pick(pool)):
        picked.append(pick_id(pool))
        with pool.in_flight(pick(pool)):
            assert pool.num_in_flight("d0") == 1 and pool.num_in_flight("d1") == 1
            # Every worker now has load 1: the tie goes to the lowest id again.
            picked.append(pick_id(pool))
    assert picked == ["d1", "d0"]
    assert pool.num_in_flight("d0") == 0 and pool.num_in_flight("d1") == 0
    assert pool.load(d2) == 1


def test_in_flight_counts_survive_an_exception() -> None:
    d0 = make_worker("d0")
    pool = make_pool(d0)
    try:
        with pool.in_flight(d0):
            raise RuntimeError("the call failed")
    except RuntimeError:
        pass
    assert pool.num_in_flight("d0") == 0


def test_pick_excludes_failed_workers() -> None:
    pool = make_pool(make_worker("d0"), make_worker("d1", num_running=5))
    assert pick_id(pool, exclude=frozenset({"d0"})) == "d1"
    assert pool.pick(WorkerRole.DECODE, exclude={"d0", "d1"}) is None


def test_choose_transport() -> None:
    prefill = make_worker("p0", WorkerRole.PREFILL)
    assert choose_transport(prefill, make_worker("d1")) == "shm"
    assert choose_transport(prefill, make_worker("d1", host_id="host-b")) == "grpc"
    assert choose_transport(prefill, make_worker("d1", transports=("grpc",))) == "grpc"
    assert (
        choose_transport(make_worker("p0", WorkerRole.PREFILL, host_id=""), make_worker("d1", host_id=""))
        == "grpc"
    )


def test_plan_route() -> None:
    p0 = make_worker("p0", WorkerRole.PREFILL)
    p1 = make_worker("p1", WorkerRole.PREFILL, host_id="host-b", num_running=0, num_blocks_free=16)
    d2 = make_worker("d2")
    pool = make_pool(p0, p1, d2)
    # p1 has more free blocks, so auto picks it, over gRPC (another host).
    assert plan_route(pool, 100) == Route(d2, p1, "grpc")
    # shm only uses prefill workers on the decode worker's host.
    assert plan_route(pool, 100, transport="shm") == Route(d2, p0, "shm")
    assert plan_route(pool, 100, transport="grpc", exclude={"p1"}) == Route(d2, p0, "grpc")
    # Short prompts are prefilled by the decode worker itself.
    assert plan_route(pool, 10, use_prefill_min_tokens=11) == Route(d2)
    # Every decode worker failed: try the least loaded one again rather than give up.
    assert plan_route(pool, 100, exclude={"d2", "p0", "p1"}) == Route(d2)
    assert plan_route(make_pool(p0), 100) is None


def test_refresh_follows_the_cache_store() -> None:
    async def scenario() -> None:
        store = await serve(CacheStoreConfig(heartbeat_interval_ms=1000, expiry_ms=60_000))
        pool = WorkerPool(store.address, refresh_ms=50)
        try:
            async with grpc.aio.insecure_channel(store.address) as channel:
                stub = cache_store_pb2_grpc.CacheStoreStub(channel)
                await stub.Register(
                    cache_store_pb2.RegisterRequest(worker=worker_to_proto(make_worker("d0")))
                )
                await pool.start()
                assert [w.worker_id for w in pool.workers(WorkerRole.DECODE)] == ["d0"]

                await stub.Register(
                    cache_store_pb2.RegisterRequest(
                        worker=worker_to_proto(make_worker("d1", num_running=3, num_blocks_free=2))
                    )
                )
                await stub.Register(
                    cache_store_pb2.RegisterRequest(
                        worker=worker_to_proto(make_worker("p2", WorkerRole.PREFILL))
                    )
                )
                await stub.Heartbeat(
                    cache_store_pb2.HeartbeatRequest(
                        worker_id="d0", load=cache_store_pb2.WorkerLoad(num_running=7, num_blocks_total=16)
                    )
                )
                for _ in range(100):  # the background refresh picks up all three within a few periods
                    if len(pool.workers(WorkerRole.DECODE)) == 2 and pool.workers(WorkerRole.PREFILL):
                        break
                    await asyncio.sleep(0.02)
                assert [w.worker_id for w in pool.workers(WorkerRole.DECODE)] == ["d0", "d1"]
                assert [w.worker_id for w in pool.workers(WorkerRole.PREFILL)] == ["p2"]
                assert pick_id(pool) == "d1"  # d0 now reports 7 running

            # A cache store that goes away leaves the last known list in place.
            await store.stop(0)
            assert not await pool.refresh()
            assert len(pool.workers(WorkerRole.DECODE)) == 2
        finally:
            await pool.close()
            await store.stop(0)

    asyncio.run(scenario())
