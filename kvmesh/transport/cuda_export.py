"""A CUDA allocation shared between processes through torch's CUDA IPC: the export (`PoolExport`, which
travels in Prefill requests), its checks, and opening it (the trust notes are in kvmesh.transport.cuda_ipc)."""

from __future__ import annotations

import inspect
import os
import re
import weakref
from dataclasses import dataclass
from functools import cache

import torch

from kvmesh.engine.kv_cache import KVLayout
from kvmesh.transport.base import (
    TransferError,
)
from kvmesh.transport.shm import HEADER_BYTES, SHM_DIR

REF_COUNTER_SLOTS = 10_000
"""int64 slots in one of torch's CUDA IPC reference-counter files (CUDA_IPC_REF_COUNTER_FILE_SIZE)."""
_REF_COUNTER_RE = re.compile(rb"/torch_(\d+)_\d+_\d+")
_MAX_HANDLE_BYTES = 4096
"""torch's handles are 64 bytes (cudaIpcMemHandle_t), or a little more for expandable segments."""


class CudaIpcUnavailable(RuntimeError):
    """CUDA IPC cannot run here: no CUDA device, a pool that is not on one, or a torch it does not know."""


def require_cuda(device: torch.device | str, what: str) -> torch.device:
    """`device`, once checked to be a CUDA device that this process can use; else CudaIpcUnavailable."""
    device = torch.device(device)
    if device.type != "cuda":
        raise CudaIpcUnavailable(
            f"the cuda_ipc transport moves KV between CUDA pools, but {what} is on {device}: "
            "offer shm or grpc for CPU workers"
        )
    if not torch.cuda.is_available():
        raise CudaIpcUnavailable(
            f"the cuda_ipc transport needs CUDA, and torch {torch.__version__} sees no CUDA device here "
            f"({what} was to be on {device})"
        )
    return device


@dataclass(frozen=True)
class PoolExport:
    """A pool exported through CUDA IPC (see `prefill.proto` CudaIpcExport for each field)."""

    pool_id: str
    device_uuid: str
    pid: int
    mem_handle: bytes
    storage_size_bytes: int
    storage_offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes = b""
    event_sync_required: bool = False

    def check(self, layout: KVLayout) -> None:
        """Raise ValueError unless the export is well formed for a pool of `layout` (see the module
        docstring: torch opens and later writes what these fields name)."""
        if not self.pool_id or len(self.pool_id) > 200:
            raise ValueError("cuda_ipc.pool_id must be 1-200 characters")
        if not 0 < len(self.mem_handle) <= _MAX_HANDLE_BYTES:
            raise ValueError(f"cuda_ipc.mem_handle must be 1-{_MAX_HANDLE_BYTES} bytes")
        if len(self.event_handle) > _MAX_HANDLE_BYTES or (self.event_sync_required and not self.event_handle):
            raise ValueError("cuda_ipc.event_handle is missing or too long")
        if self.storage_size_bytes != HEADER_BYTES + layout.num_bytes:
            raise ValueError(
                f"cuda_ipc.storage_size_bytes is {self.storage_size_bytes}, but a pool of layout "
                f"{layout.describe()} with {layout.num_blocks} blocks and its header take "
                f"{HEADER_BYTES + layout.num_bytes}: the export does not match the destination's layout"
            )
        if self.storage_offset_bytes < 0:
            raise ValueError("cuda_ipc.storage_offset_bytes is negative")
        match = _REF_COUNTER_RE.fullmatch(self.ref_counter_handle)
        if match is None or int(match[1]) != self.pid:
            raise ValueError(
                "cuda_ipc.ref_counter_handle must be torch's reference-counter name /torch_<pid>_<n>_<n> "
                "of the exporting process"
            )
        if not 0 <= self.ref_counter_offset < REF_COUNTER_SLOTS:
            raise ValueError(f"cuda_ipc.ref_counter_offset must be in [0, {REF_COUNTER_SLOTS})")
        path = os.path.join(SHM_DIR, self.ref_counter_handle.decode().lstrip("/"))
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            raise ValueError(f"cuda_ipc.ref_counter_handle {path} does not exist on this host") from None
        if stat.st_uid != os.getuid() or stat.st_size != 8 * REF_COUNTER_SLOTS:
            raise ValueError(f"cuda_ipc.ref_counter_handle {path} is no reference-counter file of this user")


@cache
def _rebuild_parameters() -> tuple[str, ...]:
    """The parameter names of torch's `rebuild_cuda_tensor`, which `reduce_tensor` gives positionally."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    return tuple(inspect.signature(rebuild_cuda_tensor).parameters)


_EXPORT_FIELDS = {
    "storage_handle",
    "storage_size_bytes",
    "storage_offset_bytes",
    "ref_counter_handle",
    "ref_counter_offset",
    "event_handle",
    "event_sync_required",
}


def _check_torch_names() -> None:
    missing = _EXPORT_FIELDS - set(_rebuild_parameters())
    if missing:
        raise CudaIpcUnavailable(
            f"torch {torch.__version__}'s rebuild_cuda_tensor has no {sorted(missing)}: "
            "kvmesh.transport.cuda_ipc does not know this torch's CUDA IPC"
        )


def device_uuid(device: torch.device) -> str:
    """The GPU's UUID: the one name of a device that every process on the node agrees on."""
    return str(torch.cuda.get_device_properties(device).uuid)


def local_device(uuid_text: str) -> torch.device:
    """This process's device with that UUID; TransferError when it does not see that GPU."""
    for index in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(index).uuid) == uuid_text:
            return torch.device("cuda", index)
    raise TransferError(
        f"the destination's GPU {uuid_text} is not visible to this prefill worker (CUDA_VISIBLE_DEVICES?)"
    )


def export_buffer(buffer: torch.Tensor, pool_id: str) -> PoolExport:
    """Export a whole contiguous CUDA buffer (uint8) for other processes of this node."""
    from torch.multiprocessing.reductions import reduce_tensor

    _check_torch_names()
    require_cuda(buffer.device, "the exported buffer")
    if buffer.dtype != torch.uint8 or buffer.dim() != 1 or buffer.storage_offset() != 0:
        raise ValueError("export a whole 1-D uint8 buffer (its own storage)")
    _, args = reduce_tensor(buffer)
    named = dict(zip(_rebuild_parameters(), args, strict=True))
    if named.get("tensor_offset", 0) != 0 or named["storage_size_bytes"] != buffer.numel():
        raise ValueError("export a buffer that is its storage's whole (offset 0, every byte)")
    return PoolExport(
        pool_id=pool_id,
        device_uuid=device_uuid(buffer.device),
        pid=os.getpid(),
        mem_handle=bytes(named["storage_handle"]),
        storage_size_bytes=int(named["storage_size_bytes"]),
        storage_offset_bytes=int(named["storage_offset_bytes"]),
        ref_counter_handle=bytes(named["ref_counter_handle"]),
        ref_counter_offset=int(named["ref_counter_offset"]),
        event_handle=bytes(named["event_handle"] or b""),
        event_sync_required=bool(named["event_sync_required"]),
    )


def open_export(export: PoolExport) -> torch.Tensor:
    """The exported buffer, mapped into this process (uint8, [storage_size_bytes]). Check it first.

    A buffer this process exported itself is returned as it is: CUDA cannot open a handle in the process
    that made it, and prefill and decode workers share a process in tests and benches.
    """
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    _check_torch_names()
    if export.pid == os.getpid():
        local = _EXPORTED.get(export.pool_id)
        if local is not None and local.numel() == export.storage_size_bytes:
            return local
    if not torch.cuda.is_available():
        raise CudaIpcUnavailable(
            f"the cuda_ipc transport needs CUDA, and torch {torch.__version__} sees no CUDA device here"
        )
    device = local_device(export.device_uuid)
    values = {
        "tensor_cls": torch.Tensor,
        "tensor_size": torch.Size([export.storage_size_bytes]),
        "tensor_stride": (1,),
        "tensor_offset": 0,
        "storage_cls": torch.storage.TypedStorage,
        "dtype": torch.uint8,
        "storage_device": device.index,
        "storage_handle": export.mem_handle,
        "storage_size_bytes": export.storage_size_bytes,
        "storage_offset_bytes": export.storage_offset_bytes,
        "requires_grad": False,
        "ref_counter_handle": export.ref_counter_handle,
        "ref_counter_offset": export.ref_counter_offset,
        "event_handle": export.event_handle,
        "event_sync_required": export.event_sync_required,
    }
    unknown = set(_rebuild_parameters()) - set(values)
    if unknown:
        raise CudaIpcUnavailable(f"torch {torch.__version__}'s rebuild_cuda_tensor wants {sorted(unknown)}")
    return rebuild_cuda_tensor(**{name: values[name] for name in _rebuild_parameters()})


_EXPORTED: weakref.WeakValueDictionary[str, torch.Tensor] = weakref.WeakValueDictionary()
"""The buffers this process exported, by pool_id, while they live."""
