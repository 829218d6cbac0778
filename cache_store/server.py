"""gRPC edge of the cache store: kvmesh.v1.CacheStore over a WorkerRegistry and a BlockIndex.

Each method decodes the request into registry and index types, calls them and encodes the reply; all
validation of client input happens in the decode functions, so the core sees only valid workers and
32-byte hashes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio

from cache_store.index import BlockIndex, KVEventKind
from cache_store.registry import WorkerRegistry
from kvmesh.engine.block_hash import HASH_BYTES
from kvmesh.mesh.server import RunningServer, ServerConfig, ServiceError, start_server
from kvmesh.mesh.workers import WorkerInfo, WorkerLoad, WorkerRole
from kvmesh.v1 import cache_store_pb2, cache_store_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = cache_store_pb2.DESCRIPTOR.services_by_name["CacheStore"].full_name

_ROLE_FROM_PROTO = {
    cache_store_pb2.WORKER_ROLE_PREFILL: WorkerRole.PREFILL,
    cache_store_pb2.WORKER_ROLE_DECODE: WorkerRole.DECODE,
}
_ROLE_TO_PROTO = {role: value for value, role in _ROLE_FROM_PROTO.items()}
_KIND_FROM_PROTO = {
    cache_store_pb2.KV_EVENT_KIND_STORED: KVEventKind.STORED,
    cache_store_pb2.KV_EVENT_KIND_REMOVED: KVEventKind.REMOVED,
    cache_store_pb2.KV_EVENT_KIND_CLEARED: KVEventKind.CLEARED,
}

KVEventUpdate = tuple[KVEventKind, Sequence[bytes]]
"""A decoded KV event: what happened, and to which block hashes."""


@dataclass(frozen=True)
class CacheStoreConfig:
    """Cache store settings, read once at the process edge."""

    host: str = "127.0.0.1"
    """Interface to bind."""
    port: int = 0
    """TCP port of the gRPC server; 0 picks a free one."""
    heartbeat_interval_ms: int = 1000
    """How often workers are told to heartbeat, in milliseconds."""
    expiry_ms: int = 5000
    """A worker with no heartbeat for this long is dropped, in milliseconds."""
    grace_s: float = 5.0
    """Seconds in-flight calls get to finish on shutdown."""

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_interval_ms < self.expiry_ms:
            raise ValueError(
                f"need 0 < heartbeat_interval_ms ({self.heartbeat_interval_ms}) < expiry_ms ({self.expiry_ms})"
            )

    def server_config(self) -> ServerConfig:
        return ServerConfig(host=self.host, port=self.port, grace_s=self.grace_s)


def _invalid(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message)


def _not_registered(worker_id: str) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.FAILED_PRECONDITION, f"worker {worker_id} is not registered: register first"
    )


def load_from_proto(load: cache_store_pb2.WorkerLoad, field: str) -> WorkerLoad:
    """Decodes and checks a WorkerLoad; field names it in error messages. Raises ServiceError."""
    for name in ("num_running", "num_waiting", "num_blocks_free", "num_blocks_total"):
        if getattr(load, name) < 0:
            raise _invalid(f"{field}.{name} must be >= 0, got {getattr(load, name)}")
    if load.num_blocks_free > load.num_blocks_total:
        raise _invalid(
            f"{field}.num_blocks_free ({load.num_blocks_free}) exceeds "
            f"{field}.num_blocks_total ({load.num_blocks_total})"
        )
    return WorkerLoad(
        num_running=load.num_running,
        num_waiting=load.num_waiting,
        num_blocks_free=load.num_blocks_free,
        num_blocks_total=load.num_blocks_total,
    )


def load_to_proto(load: WorkerLoad) -> cache_store_pb2.WorkerLoad:
    return cache_store_pb2.WorkerLoad(
        num_running=load.num_running,
        num_waiting=load.num_waiting,
        num_blocks_free=load.num_blocks_free,
        num_blocks_total=load.num_blocks_total,
    )


def worker_from_proto(worker: cache_store_pb2.WorkerInfo, field: str = "worker") -> WorkerInfo:
    """Decodes and checks a WorkerInfo; field names it in error messages. Raises ServiceError."""
    if not worker.worker_id:
        raise _invalid(f"{field}.worker_id is empty: set a unique id for the worker")
    role = _ROLE_FROM_PROTO.get(worker.role)
    if role is None:
        raise _invalid(f"{field}.role must be WORKER_ROLE_PREFILL or WORKER_ROLE_DECODE")
    if not worker.address:
        raise _invalid(f"{field}.address is empty: set the worker's gRPC address as host:port")
    host, sep, port = worker.address.rpartition(":")
    if not (sep and host and port.isdigit()):
        raise _invalid(f"{field}.address must be host:port, got {worker.address!r}")
    if any(not t for t in worker.transports):
        raise _invalid(f"{field}.transports holds an empty name")
    return WorkerInfo(
        worker_id=worker.worker_id,
        role=role,
        address=worker.address,
        host_id=worker.host_id,
        transports=tuple(worker.transports),
        load=load_from_proto(worker.load, f"{field}.load"),
        model_fingerprint=worker.model_fingerprint,
    )


def worker_to_proto(worker: WorkerInfo) -> cache_store_pb2.WorkerInfo:
    return cache_store_pb2.WorkerInfo(
        worker_id=worker.worker_id,
        role=_ROLE_TO_PROTO[worker.role],
        address=worker.address,
        host_id=worker.host_id,
        transports=list(worker.transports),
        load=load_to_proto(worker.load),
        model_fingerprint=worker.model_fingerprint,
    )


def block_hashes_from_proto(block_hashes: Sequence[bytes], field: str) -> Sequence[bytes]:
    """Checks that every hash is a SHA-256 digest; field names the list in error messages.

    Raises ServiceError (INVALID_ARGUMENT) naming the first bad hash.
    """
    for position, block_hash in enumerate(block_hashes):
        if len(block_hash) != HASH_BYTES:
            raise _invalid(
                f"{field}[{position}] is {len(block_hash)} bytes: block hashes are {HASH_BYTES}-byte "
                "SHA-256 digests from kvmesh.engine.block_hash"
            )
    return block_hashes


def events_from_proto(batch: cache_store_pb2.KVEventBatch) -> list[KVEventUpdate]:
    """Decodes and checks a batch's events, all of them before any is applied. Raises ServiceError."""
    updates: list[KVEventUpdate] = []
    for position, event in enumerate(batch.events):
        field = f"events[{position}]"
        kind = _KIND_FROM_PROTO.get(event.kind)
        if kind is None:
            raise _invalid(
                f"{field}.kind must be KV_EVENT_KIND_STORED, KV_EVENT_KIND_REMOVED or KV_EVENT_KIND_CLEARED"
            )
        if kind is KVEventKind.CLEARED and event.block_hashes:
            raise _invalid(f"{field}.block_hashes must be empty for KV_EVENT_KIND_CLEARED")
        updates.append((kind, block_hashes_from_proto(event.block_hashes, f"{field}.block_hashes")))
    return updates


class _EventStreams:
    """The open PublishKVEvents calls by worker, so that a worker's expiry can end them.

    NOTE: an expired worker's hashes leave the index, but its stream, if it is still open, would go on
    sending only changes. Ending the stream makes the worker reconnect, which re-sends its inventory
    once it has registered again.
    """

    def __init__(self) -> None:
        self._tasks: dict[str, set[asyncio.Task[Any]]] = {}
        self._ended: set[asyncio.Task[Any]] = set()

    def add(self, worker_id: str, task: asyncio.Task[Any]) -> None:
        """Tracks the task that handles one of worker_id's streams."""
        self._tasks.setdefault(worker_id, set()).add(task)

    def discard(self, worker_id: str, task: asyncio.Task[Any]) -> None:
        """Forgets a finished stream handler."""
        tasks = self._tasks.get(worker_id, set())
        tasks.discard(task)
        if not tasks:
            self._tasks.pop(worker_id, None)
        self._ended.discard(task)

    def end(self, worker_id: str) -> None:
        """Cancels the handlers of worker_id's streams; they answer FAILED_PRECONDITION."""
        for task in self._tasks.get(worker_id, ()):
            self._ended.add(task)
            task.cancel()

    def was_ended(self, task: asyncio.Task[Any]) -> bool:
        """True when end() cancelled task (rather than the client or a server shutdown)."""
        return task in self._ended


class CacheStoreServicer(cache_store_pb2_grpc.CacheStoreServicer):
    """kvmesh.v1.CacheStore: the worker registry and the block index over gRPC."""

    def __init__(self, registry: WorkerRegistry, index: BlockIndex, config: CacheStoreConfig) -> None:
        self._registry = registry
        self._index = index
        self._config = config
        self._streams = _EventStreams()

    def expire_workers(self) -> list[str]:
        """Drops the workers whose heartbeat is overdue, with their hashes; ends their event streams.

        Returns the ids of the workers dropped.
        """
        expired = self._registry.expire()
        for worker_id in expired:
            self._index.drop_worker(worker_id)
            self._streams.end(worker_id)
        return expired

    async def Register(
        self, request: cache_store_pb2.RegisterRequest, context: grpc.aio.ServicerContext
    ) -> cache_store_pb2.RegisterReply:
        worker = worker_from_proto(request.worker)
        # NOTE: a worker registering again keeps its hashes in the index: its event stream, if open,
        # has kept them current, and a reconnecting stream starts with the full inventory anyway.
        self._registry.register(worker)
        logger.info("registered %s worker %s at %s", worker.role.value, worker.worker_id, worker.address)
        return cache_store_pb2.RegisterReply(
            heartbeat_interval_ms=self._config.heartbeat_interval_ms, expiry_ms=self._config.expiry_ms
        )

    async def Heartbeat(
        self, request: cache_store_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> cache_store_pb2.HeartbeatReply:
        if not request.worker_id:
            raise _invalid("worker_id is empty: send the id the worker registered with")
        known = self._registry.heartbeat(request.worker_id, load_from_proto(request.load, "load"))
        return cache_store_pb2.HeartbeatReply(known=known)

    async def ListWorkers(
        self, request: cache_store_pb2.ListWorkersRequest, context: grpc.aio.ServicerContext
    ) -> cache_store_pb2.ListWorkersReply:
        if request.role != cache_store_pb2.WORKER_ROLE_UNSPECIFIED and request.role not in _ROLE_FROM_PROTO:
            raise _invalid(f"role {request.role} is not a known WorkerRole")
        role = _ROLE_FROM_PROTO.get(request.role)
        workers = self._registry.list_workers(role)
        return cache_store_pb2.ListWorkersReply(workers=[worker_to_proto(w) for w in workers])

    async def PublishKVEvents(
        self,
        request_iterator: AsyncIterator[cache_store_pb2.KVEventBatch],
        context: grpc.aio.ServicerContext,
    ) -> cache_store_pb2.PublishKVEventsReply:
        """Applies one worker's batches in order, each whole or not at all; replies when the stream ends.

        Ends the call with FAILED_PRECONDITION when the worker is not registered or expires, and with
        INVALID_ARGUMENT on a bad batch; the batches before it stay applied.
        """
        task = asyncio.current_task()
        assert task is not None
        worker_id = ""
        num_events = 0
        try:
            async for batch in request_iterator:
                if not batch.worker_id:
                    raise _invalid("worker_id is empty: send the id the worker registered with")
                if not worker_id:
                    worker_id = batch.worker_id
                    self._streams.add(worker_id, task)
                elif batch.worker_id != worker_id:
                    raise _invalid(
                        f"worker_id changed on the stream from {worker_id} to {batch.worker_id}: "
                        "open one stream per worker"
                    )
                if not self._registry.is_live(worker_id):
                    raise _not_registered(worker_id)
                for kind, block_hashes in events_from_proto(batch):
                    self._index.apply(worker_id, kind, block_hashes)
                num_events += len(batch.events)
        except asyncio.CancelledError:
            if not self._streams.was_ended(task):
                raise  # the client went away, or the server is stopping
            task.uncancel()
            raise ServiceError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"worker {worker_id} expired: register again, then reconnect to re-send the inventory",
            ) from None
        finally:
            if worker_id:
                self._streams.discard(worker_id, task)
        return cache_store_pb2.PublishKVEventsReply(num_events=num_events)

    async def Lookup(
        self, request: cache_store_pb2.LookupRequest, context: grpc.aio.ServicerContext
    ) -> cache_store_pb2.LookupReply:
        """Longest held prefix per live worker, longest first, ties by worker_id; changes nothing."""
        block_hashes = block_hashes_from_proto(request.block_hashes, "block_hashes")
        num_blocks = self._index.longest_prefixes(block_hashes, self._registry.live_worker_ids())
        matches = sorted(num_blocks.items(), key=lambda match: (-match[1], match[0]))
        return cache_store_pb2.LookupReply(
            matches=[cache_store_pb2.PrefixMatch(worker_id=w, num_blocks=n) for w, n in matches]
        )


async def _expire_forever(servicer: CacheStoreServicer, period_s: float) -> None:
    while True:
        await asyncio.sleep(period_s)
        for worker_id in servicer.expire_workers():
            logger.info("worker %s expired (no heartbeat); its blocks left the index", worker_id)


async def serve(config: CacheStoreConfig) -> RunningServer:
    """Starts the cache store; it reports SERVING as soon as it listens (it has nothing to warm up)."""
    registry = WorkerRegistry(expiry_ms=config.expiry_ms)
    servicer = CacheStoreServicer(registry, BlockIndex(), config)
    running = await start_server(
        [(cache_store_pb2_grpc.add_CacheStoreServicer_to_server, servicer)],
        [SERVICE_NAME],
        config.server_config(),
    )
    # Sweeping frees memory and ends expired workers' event streams; lists and lookups already hide
    # expired workers between sweeps, so a coarse period does.
    period_s = config.expiry_ms / 1000.0 / 2
    running.add_background_task(asyncio.create_task(_expire_forever(servicer, period_s)))
    await running.set_serving()
    return running
