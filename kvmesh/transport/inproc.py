"""In-process transport: prefill and decode share one process (embedded mode, tests).

The decode side registers its pool under a key (`register_local_pool`) and sends that key as
`KVDestination.shm_name`; the sender copies straight from the source pool into the destination pool,
one copy, no intermediate tensor.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

from kvmesh.engine.kv_cache import KVPool
from kvmesh.transport.base import (
    KVDestination,
    KVSender,
    TransferError,
    TransferStats,
    check_transfer,
    copy_blocks,
    register_sender,
    run_copy,
)


class LocalPools:
    """Pools of this process by key. Holds them weakly: a dropped pool disappears from the registry."""

    def __init__(self) -> None:
        self._pools: weakref.WeakValueDictionary[str, KVPool] = weakref.WeakValueDictionary()

    def register(self, key: str, pool: KVPool) -> None:
        """Make `pool` reachable as `key`. Raises ValueError if another live pool holds `key`."""
        if not key:
            raise ValueError("a local pool needs a non-empty key")
        if self._pools.get(key, pool) is not pool:
            raise ValueError(f"a different KV pool is already registered as {key!r}")
        self._pools[key] = pool

    def unregister(self, key: str) -> None:
        """Forget `key`; later sends to it raise TransferError. Unknown keys are ignored."""
        self._pools.pop(key, None)

    def get(self, key: str) -> KVPool:
        """The pool registered as `key`. Raises TransferError if none is (any more)."""
        pool = self._pools.get(key)
        if pool is None:
            raise TransferError(f"no KV pool registered in this process as {key!r} (its worker stopped?)")
        return pool


LOCAL_POOLS = LocalPools()
"""This process's pools; what `register_local_pool` and a default `InprocSender` use."""


def register_local_pool(key: str, pool: KVPool) -> None:
    """Register `pool` as `key` with `LOCAL_POOLS` (see `LocalPools.register`)."""
    LOCAL_POOLS.register(key, pool)


def unregister_local_pool(key: str) -> None:
    """Remove `key` from `LOCAL_POOLS`."""
    LOCAL_POOLS.unregister(key)


class InprocSender(KVSender):
    """Copies blocks into a pool of this process found by `dest.shm_name` (see `KVSender.send`)."""

    name = "inproc"

    def __init__(self, pools: LocalPools = LOCAL_POOLS) -> None:
        self._pools = pools

    async def send(
        self, src_pool: KVPool, src_block_ids: Sequence[int], dest: KVDestination
    ) -> TransferStats:
        if dest.transport != self.name:
            raise ValueError(f"destination wants transport {dest.transport!r}, this sender is {self.name!r}")
        dst_pool = self._pools.get(dest.shm_name)
        if dst_pool.layout != dest.layout:
            raise ValueError(
                f"destination says layout {dest.layout}, pool {dest.shm_name!r} has {dst_pool.layout}"
            )
        check_transfer(src_pool.layout, src_block_ids, dest)
        num_bytes = len(dest.block_ids) * dest.layout.bytes_per_block
        seconds = await run_copy(
            lambda: copy_blocks(src_pool.kv, src_block_ids, dst_pool.kv, dest.block_ids), num_bytes
        )
        return TransferStats(num_bytes, seconds, self.name)


register_sender(InprocSender.name, InprocSender)
