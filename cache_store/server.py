"""gRPC edge of the cache store: kvmesh.v1.CacheStore over a WorkerRegistry.

Each method decodes the request into registry types, calls the registry and encodes the reply; all
validation of client input happens in the decode functions, so the registry sees only valid workers.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc
import grpc.aio

from cache_store.registry import WorkerInfo, WorkerLoad, WorkerRegistry, WorkerRole
from kvmesh.server import RunningServer, ServerConfig, ServiceError, start_server
from kvmesh.v1 import cache_store_pb2, cache_store_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = cache_store_pb2.DESCRIPTOR.services_by_name["CacheStore"].full_name

_ROLE_FROM_PROTO = {
    cache_store_pb2.WORKER_ROLE_PREFILL: WorkerRole.PREFILL,
    cache_store_pb2.WORKER_ROLE_DECODE: WorkerRole.DECODE,
}
_ROLE_TO_PROTO = {role: value for value, role in _ROLE_FROM_PROTO.items()}


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
    )


def worker_to_proto(worker: WorkerInfo) -> cache_store_pb2.WorkerInfo:
    return cache_store_pb2.WorkerInfo(
        worker_id=worker.worker_id,
        role=_ROLE_TO_PROTO[worker.role],
        address=worker.address,
        host_id=worker.host_id,
        transports=list(worker.transports),
        load=load_to_proto(worker.load),
    )


class CacheStoreServicer(cache_store_pb2_grpc.CacheStoreServicer):
    """kvmesh.v1.CacheStore: the worker registry over gRPC."""

    def __init__(self, registry: WorkerRegistry, config: CacheStoreConfig) -> None:
        self._registry = registry
        self._config = config

    async def Register(
        self, request: cache_store_pb2.RegisterRequest, context: grpc.aio.ServicerContext
    ) -> cache_store_pb2.RegisterReply:
        worker = worker_from_proto(request.worker)
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


async def _expire_forever(registry: WorkerRegistry, period_s: float) -> None:
    while True:
        await asyncio.sleep(period_s)
        for worker_id in registry.expire():
            logger.info("worker %s expired (no heartbeat)", worker_id)


async def serve(config: CacheStoreConfig) -> RunningServer:
    """Starts the cache store; it reports SERVING as soon as it listens (it has nothing to warm up)."""
    registry = WorkerRegistry(expiry_ms=config.expiry_ms)
    servicer = CacheStoreServicer(registry, config)
    running = await start_server(
        [(cache_store_pb2_grpc.add_CacheStoreServicer_to_server, servicer)],
        [SERVICE_NAME],
        config.server_config(),
    )
    # Sweeping only frees memory (list_workers already hides expired workers), so a coarse period does.
    period_s = config.expiry_ms / 1000.0 / 2
    running.add_background_task(asyncio.create_task(_expire_forever(registry, period_s)))
    await running.set_serving()
    return running
