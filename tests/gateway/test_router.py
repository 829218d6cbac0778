"""The worker pool and the router: least-loaded picks, in-flight counting, exclusion, snapshots, refresh
from a real cache store, and routes planned from a real cache store's Lookup (and without it)."""

from __future__ import annotations

import asyncio

import grpc.aio
import pytest

from cache_store.server import CacheStoreConfig, serve
from gateway.prefix_lookup import PrefixLookup
from gateway.router import Router, WorkerPool
from gateway.routing_cost import Candidate, RoutingConfig, plan_route
from kvmesh.engine.block_hash import hash_blocks, namespace_hash
from kvmesh.mesh.convert import worker_to_proto
from kvmesh.mesh.workers import WorkerInfo, WorkerLoad, WorkerRole
from kvmesh.v1 import cache_store_pb2, cache_store_pb2_grpc
from tests.fake_decode import publish_blocks


def make_worker(
    worker_id: str,
    role: WorkerRole = WorkerRole.DECODE,
    *,
    num_running: int = 0,
    num_waiting: int = 0,
    num_blocks_free: int = 10,
    host_id: str = "host-a",
    transports: tuple[str, ...] = ("shm", "grpc"),
    fingerprint: str = "model-a",
    block_size: int = 16,
) -> WorkerInfo:
    return WorkerInfo(
        worker_id=worker_id,
        role=role,
        address=f"127.0.0.1:{9000 + int(worker_id[1:])}",
        block_size=block_size,
        host_id=host_id,
        transports=transports,
        load=WorkerLoad(num_running, num_waiting, num_blocks_free, 16),
        model_fingerprint=fingerprint,
    )


def make_pool(*workers: WorkerInfo) -> WorkerPool:
    pool = WorkerPool("127.0.0.1:1", refresh_ms=500)
    pool.update(workers)
    return pool


def test_in_flight_requests_spread_a_burst() -> None:
    d0, d1, d2 = make_worker("d0"), make_worker("d1"), make_worker("d2", num_running=1)
    pool = make_pool(d0, d1, d2)

    def route() -> WorkerInfo:
        plan = plan_route(pool.snapshot(), {}, 40, RoutingConfig())
        assert plan is not None
        return plan.route.decode_worker

    routed = []
    with pool.in_flight(route()):
        routed.append(route().worker_id)
        with pool.in_flight(route()):
            assert pool.num_in_flight("d0") == 1 and pool.num_in_flight("d1") == 1
            # Every worker now has load 1: the tie goes to the lowest id again.
            routed.append(route().worker_id)
    assert routed == ["d1", "d0"]
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


def test_snapshot_holds_loads_with_in_flight_requests() -> None:
    d0, d1 = make_worker("d0", num_running=2), make_worker("d1", num_waiting=1)
    p2 = make_worker("p2", WorkerRole.PREFILL)
    pool = make_pool(d1, p2, d0)
    with pool.in_flight(d1):
        snapshot = pool.snapshot()
    assert snapshot.decode == (Candidate(d0, 2), Candidate(d1, 2))
    assert snapshot.prefill == (Candidate(p2, 0),)
    assert pool.snapshot().decode[1].load == 1  # a snapshot does not follow later changes


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
                assert [pool.load(w) for w in pool.workers(WorkerRole.DECODE)] == [7, 3]  # d0's heartbeat

            # A cache store that goes away leaves the last known list in place.
            await store.stop(0)
            assert not await pool.refresh()
            assert len(pool.workers(WorkerRole.DECODE)) == 2
        finally:
            await pool.close()
            await store.stop(0)

    asyncio.run(scenario())


PROMPT = list(range(1, 101))  # 100 tokens: 6 full blocks of 16


def test_router_follows_the_cache_store_lookup_and_routes_by_load_without_it() -> None:
    async def scenario() -> None:
        store = await serve(CacheStoreConfig(heartbeat_interval_ms=1000, expiry_ms=60_000))
        pool = WorkerPool(store.address, refresh_ms=10_000)
        workers = [
            make_worker("d0"),
            make_worker("d1", num_running=2),
            make_worker("d2", fingerprint="model-b"),
            make_worker("p3", WorkerRole.PREFILL),
        ]
        try:
            async with grpc.aio.insecure_channel(store.address) as channel:
                stub = cache_store_pb2_grpc.CacheStoreStub(channel)
                for worker in workers:
                    await stub.Register(cache_store_pb2.RegisterRequest(worker=worker_to_proto(worker)))
            await pool.start()
            lookup = PrefixLookup(pool.store_channel, timeout_s=1.0, backoff_s=60.0)
            router = Router(pool, lookup, RoutingConfig(disagg_min_tokens=0))

            cold = await router.plan(PROMPT, "salt-1")
            assert cold is not None and cold.route.decode_worker.worker_id == "d0"
            assert cold.decode_cached_blocks == 0 and cold.num_prompt_blocks == 6

            # d1 holds 4 blocks of the prompt in tenant salt-1's namespace of its model.
            hashes = hash_blocks(namespace_hash("model-a", "salt-1"), PROMPT, 16)
            await publish_blocks(store.address, "d1", hashes[:4])
            # d2 holds all of them, but under another model's fingerprint: a different namespace.
            await publish_blocks(store.address, "d2", hashes)
            warm = await router.plan(PROMPT, "salt-1")
            assert warm is not None and warm.route.decode_worker.worker_id == "d1"
            assert warm.decode_cached_blocks == 4
            # Another tenant's salt is another namespace: no hit, back to the least loaded.
            other = await router.plan(PROMPT, "salt-2")
            assert other is not None and other.decode_cached_blocks == 0
            assert other.route.decode_worker.worker_id in ("d0", "d2")

            # The cache store goes away: routes by load alone, and asks again next time (it fails fast).
            await store.stop(0)
            down = await router.plan(PROMPT, "salt-1")
            assert down is not None and down.decode_cached_blocks == 0
            assert down.route.decode_worker.worker_id == "d0"
            again = await lookup.find(PROMPT, "salt-1", [("d1", "model-a")], 16)
            assert again.status == "failed"
        finally:
            await pool.close()
            await store.stop(0)

    asyncio.run(scenario())


def test_the_router_hashes_prompts_in_the_block_size_the_workers_advertise() -> None:
    async def scenario() -> None:
        store = await serve(CacheStoreConfig(heartbeat_interval_ms=1000, expiry_ms=60_000))
        pool = WorkerPool(store.address, refresh_ms=10_000)
        try:
            router = Router(pool, PrefixLookup(pool.store_channel, timeout_s=1.0), RoutingConfig())
            await pool.start()
            assert pool.block_size is None and await router.plan(PROMPT, "") is None  # no worker yet

            async with grpc.aio.insecure_channel(store.address) as channel:
                stub = cache_store_pb2_grpc.CacheStoreStub(channel)
                for worker in (make_worker("d0", block_size=8), make_worker("d1", block_size=8)):
                    await stub.Register(cache_store_pb2.RegisterRequest(worker=worker_to_proto(worker)))
            await pool.refresh()
            assert pool.block_size == 8
            # d1 holds the first 5 blocks of 8 tokens: found only if the gateway hashes in blocks of 8.
            hashes = hash_blocks(namespace_hash("model-a", "salt-1"), PROMPT, 8)
            await publish_blocks(store.address, "d1", hashes[:5])
            plan = await router.plan(PROMPT, "salt-1")
            assert plan is not None and plan.route.decode_worker.worker_id == "d1"
            assert (plan.num_prompt_blocks, plan.decode_cached_blocks) == (12, 5)
        finally:
            await pool.close()
            await store.stop(0)

    asyncio.run(scenario())


def test_pool_refuses_workers_of_different_block_sizes() -> None:
    pool = make_pool(make_worker("d0"))
    with pytest.raises(ValueError, match=r"different block sizes: \[16, 32\]"):
        pool.update([make_worker("d0"), make_worker("d1", block_size=32)])
    assert [w.worker_id for w in pool.workers_of_all_roles()] == ["d0"] and pool.block_size == 16
    assert pool.snapshot().block_size == 16
    pool.update([])
    assert pool.block_size is None


def test_lookup_of_a_hung_cache_store_ends_at_its_deadline() -> None:
    async def scenario() -> None:
        server = grpc.aio.server()  # a cache store whose Lookup never answers
        cache_store_pb2_grpc.add_CacheStoreServicer_to_server(_HungCacheStore(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        try:
            lookup = PrefixLookup(lambda: channel, timeout_s=0.2)
            loop = asyncio.get_running_loop()
            started = loop.time()
            found = await lookup.find(PROMPT, "", [("d0", "model-a")], 16)
            assert found.status == "failed" and found.cached_blocks == {}
            assert 0.2 <= loop.time() - started < 2.0
            # Backing off: the next lookups do not wait for the hung store.
            started = loop.time()
            assert (await lookup.find(PROMPT, "", [("d0", "model-a")], 16)).status == "skipped"
            assert loop.time() - started < 0.1
            # Nothing to look up: a prompt shorter than a block.
            assert (await lookup.find(PROMPT[:15], "", [("d0", "model-a")], 16)).status == "skipped"
        finally:
            await channel.close()
            await server.stop(0)

    asyncio.run(scenario())


class _HungCacheStore(cache_store_pb2_grpc.CacheStoreServicer):
    async def Lookup(  # noqa: N802 (generated name)
        self, request: cache_store_pb2.LookupRequest, context: grpc.aio.ServicerContext
    ) -> cache_store_pb2.LookupReply:
        await asyncio.sleep(30)
        return cache_store_pb2.LookupReply()


def test_merge_keeps_workers_the_cache_store_stops_listing_for_the_grace_period() -> None:
    pool = WorkerPool("127.0.0.1:1", refresh_ms=100, unlisted_grace_ms=2000)
    pool.merge([make_worker("d0"), make_worker("d1"), make_worker("p2", WorkerRole.PREFILL)], now=10.0)
    # A restarted cache store lists nobody yet: the pool keeps serving on what it knew.
    pool.merge([], now=10.5)
    assert [w.worker_id for w in pool.workers_of_all_roles()] == ["d0", "d1", "p2"]
    # d0 registered again (with a new load); d1 and p2 have not, yet.
    pool.merge([make_worker("d0", num_running=5)], now=11.0)
    assert [pool.load(w) for w in pool.workers(WorkerRole.DECODE)] == [5, 0]
    pool.merge([make_worker("d0"), make_worker("p2", WorkerRole.PREFILL)], now=12.0)
    assert [w.worker_id for w in pool.workers_of_all_roles()] == ["d0", "d1", "p2"]
    # d1 was last listed at 10.0: past the grace it leaves; p2 (listed at 12.0) stays.
    pool.merge([make_worker("d0")], now=12.1)
    assert [w.worker_id for w in pool.workers_of_all_roles()] == ["d0", "p2"]
    pool.merge([make_worker("d0")], now=14.1)
    assert [w.worker_id for w in pool.workers_of_all_roles()] == ["d0"]


def test_merge_drops_unlisted_workers_of_another_block_size_and_refuses_mixed_lists() -> None:
    pool = WorkerPool("127.0.0.1:1", refresh_ms=100, unlisted_grace_ms=2000)
    pool.merge([make_worker("d0"), make_worker("d1")], now=0.0)
    with pytest.raises(ValueError, match="different block sizes"):
        pool.merge([make_worker("d2", block_size=32), make_worker("d3")], now=0.1)
    assert [w.worker_id for w in pool.workers_of_all_roles()] == ["d0", "d1"]
    # The mesh turned over to another block size: the old workers cannot stay beside the new ones.
    pool.merge([make_worker("d2", block_size=32)], now=0.2)
    assert [w.worker_id for w in pool.workers_of_all_roles()] == ["d2"] and pool.block_size == 32
