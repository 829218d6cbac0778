"""gRPC edge of the prefill worker: kvmesh.v1.Prefill over an engine.

Prefill computes a prompt's KV in this worker's own pool, a chunk per forward pass, then ships the
blocks to the decode worker's reserved blocks: written straight into its shared-memory pool ("shm")
or, device to device, into its exported GPU pool ("cuda_ipc"), sent over the pair's process group ("nccl", gloo on CPU), or streamed back as checksummed chunks
("grpc"). With `destination.layerwise`, each layer leaves as soon as the last chunk computed it. Prompts are computed by the engine loop's scheduler,
several per forward pass within its token budget; a cancelled request leaves at the next pass boundary,
and its blocks are freed there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import grpc
from prometheus_client.registry import REGISTRY

from kvmesh.engine.engine import Engine
from kvmesh.engine.kv_cache import OutOfBlocks, num_blocks_for_tokens
from kvmesh.engine.loop import EngineLoop
from kvmesh.engine.sequence import Sequence
from kvmesh.mesh.convert import cuda_export_from_proto, layout_from_proto
from kvmesh.mesh.errors import ServiceError, invalid, never_fits
from kvmesh.mesh.registration import join_mesh, worker_info
from kvmesh.mesh.server import RunningServer, start_server
from kvmesh.mesh.telemetry import span_across_yields, start_metrics_server, tracer
from kvmesh.mesh.worker_config import load_engine
from kvmesh.mesh.worker_metrics import register_worker_metrics
from kvmesh.mesh.workers import WorkerLoad, WorkerRole
from kvmesh.transport.base import KVDestination, KVSender, LayerReady, TransferError
from kvmesh.transport.collective import CollectiveSender
from kvmesh.transport.cuda_export import require_cuda
from kvmesh.transport.cuda_ipc import CudaIpcSender
from kvmesh.transport.grant import GrantError
from kvmesh.transport.grpc_stream import KVChunk, KVChunkEncoder, iter_chunks
from kvmesh.transport.layerwise import LayerProgress, LayerWatch
from kvmesh.transport.shm import ShmSender
from kvmesh.v1 import prefill_pb2, prefill_pb2_grpc
from prefill_service.config import PrefillConfig
from prefill_service.transfers import Transfers

logger = logging.getLogger(__name__)
SERVICE_NAME = prefill_pb2.DESCRIPTOR.services_by_name["Prefill"].full_name
_tracer = tracer(__name__)


class PrefillServicer(prefill_pb2_grpc.PrefillServicer):
    def __init__(self, engine: Engine, loop: EngineLoop, config: PrefillConfig) -> None:
        self._engine = engine
        self._loop = loop
        self._config = config
        offered = config.registration.transports
        self._shm = ShmSender() if "shm" in offered else None
        self._collective = CollectiveSender() if "nccl" in offered else None
        self._cuda_ipc: CudaIpcSender | None = None
        if "cuda_ipc" in offered:
            require_cuda(engine.device, "this prefill worker's KV pool")  # refuse to start, say why
            self._cuda_ipc = CudaIpcSender()
        self._senders: dict[str, KVSender] = {}
        if self._shm is not None:
            self._senders["shm"] = self._shm
        if self._cuda_ipc is not None:
            self._senders["cuda_ipc"] = self._cuda_ipc
        if self._collective is not None:
            self._senders["nccl"] = self._collective
        self._transfers = Transfers()
        self._progress = LayerProgress(engine, loop)

    async def Prefill(  # noqa: N802 (generated name)
        self, request: prefill_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[prefill_pb2.PrefillChunk]:
        dest = self._destination(request)
        writer = self._transfers.begin(request.transfer_id)
        seq: Sequence | None = None
        watch: LayerWatch | None = None
        compute: asyncio.Future[tuple[float, float]] | None = None
        try:
            if dest.transport == "nccl":
                # The pair's rendezvous overlaps the compute (once per pair; cached afterwards).
                joining = asyncio.ensure_future(self._collective.join(dest, self._engine.device))
            seq = await self._loop.call(lambda: self._new_sequence(request), undo=self._loop.release_soon)
            if request.destination.layerwise:
                watch = self._progress.watch(seq)
            compute = asyncio.ensure_future(self._compute(seq, watch))
            if watch is None:
                await asyncio.shield(compute)
            layer_ready = None
            if watch is not None:
                await watch.final_pass()  # the block table is complete from here on
                layer_ready = watch.layer_ready
            dest_first = request.destination.first_block
            src_block_ids = seq.block_table[dest_first:]
            with span_across_yields(_tracer, "ship") as span:  # it yields: never the current span
                span.set_attribute("kvmesh.transport", dest.transport)
                span.set_attribute("kvmesh.layerwise", watch is not None)
                started = time.perf_counter()
                crc32 = 0
                if dest.transport == "grpc":
                    chunks = iter_chunks(self._engine.pool, src_block_ids, dest=dest)
                    async for chunk in _chunks(chunks, layer_ready):
                        yield prefill_pb2.PrefillChunk(
                            data=prefill_pb2.KVData(
                                offset_bytes=chunk.offset_bytes, payload=chunk.payload, crc32=chunk.crc32
                            )
                        )
                    num_bytes, crc32 = chunks.num_bytes, chunks.crc32
                else:
                    if dest.transport == "nccl":
                        await joining
                    sender = self._senders[dest.transport]
                    stats = await sender.send(self._engine.pool, src_block_ids, dest, layer_ready)
                    num_bytes = stats.num_bytes
                prefill_ms, computed_at = await compute
                # NOTE: layer-wise, only the part of the transfer after the compute ended adds latency.
                transfer_ms = (time.perf_counter() - max(started, computed_at)) * 1000.0
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
            # NOTE: past this point nothing writes into the destination: a copy in progress when the call
            # was cancelled has run to its end (run_copy; a collective send finishes its transfer).
            writer.end()
            if compute is not None and not compute.done():
                compute.cancel()
            elif compute is not None and not compute.cancelled():
                compute.exception()  # retrieved: when it failed, the handler raised it already
            if watch is not None:
                self._progress.unwatch(watch)
            if seq is not None:
                self._loop.release_soon(seq)

    async def CancelPrefill(  # noqa: N802 (generated name)
        self, request: prefill_pb2.CancelPrefillRequest, context: grpc.aio.ServicerContext
    ) -> prefill_pb2.CancelPrefillReply:
        if not request.transfer_id:
            raise invalid("transfer_id is empty: send the transfer_id of the PrefillRequest to stop")
        was_running = await self._transfers.cancel(request.transfer_id)
        return prefill_pb2.CancelPrefillReply(was_running=was_running)

    def _destination(self, request: prefill_pb2.PrefillRequest) -> KVDestination:
        if not request.token_ids:
            raise invalid("token_ids is empty: nothing to prefill")
        spec = request.destination
        offered = ("grpc", *self._senders)
        if spec.transport not in offered:
            raise invalid(
                f"destination.transport {spec.transport!r} is not offered here (offered: {', '.join(offered)})"
            )
        if spec.transport in ("shm", "cuda_ipc") and spec.host_id != self._config.registration.host_id:
            raise invalid(
                f"destination.transport {spec.transport!r} needs the decode worker on this prefill worker's host"
            )
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
        if spec.transport == "nccl" and not (spec.store_address and spec.group_key and request.transfer_id):
            raise invalid("destination.transport 'nccl' needs store_address, group_key and a transfer_id")
        if spec.transport == "cuda_ipc" and not spec.HasField("cuda_ipc"):
            raise invalid("destination.transport 'cuda_ipc' needs destination.cuda_ipc, the pool's export")
        dest = KVDestination(
            spec.transport,
            tuple(spec.block_ids),
            layout,
            spec.shm_name,
            spec.host_id,
            request.request_id,
            spec.grant,
            spec.grant_expires_unix_ms,
            request.transfer_id,
            spec.store_address,
            spec.group_key,
            spec.backend,
            cuda_export_from_proto(spec.cuda_ipc) if spec.transport == "cuda_ipc" else None,
        )
        if spec.transport in ("shm", "cuda_ipc"):
            # NOTE: before any compute: a caller may only name blocks the pool's owner reserved for it.
            writer = self._shm if spec.transport == "shm" else self._cuda_ipc
            field = "shm_name" if spec.transport == "shm" else "cuda_ipc"
            try:
                writer.authorize(dest)  # type: ignore[union-attr] (offered, so not None)
            except GrantError as error:
                raise ServiceError(grpc.StatusCode.PERMISSION_DENIED, f"destination: {error}") from error
            except (TransferError, ValueError) as error:
                raise invalid(f"destination.{field}: {error}") from error
        return dest

    def _new_sequence(self, request: prefill_pb2.PrefillRequest) -> Sequence:
        try:
            seq = self._engine.add_sequence(list(request.token_ids), cache_salt=request.cache_salt)
        except ValueError as error:
            raise invalid(f"token_ids: {error}") from error
        seq.prefill_only = True
        return seq

    async def _compute(self, seq: Sequence, watch: LayerWatch | None) -> tuple[float, float]:
        """Have the engine loop compute seq's KV (in chunks, beside other prompts); returns milliseconds
        and when it ended (perf_counter). Settles `watch` either way."""
        started = time.perf_counter()
        try:
            with _tracer.start_as_current_span("prefill") as span:
                span.set_attribute("kvmesh.num_tokens", len(seq))
                try:
                    stream = await self._loop.submit(seq)
                except OutOfBlocks as error:
                    raise never_fits("prefill", error.num_needed, error.num_free) from error
                outcome = await stream.outputs.get()
                if isinstance(outcome, BaseException):
                    raise outcome
        except BaseException as error:
            if watch is not None:
                watch.fail(error)
            raise
        if watch is not None:
            watch.complete()
        ended = time.perf_counter()
        return (ended - started) * 1000.0, ended

    def close(self) -> None:
        for sender in self._senders.values():
            sender.close()

    def load(self) -> WorkerLoad:
        usage = self._engine.pool_usage()
        return WorkerLoad(
            self._loop.num_running, self._loop.num_waiting, usage.num_blocks_free, usage.num_blocks_total
        )


async def _chunks(chunks: KVChunkEncoder, layer_ready: LayerReady | None) -> AsyncIterator[KVChunk]:
    if layer_ready is not None:
        async for chunk in chunks.achunks(layer_ready):
            yield chunk
        return
    for chunk in chunks:
        yield chunk


async def serve(config: PrefillConfig) -> RunningServer:
    """Load the model, start the server, join the mesh, report SERVING."""
    engine = load_engine(config.model)
    engine.logits([1, 2, 3])  # warm-up
    loop = EngineLoop(engine)
    servicer = PrefillServicer(engine, loop, config)
    running = await start_server(
        [(prefill_pb2_grpc.add_PrefillServicer_to_server, servicer)], [SERVICE_NAME], config.server
    )
    running.add_background_task(loop.start())
    worker = worker_info(
        config.registration, WorkerRole.PREFILL, running.port, engine.model_fingerprint, engine.block_size
    )
    join_mesh(
        running, config.registration, worker, servicer.load, engine.pool.allocator, tls=config.server.tls
    )
    running.on_stop(servicer.close)
    if config.metrics_port is not None:
        collector = register_worker_metrics("prefill", engine.pool.allocator, servicer.load)
        running.on_stop(lambda: REGISTRY.unregister(collector))
        start_metrics_server(config.metrics_port, config.server.metrics_bind_host)
    await running.set_serving()
    logger.info("prefill worker %s serving", worker.worker_id)
    return running
