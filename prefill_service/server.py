"""gRPC edge of the prefill worker: kvmesh.v1.Prefill over an engine.

Prefill computes a prompt's KV in this worker's own pool, a chunk per forward pass, then ships the
blocks to the decode worker's reserved blocks: written straight into its shared-memory pool ("shm"),
or streamed back as checksummed chunks ("grpc"). One prompt computes at a time; a cancelled request
stops at the next chunk boundary.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator

import grpc
from prometheus_client.registry import REGISTRY

from kvmesh.engine.engine import Engine
from kvmesh.engine.kv_cache import OutOfBlocks, num_blocks_for_tokens
from kvmesh.engine.sequence import Sequence
from kvmesh.mesh.convert import invalid, layout_from_proto
from kvmesh.mesh.registration import join_mesh, worker_info
from kvmesh.mesh.server import RunningServer, ServiceError, start_server
from kvmesh.mesh.telemetry import start_metrics_server, tracer
from kvmesh.mesh.worker_config import load_engine
from kvmesh.mesh.worker_metrics import register_worker_metrics
from kvmesh.mesh.workers import WorkerLoad, WorkerRole
from kvmesh.transport.base import KVDestination, make_sender
from kvmesh.transport.grpc_stream import iter_chunks
from kvmesh.v1 import prefill_pb2, prefill_pb2_grpc
from prefill_service.config import PrefillConfig

logger = logging.getLogger(__name__)
SERVICE_NAME = prefill_pb2.DESCRIPTOR.services_by_name["Prefill"].full_name
_tracer = tracer(__name__)


class PrefillServicer(prefill_pb2_grpc.PrefillServicer):
    def __init__(self, engine: Engine, config: PrefillConfig) -> None:
        self._engine = engine
        self._config = config
        # NOTE: the engine is single-threaded: one prompt computes at a time, and blocks are only
        # reserved or freed under this lock, never while another request's chunk runs in a thread.
        self._lock = asyncio.Lock()
        self._senders = {
            name: make_sender(name) for name in ("shm",) if name in config.registration.transports
        }
        self._pending_frees: set[asyncio.Future[None]] = set()
        self.num_running = 0
        self.num_waiting = 0

    async def Prefill(  # noqa: N802 (generated name)
        self, request: prefill_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[prefill_pb2.PrefillChunk]:
        dest = self._destination(request)
        seq: Sequence | None = None
        try:
            self.num_waiting += 1
            try:
                await self._lock.acquire()
            finally:
                self.num_waiting -= 1
            self.num_running += 1
            try:
                seq = self._new_sequence(request)
                prefill_ms = await self._compute(seq)
            finally:
                self.num_running -= 1
                self._lock.release()
            dest_first = request.destination.first_block
            with _tracer.start_as_current_span("ship") as span:
                span.set_attribute("kvmesh.transport", dest.transport)
                started = time.perf_counter()
                if dest.transport == "grpc":
                    chunks = iter_chunks(self._engine.pool, seq.block_table[dest_first:], dest=dest)
                    for chunk in chunks:
                        yield prefill_pb2.PrefillChunk(
                            data=prefill_pb2.KVData(
                                offset_bytes=chunk.offset_bytes, payload=chunk.payload, crc32=chunk.crc32
                            )
                        )
                    num_bytes, crc32 = chunks.num_bytes, chunks.crc32
                else:
                    stats = await self._senders[dest.transport].send(
                        self._engine.pool, seq.block_table[dest_first:], dest
                    )
                    num_bytes, crc32 = stats.num_bytes, 0
                transfer_ms = (time.perf_counter() - started) * 1000.0
                span.set_attribute("kvmesh.num_bytes", num_bytes)
            yield prefill_pb2.PrefillChunk(
                done=prefill_pb2.PrefillDone(
                    num_tokens=len(seq) - seq.num_cached_tokens,
                    num_bytes=num_bytes,
                    prefill_ms=prefill_ms,
                    transfer_ms=transfer_ms,
                    crc32=crc32,
                )
            )
        finally:
            if seq is not None:
                self._free(seq)

    def _destination(self, request: prefill_pb2.PrefillRequest) -> KVDestination:
        if not request.token_ids:
            raise invalid("token_ids is empty: nothing to prefill")
        spec = request.destination
        offered = ("grpc", *self._senders)
        if spec.transport not in offered:
            raise invalid(
                f"destination.transport {spec.transport!r} is not offered here (offered: {', '.join(offered)})"
            )
        if spec.transport == "shm" and spec.host_id != self._config.registration.host_id:
            raise invalid("destination.transport 'shm' needs the decode worker on this prefill worker's host")
        if self._config.require_cache_salt and not request.cache_salt:
            raise invalid("cache_salt is empty: with multi-tenancy on, every request needs its tenant's salt")
        num_blocks = num_blocks_for_tokens(len(request.token_ids), self._engine.block_size)
        if not 0 <= spec.first_block < num_blocks:
            raise invalid(f"destination.first_block must be in [0, {num_blocks}), got {spec.first_block}")
        needed = num_blocks - spec.first_block
        if len(spec.block_ids) != needed:
            raise invalid(
                f"destination.block_ids has {len(spec.block_ids)} blocks; {len(request.token_ids)} tokens need {needed}"
            )
        layout = layout_from_proto(spec.layout)
        ours = self._engine.pool.layout
        if layout.with_blocks(1) != ours.with_blocks(1):
            raise invalid(f"destination.layout {layout} does not match this worker's KV layout {ours}")
        return KVDestination(spec.transport, tuple(spec.block_ids), layout, spec.shm_name, spec.host_id)

    def _new_sequence(self, request: prefill_pb2.PrefillRequest) -> Sequence:
        try:
            return self._engine.add_sequence(list(request.token_ids), cache_salt=request.cache_salt)
        except ValueError as error:
            raise invalid(f"token_ids: {error}") from error

    async def _compute(self, seq: Sequence) -> float:
        """Reserve seq's blocks and compute its KV, a chunk per forward pass; returns milliseconds."""
        try:
            self._engine.reserve(seq, len(seq))
        except OutOfBlocks as error:
            raise ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"prefill worker KV pool is full ({error.num_needed} blocks needed, {error.num_free} free)",
            ) from error
        cancelled = threading.Event()

        def run() -> None:
            while seq.num_uncomputed_tokens and not cancelled.is_set():
                self._engine.step([seq])

        started = time.perf_counter()
        with _tracer.start_as_current_span("prefill") as span:
            span.set_attribute("kvmesh.num_tokens", len(seq))
            worker = asyncio.ensure_future(asyncio.to_thread(run))
            try:
                await asyncio.shield(worker)
            except asyncio.CancelledError:
                # The thread stops at its next chunk; the lock stays held until it has.
                cancelled.set()
                await asyncio.wait([worker])
                raise
        return (time.perf_counter() - started) * 1000.0

    def _free(self, seq: Sequence) -> None:
        if not self._lock.locked():
            self._engine.free(seq)
            return

        async def free_when_idle() -> None:
            async with self._lock:
                self._engine.free(seq)

        task = asyncio.ensure_future(free_when_idle())
        self._pending_frees.add(task)
        task.add_done_callback(self._pending_frees.discard)

    def close(self) -> None:
        for sender in self._senders.values():
            sender.close()

    def load(self) -> WorkerLoad:
        usage = self._engine.pool_usage()
        return WorkerLoad(self.num_running, self.num_waiting, usage.num_blocks_free, usage.num_blocks_total)


async def serve(config: PrefillConfig) -> RunningServer:
    """Load the model, start the server, join the mesh, report SERVING."""
    engine = load_engine(config.model)
    engine.logits([1, 2, 3])  # warm-up
    servicer = PrefillServicer(engine, config)
    running = await start_server(
        [(prefill_pb2_grpc.add_PrefillServicer_to_server, servicer)], [SERVICE_NAME], config.server
    )
    worker = worker_info(config.registration, WorkerRole.PREFILL, running.port, engine.model_fingerprint)
    join_mesh(running, config.registration, worker, servicer.load, engine.pool.allocator)
    running.on_stop(servicer.close)
    if config.metrics_port is not None:
        collector = register_worker_metrics("prefill", engine.pool.allocator, servicer.load)
        running.on_stop(lambda: REGISTRY.unregister(collector))
        start_metrics_server(config.metrics_port)
    await running.set_serving()
    logger.info("prefill worker %s serving", worker.worker_id)
    return running
