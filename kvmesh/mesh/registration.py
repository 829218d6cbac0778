"""A worker's membership in the mesh: register with the cache store, then heartbeat its load.

The cache store is soft state: when it forgets a worker (restart, expiry), the next heartbeat answers
`known=false` and the worker registers again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import grpc

from kvmesh.mesh.convert import load_to_proto, worker_to_proto
from kvmesh.mesh.kv_events import KVEventSource, publish_kv_events
from kvmesh.mesh.server import RunningServer
from kvmesh.mesh.tls import TLSConfig, mesh_channel
from kvmesh.mesh.worker_config import RegistrationSettings
from kvmesh.mesh.workers import WorkerInfo, WorkerLoad, WorkerRole
from kvmesh.v1 import cache_store_pb2, cache_store_pb2_grpc

logger = logging.getLogger(__name__)

RETRY_S = 0.2
"""Pause before trying again when the cache store cannot be reached, in seconds."""
CALL_TIMEOUT_S = 1.0
"""Deadline of a Register or Heartbeat call, in seconds: a hung cache store delays the retry this long."""
STORE_CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 250),
)
"""Reconnect within a fraction of a second of a cache store's restart. gRPC's default backoff grows to two
minutes (1.3-3.4 s measured after a restart), and until the worker has registered again, the store lists
no worker and holds no inventory of it."""


def worker_info(
    settings: RegistrationSettings, role: WorkerRole, port: int, model_fingerprint: str, block_size: int
) -> WorkerInfo:
    """What the worker registers as; block_size is its engine's (Engine.block_size)."""
    address = f"{settings.advertise_host}:{port}"
    return WorkerInfo(
        worker_id=settings.worker_id or f"{role.value}@{address}",
        role=role,
        address=address,
        block_size=block_size,
        host_id=settings.host_id,
        transports=settings.transports,
        model_fingerprint=model_fingerprint,
    )


def join_mesh(
    running: RunningServer,
    settings: RegistrationSettings,
    worker: WorkerInfo,
    load: Callable[[], WorkerLoad],
    kv_events: KVEventSource,
    tls: TLSConfig | None = None,
) -> None:
    """Background tasks of a worker's server: registration with heartbeats, and its KV event stream.

    tls: the worker's mesh identity (its server's), presented to the cache store; None: plaintext."""
    registered = asyncio.Event()
    running.supervise("registration", lambda: keep_registered(settings, worker, load, registered, tls=tls))

    async def publish_once_registered() -> None:
        # The cache store refuses events from a worker it does not know yet.
        await registered.wait()
        await publish_kv_events(settings.cache_store_address, worker.worker_id, kv_events, tls=tls)

    running.supervise("kv-events", publish_once_registered)


async def keep_registered(
    settings: RegistrationSettings,
    worker: WorkerInfo,
    load: Callable[[], WorkerLoad],
    registered: asyncio.Event | None = None,
    *,
    tls: TLSConfig | None = None,
) -> None:
    """Register, then heartbeat every interval the cache store asks for; runs until cancelled.

    `registered` is set after the first successful registration. tls: as for join_mesh.
    """
    async with mesh_channel(
        settings.cache_store_address, tls, "cache-store", STORE_CHANNEL_OPTIONS
    ) as channel:
        stub = cache_store_pb2_grpc.CacheStoreStub(channel)
        is_registered = False
        interval_s = RETRY_S
        last_error: grpc.StatusCode | None = None
        while True:
            try:
                if not is_registered:
                    reply = await stub.Register(
                        cache_store_pb2.RegisterRequest(worker=worker_to_proto(worker)),
                        timeout=CALL_TIMEOUT_S,
                    )
                    interval_s = reply.heartbeat_interval_ms / 1000.0
                    is_registered = True
                    if registered is not None:
                        registered.set()
                    logger.info("registered %s with the cache store", worker.worker_id)
                    last_error = None
                heartbeat = await stub.Heartbeat(
                    cache_store_pb2.HeartbeatRequest(worker_id=worker.worker_id, load=load_to_proto(load())),
                    timeout=CALL_TIMEOUT_S,
                )
                is_registered = heartbeat.known
                await asyncio.sleep(interval_s if is_registered else 0)
            except grpc.aio.AioRpcError as error:
                # The details say what to fix when the cache store refuses the worker (another block size).
                # One warning per outage and cause, not one per retry while the store is down.
                log = logger.debug if error.code() == last_error else logger.warning
                log("cache store %s: %s %s", settings.cache_store_address, error.code().name, error.details())
                last_error = error.code()
                is_registered = False
                await asyncio.sleep(RETRY_S)
