"""KV events end to end: publish_kv_events against a real cache store on loopback, restarts and expiry."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

import grpc
import grpc.aio
import pytest

from cache_store.server import CacheStoreConfig, serve
from kvmesh.engine.block_hash import hash_blocks, namespace_hash
from kvmesh.engine.kv_event import KVEvent, KVEventKind
from kvmesh.mesh import kv_events
from kvmesh.mesh.kv_events import publish_kv_events
from kvmesh.mesh.server import RunningServer
from kvmesh.v1 import cache_store_pb2 as pb
from kvmesh.v1 import cache_store_pb2_grpc

BLOCK_SIZE = 4
PROMPT = hash_blocks(namespace_hash("test-model"), list(range(1, 8 * BLOCK_SIZE + 1)), BLOCK_SIZE)
"""Chained hashes of an 8-block prompt."""
TIMEOUT_S = 10.0
"""How long an eventually-consistent answer may take to show up; generous for a busy machine."""
RETRY_S = 0.1


class MemorySource:
    """A KVEventSource over a set of hashes, as a worker's prefix cache would keep it."""

    def __init__(self, block_hashes: Sequence[bytes] = ()) -> None:
        self.held = list(block_hashes)
        self.events: list[KVEvent] = []
        self.num_inventories = 0
        """How often the publisher asked for the inventory: once per (re)connect."""

    def store(self, block_hashes: Sequence[bytes]) -> None:
        self.held += [h for h in block_hashes if h not in self.held]
        self.events.append(KVEvent(KVEventKind.STORED, tuple(block_hashes)))

    def remove(self, block_hashes: Sequence[bytes]) -> None:
        self.held = [h for h in self.held if h not in block_hashes]
        self.events.append(KVEvent(KVEventKind.REMOVED, tuple(block_hashes)))

    def take_events(self) -> list[KVEvent]:
        events, self.events = self.events, []
        return events

    def inventory(self) -> list[bytes]:
        self.num_inventories += 1
        return list(self.held)


def make_worker_proto(worker_id: str) -> pb.WorkerInfo:
    return pb.WorkerInfo(
        worker_id=worker_id,
        role=pb.WORKER_ROLE_DECODE,
        address="127.0.0.1:9001",
        model_fingerprint="fp",
        block_size_tokens=BLOCK_SIZE,
    )


async def register(stub: cache_store_pb2_grpc.CacheStoreStub, *worker_ids: str) -> None:
    for worker_id in worker_ids:
        await stub.Register(pb.RegisterRequest(worker=make_worker_proto(worker_id)), timeout=TIMEOUT_S)


async def lookup(
    stub: cache_store_pb2_grpc.CacheStoreStub, block_hashes: Sequence[bytes]
) -> list[tuple[str, int]]:
    reply = await stub.Lookup(pb.LookupRequest(block_hashes=block_hashes), timeout=TIMEOUT_S)
    return [(m.worker_id, m.num_blocks) for m in reply.matches]


async def eventually(answer: Callable[[], Awaitable[object]], expected: object) -> None:
    """Polls answer() until it returns expected; fails with the last answer after TIMEOUT_S."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT_S
    while (last := await answer()) != expected:
        assert loop.time() < deadline, f"still {last!r}, expected {expected!r}"
        await asyncio.sleep(0.02)


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT_S
    while not condition():
        assert loop.time() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.02)


def start_publisher(store: RunningServer, worker_id: str, source: MemorySource) -> asyncio.Task[None]:
    return asyncio.create_task(publish_kv_events(store.address, worker_id, source, retry_s=RETRY_S))


async def stop_publisher(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, TIMEOUT_S)


def run_with_store(
    body: Callable[[RunningServer, cache_store_pb2_grpc.CacheStoreStub], Awaitable[None]],
    config: CacheStoreConfig | None = None,
) -> None:
    async def main() -> None:
        store = await serve(config or CacheStoreConfig(port=0))
        try:
            async with grpc.aio.insecure_channel(store.address) as channel:
                await body(store, cache_store_pb2_grpc.CacheStoreStub(channel))
        finally:
            await store.stop(0)

    asyncio.run(main())


def test_lookup_follows_stored_and_removed_events() -> None:
    async def body(store: RunningServer, stub: cache_store_pb2_grpc.CacheStoreStub) -> None:
        await register(stub, "w0", "w1")
        w0, w1 = MemorySource(PROMPT[:2]), MemorySource(PROMPT[:4])
        publishers = [start_publisher(store, "w0", w0), start_publisher(store, "w1", w1)]
        # The inventory sent on connect; longest first.
        await eventually(lambda: lookup(stub, PROMPT), [("w1", 4), ("w0", 2)])

        w0.store(PROMPT[2:6])
        await eventually(lambda: lookup(stub, PROMPT), [("w0", 6), ("w1", 4)])
        w0.remove(PROMPT[3:4])  # a gap ends the prefix, even though later blocks stay
        w1.remove(PROMPT[:1])  # without the first block, no prefix at all
        await eventually(lambda: lookup(stub, PROMPT), [("w0", 3)])
        w1.store(PROMPT[:1])
        await eventually(lambda: lookup(stub, PROMPT), [("w1", 4), ("w0", 3)])
        assert (w0.num_inventories, w1.num_inventories) == (1, 1), "one connection each"

        for publisher in publishers:
            await stop_publisher(publisher)

    run_with_store(body)


def test_cache_store_restart_rebuilds_the_index_from_the_inventory() -> None:
    async def main() -> None:
        store = await serve(CacheStoreConfig(port=0))
        source = MemorySource(PROMPT[:3])
        publisher = start_publisher(store, "w0", source)
        try:
            async with grpc.aio.insecure_channel(store.address) as channel:
                stub = cache_store_pb2_grpc.CacheStoreStub(channel)
                await register(stub, "w0")
                await eventually(lambda: lookup(stub, PROMPT), [("w0", 3)])

                await store.stop(0)
                source.store(PROMPT[3:5])  # while the store is down
                store = await serve(CacheStoreConfig(port=store.port))
                # The new store knows nothing, and refuses the stream until the worker registers again.
                assert await lookup(stub, PROMPT) == []
                await register(stub, "w0")
                await eventually(lambda: lookup(stub, PROMPT), [("w0", 5)])
                assert source.num_inventories >= 2
            await stop_publisher(publisher)
        finally:
            publisher.cancel()
            await store.stop(0)

    asyncio.run(main())


def test_expired_worker_leaves_the_index() -> None:
    async def body(store: RunningServer, stub: cache_store_pb2_grpc.CacheStoreStub) -> None:
        # No heartbeats at all: both workers expire 300 ms after registering, w1 no later than w0.
        await register(stub, "w1", "w0")
        w0, w1 = MemorySource(PROMPT[:3]), MemorySource(PROMPT[:5])
        w0_publisher, w1_publisher = start_publisher(store, "w0", w0), start_publisher(store, "w1", w1)
        await eventually(lambda: lookup(stub, PROMPT), [("w1", 5), ("w0", 3)])
        await stop_publisher(w1_publisher)

        await eventually(lambda: lookup(stub, PROMPT), [])  # hidden as soon as they expire
        # The sweep ends w0's stream, so the publisher reconnects and asks for the inventory again.
        await wait_until(lambda: w0.num_inventories >= 2, "w0's stream is ended by the expiry sweep")
        await register(stub, "w0", "w1")
        # w0 re-sent its inventory; w1's hashes left the index with it, and nobody re-sent them.
        await eventually(lambda: lookup(stub, PROMPT), [("w0", 3)])
        await stop_publisher(w0_publisher)

    run_with_store(body, CacheStoreConfig(port=0, heartbeat_interval_ms=100, expiry_ms=300))


def test_register_again_keeps_the_workers_hashes() -> None:
    async def body(store: RunningServer, stub: cache_store_pb2_grpc.CacheStoreStub) -> None:
        await register(stub, "w0")
        publisher = start_publisher(store, "w0", MemorySource(PROMPT[:2]))
        await eventually(lambda: lookup(stub, PROMPT), [("w0", 2)])
        await stop_publisher(publisher)  # nothing would re-send the hashes
        await register(stub, "w0")
        assert await lookup(stub, PROMPT) == [("w0", 2)]

    run_with_store(body)


async def publish_raw(
    stub: cache_store_pb2_grpc.CacheStoreStub, batches: Sequence[pb.KVEventBatch]
) -> pb.PublishKVEventsReply:
    call = stub.PublishKVEvents(timeout=TIMEOUT_S)
    for batch in batches:
        await call.write(batch)
    await call.done_writing()
    reply: pb.PublishKVEventsReply = await call
    return reply


def test_publish_counts_events_and_refuses_unregistered_workers() -> None:
    stored = pb.KVEvent(kind=pb.KV_EVENT_KIND_STORED, block_hashes=PROMPT[:2])
    cleared = pb.KVEvent(kind=pb.KV_EVENT_KIND_CLEARED)

    async def body(_: RunningServer, stub: cache_store_pb2_grpc.CacheStoreStub) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await publish_raw(stub, [pb.KVEventBatch(worker_id="ghost", events=[stored])])
        assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert raised.value.details() == "worker ghost is not registered: register first"
        assert await lookup(stub, PROMPT) == []

        await register(stub, "w0")
        batches = [pb.KVEventBatch(worker_id="w0", events=[cleared, stored]), pb.KVEventBatch(worker_id="w0")]
        reply = await publish_raw(stub, batches)
        assert reply.num_events == 2
        assert await lookup(stub, PROMPT) == [("w0", 2)]

    run_with_store(body)


@pytest.mark.parametrize(
    ("batch", "field"),
    [
        (pb.KVEventBatch(events=[pb.KVEvent(kind=pb.KV_EVENT_KIND_CLEARED)]), "worker_id"),
        (pb.KVEventBatch(worker_id="w0", events=[pb.KVEvent(block_hashes=PROMPT[:1])]), "events[0].kind"),
        (
            pb.KVEventBatch(
                worker_id="w0",
                events=[
                    pb.KVEvent(kind=pb.KV_EVENT_KIND_CLEARED),
                    pb.KVEvent(kind=pb.KV_EVENT_KIND_STORED, block_hashes=[PROMPT[0], PROMPT[1][:31]]),
                ],
            ),
            "events[1].block_hashes[1]",
        ),
        (
            pb.KVEventBatch(
                worker_id="w0", events=[pb.KVEvent(kind=pb.KV_EVENT_KIND_CLEARED, block_hashes=PROMPT[:1])]
            ),
            "events[0].block_hashes",
        ),
    ],
)
def test_publish_rejects_bad_events(batch: pb.KVEventBatch, field: str) -> None:
    async def body(_: RunningServer, stub: cache_store_pb2_grpc.CacheStoreStub) -> None:
        await register(stub, "w0")
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await publish_raw(stub, [batch])
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in (raised.value.details() or "")
        assert await lookup(stub, PROMPT) == [], "a bad batch is applied not at all"

    run_with_store(body)


def test_lookup_rejects_a_bad_hash_length() -> None:
    async def body(_: RunningServer, stub: cache_store_pb2_grpc.CacheStoreStub) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await lookup(stub, [PROMPT[0], b"short"])
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "block_hashes[1] is 5 bytes" in (raised.value.details() or "")

    run_with_store(body)


def test_a_cleared_kv_event_carries_no_hashes() -> None:
    assert KVEvent(KVEventKind.CLEARED).block_hashes == ()
    with pytest.raises(ValueError, match="CLEARED"):
        KVEvent(KVEventKind.CLEARED, (PROMPT[0],))


def test_inventory_is_cleared_then_stored_in_batches_of_bounded_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kv_events, "MAX_HASHES_PER_BATCH", 3)
    batches = kv_events._inventory_batches("w0", PROMPT[:7])
    assert [b.worker_id for b in batches] == ["w0"] * 3
    assert [[(e.kind, list(e.block_hashes)) for e in b.events] for b in batches] == [
        [(pb.KV_EVENT_KIND_CLEARED, []), (pb.KV_EVENT_KIND_STORED, PROMPT[:3])],
        [(pb.KV_EVENT_KIND_STORED, PROMPT[3:6])],
        [(pb.KV_EVENT_KIND_STORED, PROMPT[6:7])],
    ]
    [empty] = kv_events._inventory_batches("w0", [])
    assert [e.kind for e in empty.events] == [pb.KV_EVENT_KIND_CLEARED]
