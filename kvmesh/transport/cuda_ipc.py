"""CUDA IPC transport ("cuda_ipc"): prefill and decode workers on one node, KV pools on its GPUs.

The decode worker allocates its pool inside one device buffer (`ExportedKVPool.create`): a 4 KiB header
(the pool's layout and its write-grant key, as in a shm segment) and then the pool tensor. It exports the
buffer once through torch's CUDA IPC (`torch.multiprocessing.reductions.reduce_tensor`, which wraps
cudaIpcGetMemHandle) into a `PoolExport`: a few hundred bytes that travel in every Prefill request
(`KVDestination.cuda_ipc`), so a restarted prefill worker needs no handshake. The prefill worker opens
each pool once (`CudaIpcSender` caches the mapping by pool_id: opening costs milliseconds) and copies its
blocks device-to-device straight into the reserved blocks (`copy_blocks`: one index_select per
(layer, K/V) slab and run of destination blocks, the ids on the device; no host copy).

Completion: `send` returns only once the copy's streams synchronized, and the prefill worker sends the
done message after `send` returned; the decode worker reads the blocks only after that message.
NOTE: the host-side synchronize is the happens-before edge (no IPC event): the decode worker never
reads early.

Trust. The export arrives in a Prefill request, so the prefill worker treats it as untrusted input:

- Grants. The write-grant key lives in the exported device memory (the header), never in a message:
  the prefill worker reads it from the memory it opened and checks the destination's grant (HMAC over
  request id, pool_id, block ids and expiry) before any compute. A caller holding a valid decode-worker
  certificate that learned or guessed another pool's handle cannot make the prefill worker write blocks
  the pool's owner did not reserve for that request, nor another pool. (Were the key sent with the
  export, as the handle is, such a caller would send a key of its own and a matching grant: a grant
  would prove nothing.)
- What CUDA IPC does not protect. A handle names an allocation; it is no secret. Any process on the node
  that can use the GPU and learns a handle can open it and read or write the whole pool, so the
  isolation is the shm transport's: one host, one user. Workers of different trust belong on different
  nodes.
- torch's IPC bookkeeping. Opening a handle makes torch decrement, when the mapping is dropped, an int64
  at `ref_counter_offset` in the shared-memory file `ref_counter_handle`, both from the message.
  Unchecked, a caller could make the prefill worker write past that file's mapping, or into any file in
  /dev/shm. They are checked first (`PoolExport.check`): the name must be torch's
  ("/torch_<pid>_<n>_<n>", the pid the export's own), the file must exist, belong to this user and have
  torch's size, and the offset must lie inside it. What remains: a caller could name a live torch
  process's counter slot of the same user on the host and have it decremented once, early; it cannot
  write anything else.
- A pool whose process died is not written: its pid must still run (`/proc/<pid>`), so the workers must
  share a PID namespace. A decode worker dying during a copy can still fault the copy (CUDA then reports
  an error on the prefill worker's stream: a TransferError for that request).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvmesh.engine.kv_cache import KVLayout, KVPool
from kvmesh.transport.base import (
    KVDestination,
    KVSender,
    LayerReady,
    TransferError,
    TransferStats,
    check_transfer,
    copy_blocks,
    register_sender,
    run_copy,
)
from kvmesh.transport.cuda_export import (
    _EXPORTED,
    CudaIpcUnavailable,
    PoolExport,
    export_buffer,
    open_export,
    require_cuda,
)
from kvmesh.transport.grant import GRANT_KEY_BYTES, check_grant, sign_grant
from kvmesh.transport.shm import HEADER_BYTES, KEY_OFFSET, layout_header


class ExportedKVPool:
    """The decode side's handle on its pool in an exported device buffer (the buffer lives with the pool)."""

    def __init__(self, layout: KVLayout, export: PoolExport, grant_key: bytes, buffer: torch.Tensor) -> None:
        self.layout = layout
        self.export = export
        self._grant_key = grant_key
        self._buffer = buffer

    @classmethod
    def create(cls, layout: KVLayout, device: torch.device | str) -> tuple[KVPool, ExportedKVPool]:
        """Allocate a zeroed pool of `layout` on the CUDA `device` and export it.

        Raises CudaIpcUnavailable without CUDA (or for a CPU device), ValueError for an empty layout.
        """
        device = require_cuda(device, "the decode worker's KV pool")
        if layout.num_bytes <= 0:
            raise ValueError(f"layout {layout} holds no bytes")
        buffer = torch.zeros(HEADER_BYTES + layout.num_bytes, dtype=torch.uint8, device=device)
        grant_key = secrets.token_bytes(GRANT_KEY_BYTES)
        header = layout_header(layout) + grant_key
        buffer[: len(header)].copy_(torch.frombuffer(bytearray(header), dtype=torch.uint8))
        kv = buffer[HEADER_BYTES:].view(layout.dtype).view(layout.shape)
        export = export_buffer(buffer, f"cuda-{uuid.uuid4().hex}")
        _EXPORTED[export.pool_id] = buffer
        torch.cuda.current_stream(device).synchronize()  # the header is in place before anyone opens it
        return KVPool(layout, device, storage=kv), cls(layout, export, grant_key, buffer)

    def destination(
        self, request_id: str, block_ids: Sequence[int], host_id: str, timeout_s: float | None = None
    ) -> KVDestination:
        """A destination for a prefill worker on this node: these reserved blocks, for this request only,
        signed with the pool's key (valid for timeout_s, default 60 s)."""
        expires = int((time.time() + (60.0 if timeout_s is None else timeout_s)) * 1000)
        grant = sign_grant(self._grant_key, request_id, self.export.pool_id, block_ids, expires)
        return KVDestination(
            "cuda_ipc",
            tuple(block_ids),
            self.layout,
            host_id=host_id,
            request_id=request_id,
            grant=grant,
            grant_expires_unix_ms=expires,
            cuda_ipc=self.export,
        )


@dataclass
class _Attachment:
    export: PoolExport
    layout: KVLayout
    kv: torch.Tensor
    grant_key: bytes


def _process_alive(pid: int) -> bool:
    return pid > 0 and os.path.exists(f"/proc/{pid}")


class CudaIpcSender(KVSender):
    """Copies blocks device-to-device into a pool exported by a process on this node (`KVSender.send`).

    Keeps up to `max_attachments` opened pools (least recently used dropped first); a pool whose process
    is gone raises TransferError and its mapping is dropped.
    """

    name = "cuda_ipc"

    def __init__(self, max_attachments: int = 8) -> None:
        self._max_attachments = max_attachments
        self._attachments: OrderedDict[str, _Attachment] = OrderedDict()

    async def send(
        self,
        src_pool: KVPool,
        src_block_ids: Sequence[int],
        dest: KVDestination,
        layer_ready: LayerReady | None = None,
    ) -> TransferStats:
        """See `KVSender.send`; also raises CudaIpcUnavailable when the source pool is not on CUDA."""
        if dest.transport != self.name:
            raise ValueError(f"destination wants transport {dest.transport!r}, this sender is {self.name!r}")
        require_cuda(src_pool.kv.device, "the prefill worker's KV pool")
        check_transfer(src_pool.layout, src_block_ids, dest)
        dst_kv = self.authorize(dest)
        num_bytes = len(dest.block_ids) * dest.layout.bytes_per_block
        devices = {src_pool.kv.device, dst_kv.device}
        started = time.perf_counter()
        # NOTE: copies are only queued on the devices' current streams here (after the compute that wrote
        # the source, on the same stream); the synchronize in `finally` ends every queued copy before
        # send returns or raises, so nothing writes into the destination afterwards.
        try:
            if layer_ready is None:
                copy_blocks(src_pool.kv, src_block_ids, dst_kv, dest.block_ids)
            else:
                for layer in range(src_pool.layout.num_layers):
                    await layer_ready(layer)
                    src, dst = src_pool.kv[layer : layer + 1], dst_kv[layer : layer + 1]
                    copy_blocks(src, src_block_ids, dst, dest.block_ids)
        finally:
            await run_copy(lambda: _synchronize(devices), num_bytes)
        return TransferStats(num_bytes, time.perf_counter() - started, self.name)

    def authorize(self, dest: KVDestination) -> torch.Tensor:
        """The destination pool's tensor, once its owner's grant for exactly `dest` checks out.

        Raises GrantError (nothing may be written), TransferError (the pool or its process is gone, or it
        cannot be opened), ValueError (a malformed export, or one for another layout), and
        CudaIpcUnavailable (no CUDA here).
        """
        export = dest.cuda_ipc
        if export is None:
            raise ValueError("destination has no cuda_ipc export for transport 'cuda_ipc'")
        attachment = self._attachment(export, dest.layout)
        check_grant(
            attachment.grant_key,
            dest.grant,
            dest.request_id,
            export.pool_id,
            dest.block_ids,
            dest.grant_expires_unix_ms,
        )
        return attachment.kv

    def _attachment(self, export: PoolExport, layout: KVLayout) -> _Attachment:
        if not _process_alive(export.pid):
            self._attachments.pop(export.pool_id, None)
            raise TransferError(
                f"the process {export.pid} that exported pool {export.pool_id!r} is not running on this host "
                "(its worker stopped, runs on another host, or in another PID namespace)"
            )
        attachment = self._attachments.get(export.pool_id)
        if attachment is not None and attachment.export == export and attachment.layout == layout:
            self._attachments.move_to_end(export.pool_id)
            return attachment
        export.check(layout)
        self._attachments.pop(export.pool_id, None)
        attachment = self._open(export, layout)
        self._attachments[export.pool_id] = attachment
        while len(self._attachments) > self._max_attachments:
            self._attachments.popitem(last=False)
        return attachment

    @staticmethod
    def _open(export: PoolExport, layout: KVLayout) -> _Attachment:
        try:
            buffer = open_export(export)
            header = bytes(buffer[:HEADER_BYTES].cpu().numpy())
        except (RuntimeError, TypeError) as error:
            if isinstance(error, (CudaIpcUnavailable, TransferError)):
                raise
            raise TransferError(f"cannot open pool {export.pool_id!r} over CUDA IPC: {error}") from error
        if header[:KEY_OFFSET] != layout_header(layout):
            found = header.split(b"\n", 1)[0][:120].decode(errors="replace")
            raise ValueError(
                f"the buffer exported as {export.pool_id!r} holds {found!r}, but the destination says "
                f"layout {layout}: the export does not match the pool"
            )
        kv = buffer[HEADER_BYTES:].view(layout.dtype).view(layout.shape)
        return _Attachment(export, layout, kv, header[KEY_OFFSET : KEY_OFFSET + GRANT_KEY_BYTES])

    def close(self) -> None:
        # Dropping the tensors closes the mappings (torch releases the IPC handles).
        self._attachments.clear()
        with contextlib.suppress(RuntimeError, AssertionError):
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.ipc_collect()


def _synchronize(devices: set[torch.device]) -> None:
    for device in devices:
        torch.cuda.current_stream(device).synchronize()


register_sender(CudaIpcSender.name, CudaIpcSender)
