"""Shared-memory transport: prefill and decode workers on one host, CPU pools.

The decode worker allocates its whole KV pool in a POSIX shared-memory segment (`SharedKVPool.create`)
and names it in `KVDestination.shm_name`; the prefill worker maps the segment once (`ShmSender` caches
the mapping) and copies its blocks straight into the reserved blocks: one copy, no intermediate.

Lifetime: the creator owns the name and unlinks it on `close()`; every mapping (the creator's pool
tensor, attached tensors in other processes) keeps the memory alive until that tensor is dropped, so
nothing is unmapped under a live tensor. Only the creator registers the segment with Python's resource
tracker, which unlinks it if the creator dies without closing it. An attaching process must not
register: on 3.11 `SharedMemory(name)` does, and its tracker then unlinks the creator's live segment
(with a "leaked shared_memory" warning) when the attaching process exits. So segments are opened here
with os/mmap rather than `multiprocessing.shared_memory`.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import secrets
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing import resource_tracker

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
from kvmesh.transport.grant import GRANT_KEY_BYTES, check_grant, sign_grant

SHM_DIR = "/dev/shm"
"""Where Linux keeps POSIX shared memory; a segment named N is the file SHM_DIR/N."""

# A segment is a header page that names the layout (so a wrong layout is an error, not garbage KV) and
# holds the pool's write-grant key, then the pool tensor, page-aligned. An exported CUDA pool
# (`kvmesh.transport.cuda_ipc`) starts with the same header, in device memory.
HEADER_BYTES = 4096
KEY_OFFSET = 2048
_MAGIC = "kvmesh-kv-pool-v1"
_NAME_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,199}")


def _path(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"bad shared memory name {name!r}: use 1-200 of [A-Za-z0-9_.-], not starting with '.'"
        )
    return os.path.join(SHM_DIR, name)


def layout_header(layout: KVLayout) -> bytes:
    fields = (layout.num_layers, layout.num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim)
    kind = " latent" if layout.latent else ""
    header = (
        f"{_MAGIC} {' '.join(map(str, fields))} {str(layout.dtype).removeprefix('torch.')}{kind}\n".encode()
    )
    return header.ljust(KEY_OFFSET, b"\0")


def _map(fd: int, layout: KVLayout) -> tuple[mmap.mmap, torch.Tensor]:
    # NOTE: MAP_POPULATE builds the page tables now, so the first transfer does not pay a page fault per
    # 4 KiB (about as long as the copy itself). The tensor holds the mmap object (through the buffer
    # protocol): the mapping lives exactly as long as some tensor viewing it.
    mapping = mmap.mmap(fd, HEADER_BYTES + layout.num_bytes, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
    kv = torch.frombuffer(
        mapping, dtype=layout.dtype, count=layout.num_bytes // layout.dtype.itemsize, offset=HEADER_BYTES
    )
    return mapping, kv.view(layout.shape)


class SharedKVPool:
    """The creator's handle on a KV pool in shared memory (the decode side). Close it to unlink."""

    def __init__(self, name: str, layout: KVLayout, grant_key: bytes) -> None:
        self.name = name
        self.layout = layout
        self._grant_key = grant_key
        self._closed = False

    def destination(
        self, request_id: str, block_ids: Sequence[int], host_id: str, timeout_s: float | None = None
    ) -> KVDestination:
        """A destination for a writer on this host: these reserved blocks, for this request only, signed
        with the pool's key (valid for timeout_s, default 60 s)."""
        expires = int((time.time() + (60.0 if timeout_s is None else timeout_s)) * 1000)
        grant = sign_grant(self._grant_key, request_id, self.name, block_ids, expires)
        return KVDestination(
            "shm", tuple(block_ids), self.layout, self.name, host_id, request_id, grant, expires
        )

    @classmethod
    def create(cls, layout: KVLayout, name: str | None = None) -> tuple[KVPool, SharedKVPool]:
        """Allocate a zeroed pool of `layout` in a new segment; return the pool and the segment's handle.

        All of the memory is reserved now, so a full /dev/shm fails here (OSError ENOSPC) rather than
        with SIGBUS in the middle of a transfer. The segment is readable by this user only.
        Raises FileExistsError if `name` is taken, ValueError for a bad name or an empty layout.
        """
        if layout.num_bytes <= 0:
            raise ValueError(f"layout {layout} holds no bytes")
        name = name or f"kvmesh-{uuid.uuid4().hex}"
        path = _path(name)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                os.posix_fallocate(fd, 0, HEADER_BYTES + layout.num_bytes)
            except OSError as e:
                raise OSError(
                    e.errno,
                    f"cannot reserve {layout.num_bytes} bytes in {SHM_DIR} for KV pool {name!r}: {e.strerror} "
                    "(in a container, give /dev/shm more room, or use fewer blocks)",
                ) from e
            mapping, kv = _map(fd, layout)
            grant_key = secrets.token_bytes(GRANT_KEY_BYTES)
            mapping[:KEY_OFFSET] = layout_header(layout)
            mapping[KEY_OFFSET : KEY_OFFSET + GRANT_KEY_BYTES] = grant_key
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        # Unlinked by the tracker process if this process dies without close(); the name format is
        # what multiprocessing.shared_memory registers ("/" + name).
        resource_tracker.register("/" + name, "shared_memory")
        return KVPool(layout, storage=kv), cls(name, layout, grant_key)

    def close(self) -> None:
        """Unlink the segment's name: no new attachment can be made. Idempotent.

        The memory stays valid for tensors that still map it (this process's pool, attached processes)
        and is returned to the system when the last of them is dropped.
        """
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_path(self.name))
        resource_tracker.unregister("/" + self.name, "shared_memory")

    def __enter__(self) -> SharedKVPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def attach(name: str, layout: KVLayout) -> torch.Tensor:
    """Map the segment `name` as a pool tensor of `layout.shape` (shared, writable).

    Does not register with the resource tracker (see the module docstring). The mapping lives as long as
    the returned tensor or a view of it. Raises FileNotFoundError if no such segment exists, and
    ValueError if the segment's header names another layout (or it is no kvmesh pool).
    """
    tensor, _, _ = _attach(name, layout)
    return tensor


def _attach(name: str, layout: KVLayout) -> tuple[torch.Tensor, int, bytes]:
    """The pool tensor, the segment's inode and its write-grant key."""
    fd = os.open(_path(name), os.O_RDWR)
    try:
        stat = os.fstat(fd)
        header = os.pread(fd, HEADER_BYTES, 0)
        if header[:KEY_OFFSET] != layout_header(layout) or stat.st_size != HEADER_BYTES + layout.num_bytes:
            found = (
                header.split(b"\n", 1)[0].decode(errors="replace")
                if header.startswith(_MAGIC.encode())
                else "no kvmesh pool"
            )
            raise ValueError(
                f"shared memory segment {name!r} holds {found!r} ({stat.st_size} bytes), but the destination "
                f"says layout {layout}: the descriptor does not match the pool"
            )
        _, kv = _map(fd, layout)
        return kv, stat.st_ino, header[KEY_OFFSET : KEY_OFFSET + GRANT_KEY_BYTES]
    finally:
        os.close(fd)


@dataclass
class _Attachment:
    kv: torch.Tensor
    layout: KVLayout
    inode: int
    """Tells a recreated segment of the same name from the one mapped."""
    grant_key: bytes


class ShmSender(KVSender):
    """Copies blocks into a pool in shared memory on this host (see `KVSender.send`).

    Keeps up to `max_attachments` destination pools mapped (least recently used is dropped first).
    Before each send it checks the segment's name still exists: a destination that closed raises
    TransferError and its mapping is dropped, so a stopped decode worker's memory is not held.
    """

    name = "shm"

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
        if dest.transport != self.name:
            raise ValueError(f"destination wants transport {dest.transport!r}, this sender is {self.name!r}")
        check_transfer(src_pool.layout, src_block_ids, dest)
        dst_kv = self.authorize(dest)
        num_bytes = len(dest.block_ids) * dest.layout.bytes_per_block
        if layer_ready is None:
            seconds = await run_copy(
                lambda: copy_blocks(src_pool.kv, src_block_ids, dst_kv, dest.block_ids), num_bytes
            )
            return TransferStats(num_bytes, seconds, self.name)
        seconds = 0.0
        for layer in range(src_pool.layout.num_layers):
            await layer_ready(layer)
            src, dst = src_pool.kv[layer : layer + 1], dst_kv[layer : layer + 1]
            seconds += await run_copy(
                lambda src=src, dst=dst: copy_blocks(src, src_block_ids, dst, dest.block_ids),
                num_bytes // src_pool.layout.num_layers,
            )
        return TransferStats(num_bytes, seconds, self.name)

    def authorize(self, dest: KVDestination) -> torch.Tensor:
        """The destination pool's tensor, once its owner's grant for exactly `dest` checks out. Raises
        GrantError (nothing may be written), TransferError (no such pool) or ValueError (wrong layout)."""
        attachment = self._attachment(dest.shm_name, dest.layout)
        check_grant(
            attachment.grant_key,
            dest.grant,
            dest.request_id,
            dest.shm_name,
            dest.block_ids,
            dest.grant_expires_unix_ms,
        )
        return attachment.kv

    def _attachment(self, name: str, layout: KVLayout) -> _Attachment:
        try:
            inode = os.stat(_path(name)).st_ino
        except FileNotFoundError:
            self._attachments.pop(name, None)
            raise TransferError(
                f"shared memory segment {name!r} not found on this host (its worker stopped, or runs on another host)"
            ) from None
        attachment = self._attachments.get(name)
        if attachment is None or attachment.inode != inode:
            self._attachments.pop(name, None)
            try:
                kv, inode, grant_key = _attach(name, layout)
            except FileNotFoundError:
                raise TransferError(f"shared memory segment {name!r} disappeared while attaching") from None
            attachment = _Attachment(kv, layout, inode, grant_key)
            self._attachments[name] = attachment
            while len(self._attachments) > self._max_attachments:
                self._attachments.popitem(last=False)
        elif attachment.layout != layout:
            raise ValueError(
                f"destination says layout {layout}, segment {name!r} was attached as {attachment.layout}"
            )
        self._attachments.move_to_end(name)
        return attachment

    def close(self) -> None:
        # Dropping the tensors unmaps the segments (unless a caller still holds a view).
        self._attachments.clear()


register_sender(ShmSender.name, ShmSender)
