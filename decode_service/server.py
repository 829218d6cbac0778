"""gRPC edge of the decode worker: kvmesh.v1.Decode over the engine and its decode loop.

Generate walks one request through: validate -> reserve the prompt's blocks -> have a prefill worker
fill them (or leave the prompt to the scheduler, which prefills it in chunks beside running streams) ->
submit it to the engine loop -> stream tokens. Whatever happens, the `finally` hands the sequence back
to the loop, which frees its blocks.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import torch
from prometheus_client.registry import REGISTRY

from decode_service.config import DecodeConfig
from decode_service.kv_fetch import PrefillClient
from kvmesh.engine.batch import SeqOutput
from kvmesh.engine.engine import Engine
from kvmesh.engine.kv_cache import KVLayout, OutOfBlocks
from kvmesh.engine.loop import EngineLoop
from kvmesh.engine.sampling import SamplingParams
from kvmesh.engine.sequence import Sequence
from kvmesh.engine.speculative import DraftCursor
from kvmesh.engine.tokenizer import Detokenizer
from kvmesh.mesh.convert import FINISH_REASON_TO_PROTO, sampling_from_proto
from kvmesh.mesh.errors import ServiceError, deadline_s, invalid, never_fits
from kvmesh.mesh.registration import join_mesh, worker_info
from kvmesh.mesh.server import RunningServer, start_server
from kvmesh.mesh.telemetry import start_metrics_server, tracer
from kvmesh.mesh.worker_config import load_engine
from kvmesh.mesh.worker_metrics import register_worker_metrics
from kvmesh.mesh.workers import WorkerLoad, WorkerRole
from kvmesh.transport.collective_receiver import CollectiveReceiver
from kvmesh.transport.cuda_ipc import ExportedKVPool
from kvmesh.transport.shm import SharedKVPool
from kvmesh.v1 import common_pb2, decode_pb2, decode_pb2_grpc

logger = logging.getLogger(__name__)
SERVICE_NAME = decode_pb2.DESCRIPTOR.services_by_name["Decode"].full_name
_tracer = tracer(__name__)


def _ms(seconds: float) -> float:
    return seconds * 1000.0


class DecodeServicer(decode_pb2_grpc.DecodeServicer):
    def __init__(
        self, engine: Engine, loop: EngineLoop, prefill: PrefillClient, config: DecodeConfig
    ) -> None:
        self._engine = engine
        self._loop = loop
        self._prefill = prefill
        self._config = config
        self.num_waiting = 0
        """Requests admitted but not yet decoding (reserving, waiting for their KV)."""
        self.num_quarantined = 0
        """Cancelled shm transfers whose blocks sat out kv_quarantine_s: their writer's stop was unconfirmed."""
        self._releases: set[asyncio.Task[None]] = set()

    async def Generate(  # noqa: N802 (generated name)
        self, request: decode_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[decode_pb2.GenerateChunk]:
        arrived = time.perf_counter()
        prompt, params = self._validate(request)
        try:
            # Matching the prefix cache takes blocks: it runs in the loop, between forward passes.
            seq = await self._loop.call(
                lambda: self._engine.add_sequence(prompt, params, cache_salt=request.cache_salt),
                undo=self._loop.release_soon,
            )
        except ValueError as error:
            raise invalid(f"prompt_token_ids: {error}") from error
        usage = common_pb2.Usage(prompt_tokens=len(seq), cached_tokens=seq.num_cached_tokens)
        writer = ""  # transfer_id of a push transfer whose prefill worker may still write into seq's blocks
        self.num_waiting += 1
        waiting = True
        try:
            try:
                await self._loop.call(lambda: self._engine.reserve(seq, len(seq)))
            except OutOfBlocks as error:
                raise ServiceError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"decode worker KV pool is full ({error.num_needed} blocks needed, {error.num_free} free); "
                    "retry later or on another worker",
                ) from error
            if request.prefill_address and seq.num_cached_tokens < len(seq) - 1:
                transfer_id = uuid.uuid4().hex
                # NOTE: shm and cuda_ipc write into this pool from the prefill worker's process.
                writer = transfer_id if request.transport in ("shm", "cuda_ipc") else ""
                done = await self._prefill.fetch(request, seq, deadline_s(context), transfer_id)
                writer = ""  # the prefill worker has finished writing
                seq.num_computed_tokens = len(seq) - 1
                # The prefill worker may have had more of the prompt cached than this worker.
                usage.prefilled_tokens = done.num_tokens + 1
                usage.cached_tokens = len(seq) - usage.prefilled_tokens
                usage.stage_ms.prefill_ms = done.prefill_ms
                usage.stage_ms.transfer_ms = done.transfer_ms
                usage.transfer_bytes = done.num_bytes
                usage.transport = request.transport
            else:
                usage.prefilled_tokens = len(seq) - seq.num_cached_tokens
            self.num_waiting -= 1
            waiting = False
            seq.priority = request.priority
            if request.draft_token_ids:
                seq.cursor = DraftCursor.for_edit(list(request.draft_token_ids), prompt)
            elif request.prompt_lookup:
                seq.cursor = DraftCursor.for_prompt_lookup(prompt)
            try:
                stream = await self._loop.submit(seq)
            except OutOfBlocks as error:
                raise never_fits("decode", error.num_needed, error.num_free) from error
            async for chunk in self._stream_tokens(stream.outputs, seq, usage):
                yield chunk
            usage.forward_passes = seq.num_forward_passes
            if seq.cursor is not None:
                usage.accepted_prediction_tokens = seq.cursor.stats.accepted_prediction_tokens
                usage.rejected_prediction_tokens = seq.cursor.stats.rejected_prediction_tokens
            usage.ttft_ms = _ms((stream.first_token_at or arrived) - arrived)
            usage.stage_ms.queue_ms = _ms((stream.first_step_at or arrived) - stream.submitted_at)
            usage.stage_ms.decode_ms = _ms(time.perf_counter() - (stream.first_token_at or arrived))
            if not usage.transport:
                usage.stage_ms.prefill_ms = usage.ttft_ms
            yield decode_pb2.GenerateChunk(
                finish_reason=FINISH_REASON_TO_PROTO[seq.finish_reason], usage=usage
            )
        finally:
            self.num_waiting -= waiting
            if writer:
                self._release_once_written(seq, request.prefill_address, writer)
            else:
                self._loop.release_soon(seq)

    def _release_once_written(self, seq: Sequence, prefill_address: str, transfer_id: str) -> None:
        """Frees seq's blocks once the prefill worker has confirmed that its shm transfer into them
        stopped (CancelPrefill: milliseconds), or kv_quarantine_s after the cancel when it cannot (it
        died, or hangs): a late write must never land in blocks that another request owns by then."""
        loop = asyncio.get_running_loop()
        quarantine_s = self._config.kv_quarantine_s

        async def release() -> None:
            started = loop.time()
            stopped = False
            try:
                if quarantine_s > 0:
                    stopped = await self._prefill.stop_writer(prefill_address, transfer_id, quarantine_s)
            finally:
                left_s = 0.0 if stopped else max(0.0, quarantine_s - (loop.time() - started))
                if not stopped and quarantine_s > 0:
                    self.num_quarantined += 1
                    logger.info(
                        "transfer %s: unconfirmed stop, blocks quarantined %.2f s", transfer_id, left_s
                    )
                self._loop.release_soon(seq, left_s)

        task = loop.create_task(release())
        self._releases.add(task)  # referenced until done
        task.add_done_callback(self._releases.discard)

    def _validate(self, request: decode_pb2.GenerateRequest) -> tuple[list[int], SamplingParams]:
        prompt = list(request.prompt_token_ids)
        vocab = self._engine.config.vocab_size
        if request.priority < 0:
            raise invalid(f"priority must be >= 0 (0: a real request), got {request.priority}")
        if not prompt:
            raise invalid("prompt_token_ids is empty: send at least one token")
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise invalid(f"prompt_token_ids must be in [0, {vocab}); got a token out of range")
        if self._config.require_cache_salt and not request.cache_salt:
            raise invalid("cache_salt is empty: with multi-tenancy on, every request needs its tenant's salt")
        if request.prefill_address and request.transport not in self._config.registration.transports:
            raise invalid(
                f"transport {request.transport!r} is not offered by this worker "
                f"(offered: {', '.join(self._config.registration.transports)})"
            )
        return prompt, sampling_from_proto(
            request.sampling,
            64,
            self._config.max_tokens_limit,
            max_stop_strings=self._config.max_stop_strings,
            max_stop_string_chars=self._config.max_stop_string_chars,
        )

    async def _stream_tokens(
        self, outputs: asyncio.Queue[SeqOutput | BaseException], seq: Sequence, usage: common_pb2.Usage
    ) -> AsyncIterator[decode_pb2.GenerateChunk]:
        """Pass outputs -> chunks; whatever is queued when the client reads goes out in one message."""
        detok = Detokenizer(self._engine.tokenizer, seq.params.stop_strings)
        while True:
            batch = [await outputs.get()]
            while not outputs.empty():
                batch.append(outputs.get_nowait())
            for output in batch:
                if isinstance(output, OutOfBlocks):
                    raise ServiceError(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        "the sequence outgrew this decode worker's KV pool; ask for fewer max_tokens",
                    )
                if isinstance(output, BaseException):
                    raise output
            done = [o for o in batch if isinstance(o, SeqOutput)]
            tokens = [t for o in done for t in o.new_token_ids]
            finished = any(o.finish_reason is not None for o in done)
            usage.completion_tokens += len(tokens)
            text = detok.add(tokens) + (detok.flush() if finished else "")
            yield decode_pb2.GenerateChunk(token_ids=tokens, text=text)
            if finished:
                return

    def load(self) -> WorkerLoad:
        usage = self._engine.pool_usage()
        return WorkerLoad(
            self._loop.num_running,
            self.num_waiting + self._loop.num_waiting,
            usage.num_blocks_free,
            usage.num_blocks_total,
        )


async def serve(config: DecodeConfig) -> RunningServer:
    """Load the model, start the decode loop and the server, join the mesh, report SERVING."""
    offered = config.registration.transports
    if "shm" in offered and "cuda_ipc" in offered:
        raise ValueError(
            "transports shm and cuda_ipc exclude each other on a decode worker: its KV pool is either in host "
            "shared memory (shm, CPU workers) or on the GPU (cuda_ipc)"
        )
    shared: list[SharedKVPool] = []
    exported: list[ExportedKVPool] = []

    def shared_storage(layout: KVLayout) -> torch.Tensor:
        pool, handle = SharedKVPool.create(layout)
        shared.append(handle)
        return pool.kv

    def exported_storage(layout: KVLayout) -> torch.Tensor:
        # Raises CudaIpcUnavailable (a clear message) for a worker on the CPU or without CUDA.
        pool, handle = ExportedKVPool.create(layout, config.model.device)
        exported.append(handle)
        return pool.kv

    make_storage = exported_storage if "cuda_ipc" in offered else shared_storage if "shm" in offered else None
    engine = load_engine(config.model, make_storage)
    engine.generate([1, 2, 3], 2, ignore_eos=True)  # warm-up: the first forward pass is the slowest
    loop = EngineLoop(engine)
    collective = (
        CollectiveReceiver(engine.pool, config.registration.advertise_host) if "nccl" in offered else None
    )
    prefill = PrefillClient(
        engine,
        shared[0] if shared else None,
        config.registration.host_id,
        tls=config.server.tls,
        collective=collective,
        exported_pool=exported[0] if exported else None,
        layerwise=config.layerwise_transfer,
    )
    servicer = DecodeServicer(engine, loop, prefill, config)
    running = await start_server(
        [(decode_pb2_grpc.add_DecodeServicer_to_server, servicer)], [SERVICE_NAME], config.server
    )
    running.add_background_task(loop.start())
    worker = worker_info(
        config.registration, WorkerRole.DECODE, running.port, engine.model_fingerprint, engine.block_size
    )
    join_mesh(
        running, config.registration, worker, servicer.load, engine.pool.allocator, tls=config.server.tls
    )
    running.add_background_task(asyncio.create_task(prefill.close_on_cancel()))
    for handle in shared:
        running.on_stop(handle.close)
    if config.metrics_port is not None:
        collector = register_worker_metrics("decode", engine.pool.allocator, servicer.load)
        running.on_stop(lambda: REGISTRY.unregister(collector))
        start_metrics_server(config.metrics_port, config.server.metrics_bind_host)
    await running.set_serving()
    logger.info("decode worker %s serving", worker.worker_id)
    return running
