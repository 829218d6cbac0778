"""gRPC edge of the cache store: kvmesh.v1.CacheStore over a WorkerRegistry and a BlockIndex.

Each method decodes the request into registry and index types (kvmesh.mesh.convert), calls them and
encodes the reply; the decode functions check the client's input, so the core sees only valid workers
and 32-byte hashes. The registry alone knows whether a worker fits the mesh (its block size).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio

from cache_store.index import BlockIndex
from cache_store.registry import IncompatibleWorker, WorkerRegistry
from kvmesh.mesh.convert import (
    block_hashes_from_proto,
    kv_events_from_proto,
    load_from_proto,
    role_from_proto,
    worker_from_proto,
    worker_to_proto,
)
from kvmesh.mesh.errors import ServiceError, invalid
from kvmesh.mesh.server import RunningServer, ServerConfig, start_server
from kvmesh.mesh.tls import TLSConfig
from kvmesh.v1 import cache_store_pb2, cache_store_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = cache_store_pb2.DESCRIPTOR.services_by_name["CacheStore"].full_name


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
    tls: TLSConfig | None = None
    """Mutual TLS: the cache store's mesh identity (ServerConfig.tls); None: plaintext."""
    health_port: int | None = None
    """Plaintext health port for probes (ServerConfig.health_port)."""

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_interval_ms < self.expiry_ms:
            raise ValueError(
                f"need 0 < heartbeat_interval_ms ({self.heartbeat_interval_ms}) < expiry_ms ({self.expiry_ms})"
            )

    def server_config(self) -> ServerConfig:
        return ServerConfig(
            host=self.host, port=self.port, grace_s=self.grace_s, tls=self.tls, health_port=self.health_port
        )


def _not_registered(worker_id: str) -> ServiceError:
    return ServiceError(
        grpc.StatusCode.FAILED_PRECONDITION, f"worker {worker_id} is not registered: register first"
    )


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
        try:
            self._registry.register(worker)
        except IncompatibleWorker as error:
            raise ServiceError(grpc.StatusCode.FAILED_PRECONDITION, str(error)) from None
        logger.info("registered %s worker %s at %s", worker.role.value, worker.worker_id, worker.address)
        return cache_store_pb2.RegisterReply(
            heartbeat_interval_ms=self._config.heartbeat_interval_ms, expiry_ms=self._config.expiry_ms
        )

    async def Heartbeat(
        self, request: cache_store_pb2.HeartbeatRequest, context: grpc.aio.ServicerContext
    ) -> cache_store_pb2.HeartbeatReply:
        if not request.worker_id:
            raise invalid("worker_id is empty: send the id the worker registered with")
        known = self._registry.heartbeat(request.worker_id, load_from_proto(request.load, "load"))
        return cache_store_pb2.HeartbeatReply(known=known)

    async def ListWorkers(
        self, request: cache_store_pb2.ListWorkersRequest, context: grpc.aio.ServicerContext
    ) -> cache_store_pb2.ListWorkersReply:
        workers = self._registry.list_workers(role_from_proto(request.role, "role"))
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
                    raise invalid("worker_id is empty: send the id the worker registered with")
                if not worker_id:
                    worker_id = batch.worker_id
                    self._streams.add(worker_id, task)
                elif batch.worker_id != worker_id:
                    raise invalid(
                        f"worker_id changed on the stream from {worker_id} to {batch.worker_id}: "
                        "open one stream per worker"
                    )
                if not self._registry.is_live(worker_id):
                    raise _not_registered(worker_id)
                for event in kv_events_from_proto(batch):
                    self._index.apply(worker_id, event)
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
