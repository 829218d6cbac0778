"""The gateway's view of the workers: who is live, how loaded, and a channel to each.

The cache store is the source of truth for who is live (workers register and heartbeat there); the pool
re-reads it every refresh_ms, and keeps a worker the store stops listing for a grace period (a restarted
store lists nobody until the workers register again); snapshot() hands the workers, their loads and their block size to the cost
model (gateway.routing_cost), which chooses. Reported loads are only as fresh as the last heartbeat, so the
pool also counts the requests this gateway has in flight to each worker: a burst between two heartbeats
spreads out instead of piling onto one worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2
from opentelemetry import trace

from gateway.prefix_lookup import BlockHashes, PrefixLookup
from gateway.routing_cost import Candidate, PoolSnapshot, RoutePlan, RoutingConfig, plan_route
from kvmesh.mesh.convert import worker_from_proto
from kvmesh.mesh.errors import ServiceError
from kvmesh.mesh.server import RunningServer
from kvmesh.mesh.telemetry import tracer
from kvmesh.mesh.tls import TLSConfig, mesh_channel
from kvmesh.mesh.workers import WorkerInfo, WorkerRole
from kvmesh.v1 import cache_store_pb2, cache_store_pb2_grpc

logger = logging.getLogger(__name__)

ChannelOptions = Sequence[tuple[str, int | str]]
_STORE_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


@dataclass
class _InFlight:
    address: str
    num_requests: int = 0


class WorkerPool:
    """Live workers by role, refreshed from the cache store's ListWorkers in a background task.

    Between refreshes the list may hold a worker that just died; callers exclude a worker that failed
    them (plan_route's exclude) rather than waiting for the next refresh.
    """

    def __init__(
        self,
        cache_store_address: str,
        refresh_ms: int,
        channel_options: ChannelOptions = (),
        tls: TLSConfig | None = None,
        unlisted_grace_ms: int = 5000,
    ) -> None:
        """tls: the gateway's mesh identity for its channels to the cache store and the workers; None:
        plaintext. unlisted_grace_ms: how long a worker stays in the pool once the cache store stops
        listing it (see merge)."""
        if refresh_ms <= 0:
            raise ValueError(f"refresh_ms must be positive, got {refresh_ms}")
        if unlisted_grace_ms < 0:
            raise ValueError(f"unlisted_grace_ms must be >= 0, got {unlisted_grace_ms}")
        self._unlisted_grace_s = unlisted_grace_ms / 1000.0
        self._listed_at: dict[str, float] = {}
        """When the cache store last listed each worker in the pool, by worker_id (time.monotonic)."""
        self._cache_store_address = cache_store_address
        self._refresh_s = refresh_ms / 1000.0
        self._channel_options = list(channel_options)
        self._tls = tls
        self._workers: list[WorkerInfo] = []
        self._block_size: int | None = None
        self._in_flight: dict[str, _InFlight] = {}  # by worker_id
        self._channels: dict[str, grpc.aio.Channel] = {}  # by address
        self._stale_channels: list[grpc.aio.Channel] = []
        self._store_channel: grpc.aio.Channel | None = None
        self._refresh_task: asyncio.Task[None] | None = None
        self._refresh_failing = False

    async def start(self) -> None:
        """Reads the worker list once (a cache store that is not up yet is not an error), then keeps
        refreshing it in the background until close()."""
        # NOTE: reconnect within a second of a cache store restart; gRPC's default backoff grows to two
        # minutes, during which every lookup and refresh would fail fast.
        self._store_channel = mesh_channel(
            self._cache_store_address, self._tls, "cache-store", _STORE_CHANNEL_OPTIONS
        )
        await self.refresh()
        self._refresh_task = asyncio.create_task(self._refresh_forever())

    async def close(self) -> None:
        """Stops refreshing and closes every channel (which cancels calls still on them); idempotent."""
        if self._refresh_task is not None:
            self._refresh_task.cancel()
            await asyncio.gather(self._refresh_task, return_exceptions=True)
        channels = [*self._channels.values(), *self._stale_channels]
        if self._store_channel is not None:
            channels.append(self._store_channel)
            self._store_channel = None
        self._channels.clear()
        self._stale_channels.clear()
        await asyncio.gather(*(channel.close() for channel in channels), return_exceptions=True)

    async def refresh(self) -> bool:
        """One ListWorkers call; on failure the last known list stays. Returns whether it succeeded."""
        if self._store_channel is None:
            raise RuntimeError("call start() before refresh()")
        stub = cache_store_pb2_grpc.CacheStoreStub(self._store_channel)
        try:
            # Bounded, so a hung cache store delays the next refresh by a second at most, not forever.
            reply = await stub.ListWorkers(
                cache_store_pb2.ListWorkersRequest(), timeout=max(self._refresh_s, 1.0)
            )
        except grpc.aio.AioRpcError as error:
            if not self._refresh_failing:
                logger.warning(
                    "cannot list workers at %s (%s); keeping the last known %d",
                    self._cache_store_address,
                    error.code().name,
                    len(self._workers),
                )
            self._refresh_failing = True
            return False
        if self._refresh_failing:
            logger.info("cache store at %s answers again", self._cache_store_address)
        self._refresh_failing = False
        try:
            self.merge(_decode_workers(reply.workers))
        except ValueError as error:
            logger.error("keeping the last known workers: %s", error)
            return False
        await self._close_stale_channels()
        return True

    def merge(self, listed: Iterable[WorkerInfo], now: float | None = None) -> None:
        """Takes the workers the cache store lists now, and keeps those it no longer lists for
        unlisted_grace_ms after it last did (refresh calls it; now: time.monotonic(), for tests).

        NOTE: the cache store is soft state. After a restart it lists nobody until the workers have
        registered again (a heartbeat period, a reconnect): replacing the list would leave the gateway
        without a worker, failing every request meanwhile, although every worker is alive. A worker that
        really died stays listed by the store until its expiry anyway, and calls to it fail over (UNAVAILABLE
        excludes it from the request's next attempts); the grace only adds to how long that lasts.
        Raises ValueError, changing nothing, when the listed workers advertise different block sizes.
        """
        now = time.monotonic() if now is None else now
        fresh = {worker.worker_id: worker for worker in listed}
        sizes = {worker.block_size for worker in fresh.values()}
        if len(sizes) > 1:
            raise ValueError(f"the workers advertise different block sizes: {sorted(sizes)}")
        kept = []
        for worker in self._workers:
            if worker.worker_id in fresh:
                continue
            unlisted_s = now - self._listed_at.get(worker.worker_id, now)
            if unlisted_s > self._unlisted_grace_s:
                logger.info("worker %s left the pool (unlisted for %.1f s)", worker.worker_id, unlisted_s)
            elif sizes and worker.block_size not in sizes:
                logger.info(
                    "worker %s left the pool (the listed workers have another block size)", worker.worker_id
                )
            else:
                kept.append(worker)
        self.update([*fresh.values(), *kept])  # keeps the kept workers' listing times
        self._listed_at.update(dict.fromkeys(fresh, now))

    def update(self, workers: Iterable[WorkerInfo]) -> None:
        """Replaces the worker list (merge calls it; tests call it directly).

        Raises ValueError, changing nothing, when the workers advertise different block sizes (the cache
        store refuses such a worker, so only a broken store sends them).
        """
        workers = sorted(workers, key=lambda worker: worker.worker_id)
        block_sizes = {worker.block_size for worker in workers}
        if len(block_sizes) > 1:
            raise ValueError(f"the workers advertise different block sizes: {sorted(block_sizes)}")
        self._workers = workers
        self._block_size = block_sizes.pop() if block_sizes else None
        now = time.monotonic()
        self._listed_at = {worker.worker_id: self._listed_at.get(worker.worker_id, now) for worker in workers}
        # NOTE: a channel is closed only once no live worker has its address and no call uses it:
        # closing a channel cancels its calls, and a worker that misses one heartbeat may still stream.
        live = {worker.address for worker in self._workers}
        busy = {entry.address for entry in self._in_flight.values()}
        for address in [a for a in self._channels if a not in live and a not in busy]:
            self._stale_channels.append(self._channels.pop(address))

    @property
    def block_size(self) -> int | None:
        """Tokens per KV block that the live workers advertise (all alike); None while no worker is known."""
        return self._block_size

    def snapshot(self) -> PoolSnapshot:
        """The live workers with their loads now, for plan_route; not updated by later changes."""
        return PoolSnapshot(
            decode=tuple(Candidate(w, self.load(w)) for w in self.workers(WorkerRole.DECODE)),
            prefill=tuple(Candidate(w, self.load(w)) for w in self.workers(WorkerRole.PREFILL)),
            block_size=self._block_size or 0,
        )

    def store_channel(self) -> grpc.aio.Channel:
        """The channel to the cache store (for Lookup); valid between start() and close()."""
        if self._store_channel is None:
            raise RuntimeError("call start() before store_channel()")
        return self._store_channel

    def workers(self, role: WorkerRole) -> list[WorkerInfo]:
        """Live workers of one role, ordered by worker_id."""
        return [worker for worker in self._workers if worker.role == role]

    def workers_of_all_roles(self) -> list[WorkerInfo]:
        """Every live worker, ordered by worker_id."""
        return list(self._workers)

    def load(self, worker: WorkerInfo) -> int:
        """Reported running + waiting requests plus this gateway's in-flight requests to the worker."""
        # NOTE: this counts a request twice once a heartbeat reports it; the overcount is the same kind on
        # every worker, so the order of routes stays right, and it never hides a burst the way max() would.
        return worker.load.num_running + worker.load.num_waiting + self.num_in_flight(worker.worker_id)

    def num_in_flight(self, worker_id: str) -> int:
        entry = self._in_flight.get(worker_id)
        return entry.num_requests if entry is not None else 0

    @contextlib.contextmanager
    def in_flight(self, worker: WorkerInfo) -> Iterator[None]:
        """Counts one request of this gateway in flight to worker for the duration of the block."""
        entry = self._in_flight.setdefault(worker.worker_id, _InFlight(worker.address))
        entry.num_requests += 1
        try:
            yield
        finally:
            entry.num_requests -= 1
            if entry.num_requests == 0:
                del self._in_flight[worker.worker_id]

    def channel(self, worker: WorkerInfo) -> grpc.aio.Channel:
        """A shared channel to worker's address, created on first use."""
        channel = self._channels.get(worker.address)
        if channel is None:
            channel = mesh_channel(worker.address, self._tls, worker.role.value, self._channel_options)
            self._channels[worker.address] = channel
        return channel

    async def _close_stale_channels(self) -> None:
        stale, self._stale_channels = self._stale_channels, []
        await asyncio.gather(*(channel.close() for channel in stale), return_exceptions=True)

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_s)
            await self.refresh()


class Router:
    """Plans routes: hashes the prompt in the workers' block size, asks the cache store who holds it, then
    plan_route."""

    def __init__(self, pool: WorkerPool, lookup: PrefixLookup, config: RoutingConfig) -> None:
        self._pool = pool
        self._lookup = lookup
        self._config = config
        self._tracer = tracer(__name__)

    async def plan(
        self,
        token_ids: Sequence[int],
        cache_salt: str,
        exclude: AbstractSet[str] = frozenset(),
        block_hashes: BlockHashes | None = None,
    ) -> RoutePlan | None:
        """The route for a prompt, None without decode workers. The decision and its inputs become
        attributes of the current span (the request's "route" span); the lookup is a child span.
        block_hashes: the prompt's hashes when the caller keeps them (PrefixLookup.find)."""
        block_size = self._pool.block_size
        if block_size is None:
            return None
        workers = [(w.worker_id, w.model_fingerprint) for w in self._pool.workers_of_all_roles()]
        with self._tracer.start_as_current_span("cache_lookup") as lookup_span:
            found = await self._lookup.find(token_ids, cache_salt, workers, block_size, block_hashes)
            lookup_span.set_attributes(
                {
                    "kvmesh.cache_lookup": found.status,
                    "kvmesh.prompt_blocks": found.num_prompt_blocks,
                    "kvmesh.num_workers_hit": len(found.cached_blocks),
                    "kvmesh.lookup_ms": found.lookup_ms,
                }
            )
        # Taken after the lookup's await, so loads include requests routed meanwhile.
        snapshot = self._pool.snapshot()
        # NOTE: hits count blocks of the size the prompt was hashed in; should the mesh have turned over
        # to workers of another block size meanwhile, they would count the wrong blocks.
        cached_blocks = found.cached_blocks if snapshot.block_size == block_size else {}
        plan = plan_route(snapshot, cached_blocks, len(token_ids), self._config, exclude)
        span = trace.get_current_span()
        span.set_attribute("kvmesh.cache_lookup", found.status)
        if plan is not None:
            span.set_attributes(plan.attributes())
        return plan


def _decode_workers(workers: Iterable[cache_store_pb2.WorkerInfo]) -> list[WorkerInfo]:
    decoded = []
    for proto in workers:
        try:
            decoded.append(worker_from_proto(proto))
        except ServiceError as error:
            # The cache store validates on Register, so this means a newer store with a role we don't know.
            logger.warning("skipping worker %s from the cache store: %s", proto.worker_id, error.message)
    return decoded


async def watch_pool(running: RunningServer, pool: WorkerPool, period_s: float) -> None:
    """Keeps health SERVING while at least one decode worker is live, NOT_SERVING otherwise; closes the
    pool when the server stops."""
    serving = False
    try:
        while True:
            has_decode = bool(pool.workers(WorkerRole.DECODE))
            if has_decode and not serving:
                await running.set_serving()
                logger.info("a decode worker is live: SERVING")
            elif serving and not has_decode:
                for name in ("", *running.service_names):
                    await running.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
                logger.warning("no decode worker is live: NOT_SERVING")
            serving = has_decode
            await asyncio.sleep(period_s)
    finally:
        # NOTE: RunningServer.stop cancels background tasks only after in-flight calls have drained;
        # closing the pool earlier would cancel the downstream calls they are waiting on.
        await pool.close()
