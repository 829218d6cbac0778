"""The KV transport interface: what a transfer is and who performs it.

A transfer moves whole blocks (every layer, K and V) from the prefill worker's pool into blocks that the
decode worker reserved before asking for them. Source block `src_block_ids[i]` lands in destination block
`dest.block_ids[i]`. Two styles:

- push, `KVSender.send`: the prefill side writes straight into the destination pool's memory (shm,
  CUDA IPC) or sends to a receiver that writes it there (NCCL/gloo, `collective`). The decode side
  learns that the blocks are ready from the Prefill stream's done message (and, for `collective`, its
  receiver's completion), which is also the happens-before edge for the bytes.
- stream, `grpc_stream`: the prefill side yields checksummed chunks in the Prefill response stream and
  the decode side's `KVChunkReceiver` verifies them and writes them into its reserved blocks.

NOTE: a push transport writes into the destination's memory from another process (shm) or device
(CUDA IPC). When the decode side cancels a transfer, it must not hand the reserved blocks to another
request until the Prefill stream has ended: the sender may still be writing into them.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, ClassVar

import torch

from kvmesh.engine.kv_cache import KVLayout, KVPool

if TYPE_CHECKING:
    from kvmesh.transport.cuda_export import PoolExport

LayerReady = Callable[[int], Awaitable[None]]
"""Layer-wise transfer: awaits until layer l of the source blocks is final; raises if it never will be
(the compute failed). See `kvmesh.transport.layerwise`."""

STREAM_TRANSPORT = "grpc"
"""The transport every worker supports: KV bytes in the Prefill response stream."""

# Copies smaller than this run on the event loop's thread: a thread hop costs about 0.1 ms (measured),
# what copying 1 MiB takes; bigger copies run in a thread so the loop keeps serving other streams.
_INLINE_COPY_BYTES = 1 << 20


class TransferError(RuntimeError):
    """A transfer failed: corrupted or missing bytes, or a destination that is gone.

    The destination's reserved blocks then hold partial data; the caller frees them (after the sender
    stopped, for push transports) and may retry the request.
    """


@dataclass(frozen=True)
class KVDestination:
    """Where a transfer's blocks go, as the decode worker describes it in `PrefillRequest.destination`."""

    transport: str
    """A registered push transport's name (`make_sender`), or `STREAM_TRANSPORT`."""
    block_ids: tuple[int, ...]
    """The destination's reserved block ids; source block i lands in `block_ids[i]`."""
    layout: KVLayout
    """The destination pool's layout; all but `num_blocks` must equal the source pool's."""
    shm_name: str = ""
    """The destination pool's name: its shared-memory segment (shm)."""
    host_id: str = ""
    """The destination's host, for shm: a pool with this name is only meaningful on that host."""
    request_id: str = ""
    """The request the blocks are reserved for (part of the grant)."""
    grant: bytes = b""
    """The pool owner's write grant for exactly these blocks (`kvmesh.transport.grant`); shm and cuda_ipc."""
    grant_expires_unix_ms: int = 0
    """When the grant stops being valid, in Unix milliseconds."""
    transfer_id: str = ""
    """The transfer's unique id (`nccl`: the receiver matches the transfer's bytes by it)."""
    store_address: str = ""
    """`nccl`: host:port of the decode worker's rendezvous store (`kvmesh.transport.collective`)."""
    group_key: str = ""
    """`nccl`: the pair's process group, a key in that store; the same key for every transfer of a pair."""
    backend: str = ""
    """`nccl`: the process-group backend, "nccl" (CUDA pools) or "gloo" (CPU pools)."""
    cuda_ipc: PoolExport | None = None
    """`cuda_ipc`: the destination pool's CUDA IPC export (`kvmesh.transport.cuda_ipc`)."""

    def __post_init__(self) -> None:
        # NOTE: a tuple, so the descriptor stays hashable and nobody edits the block list in flight.
        if not isinstance(self.block_ids, tuple):
            object.__setattr__(self, "block_ids", tuple(self.block_ids))


@dataclass(frozen=True)
class TransferStats:
    """What one transfer moved and how long it took (wall time on the side that reports it)."""

    num_bytes: int
    seconds: float
    transport: str


class KVSender(ABC):
    """Pushes blocks from a local pool into a destination's reserved blocks (the prefill side).

    Implementations register by name (`register_sender`); `make_sender(name)` builds one with no
    arguments. A sender may cache per-destination resources (mappings, communicators): one sender serves
    many transfers and is closed once.
    """

    name: ClassVar[str]

    @abstractmethod
    async def send(
        self,
        src_pool: KVPool,
        src_block_ids: Sequence[int],
        dest: KVDestination,
        layer_ready: LayerReady | None = None,
    ) -> TransferStats:
        """Copy `src_block_ids` of `src_pool` into `dest.block_ids` of the destination pool, pairwise.

        With `layer_ready`, layer l is read only once `await layer_ready(l)` returned, so the transfer
        overlaps the compute of the prompt's last chunk; the bytes are the same. If it raises, the
        transfer stops (the destination holds partial data) and the error is re-raised.

        Changes only the destination's blocks `dest.block_ids`. Reads the source blocks, which must stay
        allocated and unchanged until the awaitable completes. When it completes, the bytes are in the
        destination's memory (device transports: the copy has finished, not just been queued). Cancelling
        the awaiting task does not cut a copy short: it waits for the copy, then re-raises.

        Raises ValueError when the transfer is malformed (layouts differ, block counts differ, ids out of
        range or repeated in the destination, `dest.transport` names another transport),
        TransferError when the destination cannot be reached (its pool is gone), and GrantError
        (`kvmesh.transport.grant`) when a transport that writes into another process's pool finds no valid
        grant from the pool's owner for exactly these blocks; nothing is written then.
        """

    def close(self) -> None:  # noqa: B027 (a no-op default: most senders hold nothing)
        """Release what the sender caches for destinations. Idempotent; no send may be in flight."""


_SENDERS: dict[str, type[KVSender]] = {}


def register_sender(name: str, cls: type[KVSender]) -> None:
    """Make `make_sender(name)` build `cls()`. Raises ValueError if `name` is taken by another class."""
    if _SENDERS.get(name, cls) is not cls:
        raise ValueError(f"transport {name!r} is already registered to {_SENDERS[name].__qualname__}")
    _SENDERS[name] = cls


def make_sender(name: str) -> KVSender:
    """A new sender for a push transport. Raises ValueError for unknown names and for the stream transport."""
    if name == STREAM_TRANSPORT:
        raise ValueError(f"{name!r} is a stream transport: use kvmesh.transport.grpc_stream.iter_chunks")
    if name not in _SENDERS:
        raise ValueError(f"unknown transport {name!r}; registered: {sorted(_SENDERS)}")
    return _SENDERS[name]()


def check_same_block_layout(src: KVLayout, dst: KVLayout) -> None:
    """Raise ValueError unless blocks of `src` and `dst` hold the same bytes (all but num_blocks match)."""
    diffs = [
        f"{f.name} {getattr(src, f.name)} vs {getattr(dst, f.name)}"
        for f in fields(KVLayout)
        if f.name != "num_blocks" and getattr(src, f.name) != getattr(dst, f.name)
    ]
    if diffs:
        raise ValueError(
            f"KV layouts differ (source vs destination): {', '.join(diffs)} "
            f"(source: {src.describe()}; destination: {dst.describe()}); "
            "both workers must run the same model with the same KV dtype and block size"
        )


def check_block_ids(layout: KVLayout, block_ids: Sequence[int], side: str, *, unique: bool) -> None:
    """Raise ValueError unless every id indexes a block of `layout` (and, if `unique`, none repeats)."""
    bad = [b for b in block_ids if not 0 <= b < layout.num_blocks]
    if bad:
        raise ValueError(f"{side} block ids {bad[:8]} out of range for a pool of {layout.num_blocks} blocks")
    if unique and len(set(block_ids)) != len(block_ids):
        raise ValueError(f"{side} block ids repeat: {list(block_ids)[:16]}")


def check_transfer(src_layout: KVLayout, src_block_ids: Sequence[int], dest: KVDestination) -> None:
    """Raise ValueError unless source blocks can be copied into `dest` (see `KVSender.send`)."""
    check_same_block_layout(src_layout, dest.layout)
    if len(src_block_ids) != len(dest.block_ids):
        raise ValueError(f"{len(src_block_ids)} source blocks for {len(dest.block_ids)} destination blocks")
    check_block_ids(src_layout, src_block_ids, "source", unique=False)
    check_block_ids(dest.layout, dest.block_ids, "destination", unique=True)


def block_runs(src_block_ids: Sequence[int], dst_block_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """The pairs `(src_block_ids[i], dst_block_ids[i])` as `(src_start, dst_start, num_blocks)` runs.

    A run is consecutive on both sides. Pairs are taken in destination order, which finds the runs when
    both sides were allocated in ascending order but listed in another. Destination ids must be unique.
    """
    runs: list[tuple[int, int, int]] = []
    for dst, src in sorted(zip(dst_block_ids, src_block_ids, strict=True)):
        if runs:
            src_start, dst_start, n = runs[-1]
            if src == src_start + n and dst == dst_start + n:
                runs[-1] = (src_start, dst_start, n + 1)
                continue
        runs.append((src, dst, 1))
    return runs


def destination_runs(
    src_block_ids: Sequence[int], dst_block_ids: Sequence[int]
) -> list[tuple[int, list[int]]]:
    """The pairs grouped by runs of consecutive destination ids: `(dst_start, source ids in order)`."""
    runs: list[tuple[int, list[int]]] = []
    for dst, src in sorted(zip(dst_block_ids, src_block_ids, strict=True)):
        if runs and dst == runs[-1][0] + len(runs[-1][1]):
            runs[-1][1].append(src)
        else:
            runs.append((dst, [src]))
    return runs


def copy_blocks(
    src_kv: torch.Tensor, src_block_ids: Sequence[int], dst_kv: torch.Tensor, dst_block_ids: Sequence[int]
) -> None:
    """`dst_kv[:, :, dst_block_ids] = src_kv[:, :, src_block_ids]` without a temporary.

    Both tensors are pools, [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]. Changes
    only the destination blocks. Ids are not checked here (see `check_transfer`); destination ids must
    be unique.
    """
    # NOTE: advanced indexing gathers into a temporary and then index_put_s it: about 10x slower than a
    # memcpy of the same bytes on CPU. Instead, one of two ways without a temporary, whichever makes
    # fewer calls (each costs microseconds; measured in bench/transports.py):
    # - a slice copy per run of ids consecutive on both sides: num_layers * 2 contiguous pieces each;
    # - per (layer, K/V) slab, an index_select of the source blocks straight into a run of consecutive
    #   destination blocks: wins when a scattered source goes to few destination runs (a fresh
    #   reservation) and blocks are small (GQA models), where per-block copies pay their overhead.
    runs = block_runs(src_block_ids, dst_block_ids)
    num_slabs = dst_kv.shape[0] * dst_kv.shape[1]  # layers x parts (K and V, or a latent)
    gathers = destination_runs(src_block_ids, dst_block_ids)
    slab_views_ok = src_kv.is_contiguous() and dst_kv.is_contiguous() and src_kv.device == dst_kv.device
    if slab_views_ok and len(gathers) * num_slabs < len(runs):
        src_slabs = src_kv.view(num_slabs, src_kv.shape[2], -1)  # [slab, block, block elements]
        dst_slabs = dst_kv.view(num_slabs, dst_kv.shape[2], -1)
        for dst_start, src_ids in gathers:
            index = torch.tensor(src_ids, device=src_kv.device)
            for slab in range(num_slabs):
                torch.index_select(
                    src_slabs[slab], 0, index, out=dst_slabs[slab, dst_start : dst_start + len(src_ids)]
                )
        return
    for src_start, dst_start, n in runs:
        dst_kv[:, :, dst_start : dst_start + n].copy_(src_kv[:, :, src_start : src_start + n])


async def run_copy(copy: Callable[[], None], num_bytes: int) -> float:
    """Run a blocking copy off the event loop (inline when small); return its wall time in seconds.

    Cancelling the caller does not stop the copy: it is awaited to the end (the caller may free the
    memory it touches once this returns), then CancelledError is re-raised.
    """
    started = time.perf_counter()
    if num_bytes < _INLINE_COPY_BYTES:
        copy()
        return time.perf_counter() - started
    future = asyncio.get_running_loop().run_in_executor(None, copy)
    cancelled = False
    while not future.done():
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    future.result()
    return time.perf_counter() - started
