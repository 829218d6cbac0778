"""A worker's KV events: tell the cache store which block hashes it holds, so requests route to them.

The worker keeps one PublishKVEvents stream open. Every (re)connect starts with its whole inventory
(CLEARED, then STORED with every hash it holds), so a cache store that restarted, or that dropped the
worker when it expired, rebuilds what it knows of the worker without asking; after that the stream
carries only changes. Hashes only: no token or text ever leaves the worker this way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Protocol

import grpc
import grpc.aio

from kvmesh.engine.kv_event import KVEvent, KVEventKind
from kvmesh.mesh.convert import kv_events_to_proto
from kvmesh.mesh.tls import TLSConfig, mesh_channel
from kvmesh.v1 import cache_store_pb2, cache_store_pb2_grpc

logger = logging.getLogger(__name__)

MAX_HASHES_PER_BATCH = 16384
"""Most inventory hashes sent in one message (512 KiB of hashes), far below any gRPC message limit."""
CLOSE_TIMEOUT_S = 1.0
"""On cancel, how long to wait for the cache store to acknowledge the closed stream, in seconds."""


class KVEventSource(Protocol):
    """What publish_kv_events reads from: the worker's prefix cache.

    Both methods are called from the event loop's thread; the implementation makes them safe against
    the thread that changes the cache.
    """

    def take_events(self) -> list[KVEvent]:
        """The events since the last call, oldest first; empties the queue."""
        ...

    def inventory(self) -> list[bytes]:
        """Every block hash the worker holds now."""
        ...


async def publish_kv_events(
    cache_store_address: str,
    worker_id: str,
    source: KVEventSource,
    *,
    period_s: float = 0.02,
    retry_s: float = 0.2,
    tls: TLSConfig | None = None,
) -> None:
    """Streams source's events to the cache store as worker_id; runs until cancelled.

    tls: the worker's mesh identity, presented to the cache store; None: plaintext.

    Sends the inventory on every (re)connect, then every period_s the new events as one batch (none
    when there are none). Any RPC error (the cache store restarted, or does not know the worker yet:
    FAILED_PRECONDITION until it registers) is logged; the stream reconnects retry_s later. On
    cancel the stream is half-closed, so the cache store ends the call with OK.
    """
    # Reconnect attempts follow retry_s rather than gRPC's own backoff, which grows to two minutes.
    retry_ms = max(1, int(retry_s * 1000))
    options = [("grpc.initial_reconnect_backoff_ms", retry_ms), ("grpc.max_reconnect_backoff_ms", retry_ms)]
    async with mesh_channel(cache_store_address, tls, "cache-store", options) as channel:
        stub = cache_store_pb2_grpc.CacheStoreStub(channel)
        last_error: grpc.StatusCode | None = None

        def on_up() -> None:
            nonlocal last_error
            if last_error is not None:
                logger.info("publishing KV events to %s again", cache_store_address)
            last_error = None

        while True:
            try:
                await _publish_one_stream(stub, worker_id, source, period_s, on_up, up_after_s=retry_s)
                logger.warning("cache store %s ended the KV event stream", cache_store_address)
            except grpc.aio.AioRpcError as error:
                # One warning per outage and cause, not one per retry while the store is down.
                log = logger.debug if error.code() == last_error else logger.warning
                log("KV events to %s: %s %s", cache_store_address, error.code().name, error.details())
                last_error = error.code()
            await asyncio.sleep(retry_s)


async def _publish_one_stream(
    stub: cache_store_pb2_grpc.CacheStoreStub,
    worker_id: str,
    source: KVEventSource,
    period_s: float,
    on_up: Callable[[], None],
    up_after_s: float,
) -> None:
    """Sends the inventory, then changes, until the call ends; raises its AioRpcError if it failed.

    Calls on_up once the stream has lived up_after_s (long enough for a refusal to have come back).
    """
    # NOTE: requests go through an Outbox the call reads, not call.write(): on a channel with client
    # interceptors (tracing) grpc.aio turns write() into an async generator read by a task of its own,
    # and when the cache store goes away that task is left pending forever ("Task was destroyed but it
    # is pending!" and an "aclose(): asynchronous generator is already running" traceback on every
    # reconnect). Closing the Outbox ends the reading task whatever state the call is in.
    outbox = _Outbox()
    call = stub.PublishKVEvents(outbox)
    try:
        # NOTE: events first, inventory second: the inventory supersedes every event queued before it,
        # and an event that lands between the two calls is repeated harmlessly (STORED and REMOVED are
        # idempotent), whereas the other order could lose one.
        source.take_events()
        for batch in _inventory_batches(worker_id, source.inventory()):
            if not _write(call, outbox, batch):
                break
        loop = asyncio.get_running_loop()
        up_at: float | None = loop.time() + up_after_s
        while not call.done():
            await asyncio.sleep(period_s)
            if up_at is not None and loop.time() >= up_at and not call.done():
                on_up()
                up_at = None
            # Taken even when the call has just ended: the next stream's inventory supersedes them.
            events = source.take_events()
            if events and not call.done():
                _write(
                    call,
                    outbox,
                    cache_store_pb2.KVEventBatch(worker_id=worker_id, events=kv_events_to_proto(events)),
                )
        await call  # raises the status the cache store ended the call with, unless it was OK
    except asyncio.CancelledError:
        await _close(call, outbox)
        raise
    finally:
        outbox.close()
        call.cancel()  # a no-op once the call is done


class _Outbox:
    """The request stream of one PublishKVEvents call: batches put here are sent in order; close() ends it.

    A plain async iterator, not an async generator: nothing for the event loop to finalize later.
    """

    def __init__(self) -> None:
        self._queue: asyncio.Queue[cache_store_pb2.KVEventBatch | None] = asyncio.Queue()
        self._closed = False

    def put(self, batch: cache_store_pb2.KVEventBatch) -> None:
        if not self._closed:
            self._queue.put_nowait(batch)

    def close(self) -> None:
        """Ends the stream after the batches already put (a half-close, if the call still runs)."""
        if not self._closed:
            self._closed = True
            self._queue.put_nowait(None)

    def __aiter__(self) -> _Outbox:
        return self

    async def __anext__(self) -> cache_store_pb2.KVEventBatch:
        batch = await self._queue.get()
        if batch is None:
            raise StopAsyncIteration
        return batch


def _write(call: grpc.aio.StreamUnaryCall, outbox: _Outbox, batch: cache_store_pb2.KVEventBatch) -> bool:
    """Queues batch; False when the cache store had already ended the call (its status tells why)."""
    if call.done():
        return False
    outbox.put(batch)
    return True


async def _close(call: grpc.aio.StreamUnaryCall, outbox: _Outbox) -> None:
    """Half-closes the stream and waits briefly for the reply, so the cache store sees a clean end."""
    outbox.close()
    if call.done():
        return
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT_S):
            await call
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError, TimeoutError):
        pass  # the call ends anyway: the caller cancels it next


def _inventory_batches(worker_id: str, inventory: Sequence[bytes]) -> list[cache_store_pb2.KVEventBatch]:
    """CLEARED then STORED(inventory), in one batch unless the inventory exceeds MAX_HASHES_PER_BATCH.

    NOTE: a huge pool's inventory is split so that no message grows with the cache; the cache store
    applies batches in order, so the split only delays when the last hashes become findable.
    """
    stored = [
        KVEvent(KVEventKind.STORED, tuple(inventory[start : start + MAX_HASHES_PER_BATCH]))
        for start in range(0, len(inventory), MAX_HASHES_PER_BATCH)
    ]
    groups = [[KVEvent(KVEventKind.CLEARED), *stored[:1]], *([event] for event in stored[1:])]
    return [cache_store_pb2.KVEventBatch(worker_id=worker_id, events=kv_events_to_proto(g)) for g in groups]
