"""The decode worker's side of a KV transfer: ask a prefill worker to fill the blocks it reserved."""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc

from kvmesh.engine.engine import Engine
from kvmesh.engine.kv_cache import num_blocks_for_tokens
from kvmesh.engine.sequence import Sequence
from kvmesh.mesh.convert import cuda_export_to_proto, layout_to_proto
from kvmesh.mesh.errors import ServiceError
from kvmesh.mesh.telemetry import tracer
from kvmesh.mesh.tls import TLSConfig, mesh_channel
from kvmesh.transport.base import TransferError
from kvmesh.transport.collective import PeerLost
from kvmesh.transport.collective_receiver import CollectiveReceiver, PendingTransfer
from kvmesh.transport.cuda_ipc import ExportedKVPool
from kvmesh.transport.grpc_stream import KVChunk, KVChunkReceiver
from kvmesh.transport.shm import SharedKVPool
from kvmesh.v1 import decode_pb2, prefill_pb2, prefill_pb2_grpc

_tracer = tracer(__name__)
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


class PrefillClient:
    """Channels to prefill workers (one per address, reused) and the transfer of one request's KV."""

    def __init__(
        self,
        engine: Engine,
        shared_pool: SharedKVPool | None,
        host_id: str,
        *,
        tls: TLSConfig | None = None,
        collective: CollectiveReceiver | None = None,
        exported_pool: ExportedKVPool | None = None,
        layerwise: bool = True,
    ) -> None:
        """shared_pool: the engine's pool in shared memory, when this worker offers "shm". tls: this
        worker's mesh identity for its channels to prefill workers; None: plaintext. collective: the
        receiver of "nccl" transfers (its rendezvous store), when this worker offers it. exported_pool:
        the engine's pool exported over CUDA IPC, when this worker offers "cuda_ipc". layerwise: ask
        prefill workers to ship each layer as soon as the prompt's last chunk computed it."""
        self._engine = engine
        self._shared_pool = shared_pool
        self._collective = collective
        self._exported_pool = exported_pool
        self.layerwise = layerwise
        self._host_id = host_id
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._tls = tls

    def _stub(self, address: str) -> prefill_pb2_grpc.PrefillStub:
        channel = self._channels.get(address)
        if channel is None:
            options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
            channel = self._channels[address] = mesh_channel(address, self._tls, "prefill", options)
        return prefill_pb2_grpc.PrefillStub(channel)

    async def fetch(
        self,
        request: decode_pb2.GenerateRequest,
        seq: Sequence,
        timeout_s: float | None,
        transfer_id: str = "",
    ) -> prefill_pb2.PrefillDone:
        """Have the prefill worker compute the KV of all prompt tokens but the last, and write the blocks
        this worker does not have cached into seq's blocks. transfer_id: a new id per call, for
        stop_writer should the call not end with its done message.

        The last prompt token is left for the decode loop, whose first step then yields the first
        token's logits. Raises grpc errors of the prefill call as they are (UNAVAILABLE is retried by
        the gateway), ServiceError(DATA_LOSS) when the bytes arrive corrupted.
        """
        tokens = seq.token_ids[: len(seq) - 1]
        first_block = seq.num_cached_tokens // self._engine.block_size
        block_ids = seq.block_table[first_block : num_blocks_for_tokens(len(tokens), self._engine.block_size)]
        destination = prefill_pb2.KVDestination(
            transport=request.transport,
            block_ids=block_ids,
            layout=layout_to_proto(self._engine.pool.layout),
            host_id=self._host_id,
            first_block=first_block,
            layerwise=self.layerwise,
        )
        pending: PendingTransfer | None = None
        if request.transport == "nccl":
            if self._collective is None:
                raise ServiceError(grpc.StatusCode.INTERNAL, "transport 'nccl' without a collective receiver")
            transfer_id = transfer_id or uuid.uuid4().hex
            peer = request.prefill_address
            try:
                pending = self._collective.expect(peer, transfer_id, block_ids)
            except PeerLost as error:
                raise ServiceError(grpc.StatusCode.UNAVAILABLE, f"KV transfer failed: {error}") from error
            rendezvous = self._collective.rendezvous(peer)
            destination.store_address = rendezvous.store_address
            destination.group_key = rendezvous.group_key
            destination.backend = rendezvous.backend
        if request.transport == "shm":
            if self._shared_pool is None:
                raise ServiceError(grpc.StatusCode.INTERNAL, "transport 'shm' without a shared-memory pool")
            signed = self._shared_pool.destination(request.request_id, block_ids, self._host_id, timeout_s)
            destination.shm_name = signed.shm_name
            destination.grant = signed.grant
            destination.grant_expires_unix_ms = signed.grant_expires_unix_ms
        if request.transport == "cuda_ipc":
            if self._exported_pool is None:
                raise ServiceError(grpc.StatusCode.INTERNAL, "transport 'cuda_ipc' without an exported pool")
            signed = self._exported_pool.destination(request.request_id, block_ids, self._host_id, timeout_s)
            destination.cuda_ipc.CopyFrom(cuda_export_to_proto(self._exported_pool.export))
            destination.grant = signed.grant
            destination.grant_expires_unix_ms = signed.grant_expires_unix_ms
        call = self._stub(request.prefill_address).Prefill(
            prefill_pb2.PrefillRequest(
                request_id=request.request_id,
                token_ids=tokens,
                destination=destination,
                cache_salt=request.cache_salt,
                transfer_id=transfer_id,
            ),
            timeout=timeout_s,
        )
        with _tracer.start_as_current_span("transfer") as span:
            span.set_attribute("kvmesh.transport", request.transport)
            span.set_attribute("kvmesh.num_tokens", len(tokens))
            receiver: KVChunkReceiver | None = None
            done: prefill_pb2.PrefillDone | None = None
            started = time.perf_counter()
            try:
                async for message in call:
                    if done is not None:
                        raise ServiceError(
                            grpc.StatusCode.DATA_LOSS, "prefill worker sent data after its done message"
                        )
                    if message.HasField("data"):
                        receiver = receiver or KVChunkReceiver(self._engine.pool, block_ids)
                        data = message.data
                        receiver.add(KVChunk(data.offset_bytes, data.payload, data.crc32))
                        continue
                    done = message.done
                    # NOTE: keep reading until the prefill worker closes the stream: cancelling right after
                    # `done` would leave its handler stuck at its last yield.
                    if request.transport == "grpc":
                        receiver = receiver or KVChunkReceiver(self._engine.pool, block_ids)
                        receiver.finish(done.num_bytes, done.crc32)
                        # The prefill worker times only its side; the stream's time is measured here.
                        done.transfer_ms = (time.perf_counter() - started) * 1000.0 - done.prefill_ms
                    span.set_attribute("kvmesh.num_bytes", done.num_bytes)
                if done is not None and pending is not None:
                    # The done message says the sender finished; the bytes are in once the receiver has them.
                    stats = await asyncio.wait_for(pending.wait(), timeout_s)
                    done.transfer_ms = max(done.transfer_ms, stats.seconds * 1000.0)
                if done is not None:
                    return done
            except PeerLost as error:
                raise ServiceError(grpc.StatusCode.UNAVAILABLE, f"KV transfer failed: {error}") from error
            except TransferError as error:
                raise ServiceError(grpc.StatusCode.DATA_LOSS, f"KV transfer failed: {error}") from error
            finally:
                call.cancel()  # no-op once the call finished; otherwise cancellation reaches the prefill worker
                if pending is not None:
                    # NOTE: from here on the receiver writes nothing into block_ids: they may be freed.
                    self._collective.forget(request.prefill_address, pending)  # type: ignore[union-attr]
        raise ServiceError(
            grpc.StatusCode.UNAVAILABLE, "prefill worker ended the stream without a done message"
        )

    async def stop_writer(self, address: str, transfer_id: str, timeout_s: float) -> bool:
        """Has the prefill worker at address stop the transfer; True once it confirmed that nothing
        writes into the transfer's blocks any more, nor will.

        False when it could not confirm within timeout_s (it died, hangs, or predates CancelPrefill): a
        late write may then still land, and the caller must keep the blocks out of use for a while.
        """
        try:
            await self._stub(address).CancelPrefill(
                prefill_pb2.CancelPrefillRequest(transfer_id=transfer_id), timeout=timeout_s
            )
        except grpc.aio.AioRpcError:
            return False
        return True

    async def close_on_cancel(self) -> None:
        """A background task whose cancellation (server stop) closes every channel."""
        try:
            await asyncio.Event().wait()
        finally:
            for channel in self._channels.values():
                await channel.close()
