"""Collective transport ("nccl"): point-to-point send/recv between a prefill and a decode worker.

Built on `torch.distributed` process groups, one per pair of workers (rank 0 = the prefill worker,
which sends; rank 1 = the decode worker, which receives), so the same code runs with the "nccl" backend
on GPU pools and with "gloo" on CPU pools (what CI tests, between real processes).

Rendezvous travels over the mesh's gRPC: the decode worker hosts a `TCPStore` (the one socket torch
needs to introduce two ranks) and names it, with a key for the pair, in `KVDestination.store_address` and
`group_key` of its Prefill request; the prefill worker joins that group on the first request and both
sides cache the group for every later transfer between them (`CollectiveSender`, `CollectiveReceiver`).

Wire protocol on a pair, per transfer, all sender -> receiver, in this order:

- header: int64[4] = [MAGIC, transfer key, num_blocks, num_layers]
- per layer l: the source blocks of layer l, `kv[l][:, src_block_ids]`, [2, num_blocks, block_size,
  kv_heads, head_dim] in the pool's dtype
- trailer: int64[2] = [MAGIC, status] (0: complete; 1: the sender aborted, the bytes are garbage)

NOTE: NCCL matches messages by order only, so a pair carries one transfer at a time (a lock on the
sender) and the receiver demultiplexes by the header's transfer key: one thread per pair always has the
next header's recv posted. A sender, once it sent a header, always sends every message of the transfer
(cancelling it does not cut a transfer short; a failed compute sends garbage and status 1), so the stream
never desynchronises. The receiver writes into the pool only under the transfer's lock, after the
transfer's `cancel()` nothing more is written, so the decode worker frees the reserved blocks at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kvmesh.engine.kv_cache import KVLayout, KVPool
from kvmesh.transport.base import (
    KVDestination,
    KVSender,
    LayerReady,
    TransferError,
    TransferStats,
    check_transfer,
    register_sender,
)

logger = logging.getLogger(__name__)

MAGIC = 0x6B766D657368  # "kvmesh"
SENDER_RANK = 0
RECEIVER_RANK = 1
RENDEZVOUS_TIMEOUT_S = 30.0
"""How long either side waits for its peer to join a new pair's group."""
# NOTE: a gloo recv that times out closes the pair, and the receiver always has a recv posted for the
# next header, idle or not: so the group's own timeout is practically infinite. A dead peer is seen at
# once as a closed connection (gloo), or through the failed Prefill call (NCCL hangs otherwise).
_GROUP_TIMEOUT = datetime.timedelta(days=365)


class PeerLost(TransferError):
    """The peer of a pair died or its connection broke; the pair's group is dropped (retry the request)."""


def backend_for(device: torch.device) -> str:
    """The process-group backend for pools on `device`: "nccl" for CUDA, "gloo" for CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def transfer_key(transfer_id: str) -> int:
    """A transfer's key in the header: 63 bits of SHA-256 of its id."""
    return int.from_bytes(hashlib.sha256(transfer_id.encode()).digest()[:8], "big") >> 1


def new_group(
    store: dist.Store, group_key: str, rank: int, backend: str, device: torch.device
) -> dist.ProcessGroup:
    """The pair's process group; blocks until the peer joined (or the store's timeout)."""
    prefixed = dist.PrefixStore(f"kvmesh/{group_key}/", store)
    if backend == "gloo":
        return dist.ProcessGroupGloo(prefixed, rank, 2, _GROUP_TIMEOUT)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = _GROUP_TIMEOUT
        group = dist.ProcessGroupNCCL(prefixed, rank, 2, options)
        # NOTE: NCCL creates its communicator lazily, on the first op; eager_connect_single_device makes
        # it now, so a rendezvous problem shows here and not in the middle of the first transfer.
        with contextlib.suppress(AttributeError):
            group.eager_connect_single_device(device)
        return group
    raise ValueError(f"unknown process-group backend {backend!r}: use 'gloo' (CPU) or 'nccl' (CUDA)")


def wait_for(work: dist.Work, what: str, peer: str) -> None:
    try:
        work.wait()
    except RuntimeError as error:
        raise PeerLost(f"{what} with {peer} failed: {error}") from error


# ---- the prefill side -------------------------------------------------------------------------------


@dataclass
class _SendingPair:
    group: dist.ProcessGroup
    lock: asyncio.Lock


class CollectiveSender(KVSender):
    """Sends blocks to decode workers over cached per-pair process groups (see `KVSender.send`).

    `dest` must carry `store_address`, `group_key` and `backend` (the decode worker's rendezvous) and a
    `transfer_id` that the receiver expects. `join(dest)` may be awaited early (before the compute) so
    that the rendezvous overlaps it; `send` joins if needed.
    """

    name = "nccl"

    def __init__(self) -> None:
        self._pairs: dict[str, asyncio.Future[_SendingPair]] = {}
        self._stores: dict[str, dist.TCPStore] = {}

    async def join(self, dest: KVDestination, device: torch.device) -> None:
        """Join the pair's group named by dest (once per pair). Raises PeerLost when the rendezvous fails."""
        await self._pair(dest, device)

    async def _pair(self, dest: KVDestination, device: torch.device) -> _SendingPair:
        if not dest.store_address or not dest.group_key:
            raise ValueError("destination has no rendezvous (store_address, group_key) for transport 'nccl'")
        future = self._pairs.get(dest.group_key)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._pairs[dest.group_key] = future
            try:
                group = await asyncio.to_thread(self._connect, dest, device)
            except BaseException as error:
                del self._pairs[dest.group_key]
                message = f"cannot join the decode worker's group at {dest.store_address}: {error}"
                future.set_exception(PeerLost(message))
                future.exception()  # retrieved: other waiters, if any, see it too
                raise PeerLost(message) from error
            future.set_result(_SendingPair(group, asyncio.Lock()))
        return await asyncio.shield(future)

    def _connect(self, dest: KVDestination, device: torch.device) -> dist.ProcessGroup:
        host, _, port = dest.store_address.rpartition(":")
        store = self._stores.get(dest.store_address)
        if store is None:
            store = dist.TCPStore(
                host,
                int(port),
                is_master=False,
                timeout=datetime.timedelta(seconds=RENDEZVOUS_TIMEOUT_S),
            )
            self._stores[dest.store_address] = store
        return new_group(store, dest.group_key, SENDER_RANK, dest.backend, device)

    def drop(self, group_key: str) -> None:
        """Forget a pair (its peer died); the next transfer to it joins a new group."""
        self._pairs.pop(group_key, None)

    async def send(
        self,
        src_pool: KVPool,
        src_block_ids: Sequence[int],
        dest: KVDestination,
        layer_ready: LayerReady | None = None,
    ) -> TransferStats:
        """Send the blocks; with `layer_ready`, each layer leaves as soon as it is final.

        Raises ValueError (malformed), PeerLost (the pair broke: it is dropped), or whatever
        `layer_ready` raised (after the transfer was closed with status "aborted").
        """
        if dest.transport != self.name:
            raise ValueError(f"destination wants transport {dest.transport!r}, this sender is {self.name!r}")
        check_transfer(src_pool.layout, src_block_ids, dest)
        if not dest.transfer_id:
            raise ValueError("destination has no transfer_id: the receiver matches transfers by it")
        pair = await self._pair(dest, src_pool.kv.device)
        peer = dest.store_address
        async with pair.lock:
            task = asyncio.ensure_future(
                self._send_locked(pair.group, src_pool, src_block_ids, dest, layer_ready)
            )
            # NOTE: once the header left, every message of the transfer must follow (see the module
            # docstring); cancelling the caller waits for the rest, then re-raises.
            cancelled = False
            while not task.done():
                try:
                    await asyncio.shield(task)
                except asyncio.CancelledError:
                    cancelled = True
                except Exception:
                    break
            try:
                stats = task.result()
            except PeerLost:
                self.drop(dest.group_key)
                raise
            if cancelled:
                raise asyncio.CancelledError
            logger.debug("sent %d bytes to %s", stats.num_bytes, peer)
            return stats

    async def _send_locked(
        self,
        group: dist.ProcessGroup,
        src_pool: KVPool,
        src_block_ids: Sequence[int],
        dest: KVDestination,
        layer_ready: LayerReady | None,
    ) -> TransferStats:
        layout, device, peer = src_pool.layout, src_pool.kv.device, dest.store_address
        num_blocks = len(src_block_ids)
        started = time.perf_counter()
        header = torch.tensor(
            [MAGIC, transfer_key(dest.transfer_id), num_blocks, layout.num_layers], device=device
        )
        await asyncio.to_thread(wait_for, group.send([header], RECEIVER_RANK, 0), "sending a header", peer)
        index = torch.tensor(list(src_block_ids), device=device)
        staging = torch.empty(layer_shape(layout, num_blocks), dtype=layout.dtype, device=device)
        failure: BaseException | None = None
        for layer in range(layout.num_layers):
            if layer_ready is not None and failure is None:
                try:
                    await layer_ready(layer)
                except BaseException as error:  # noqa: BLE001 (re-raised after the trailer)
                    failure = error
            await asyncio.to_thread(
                self._send_layer, group, src_pool.kv[layer], index, staging, failure, peer
            )
        trailer = torch.tensor([MAGIC, 0 if failure is None else 1], device=device)
        await asyncio.to_thread(wait_for, group.send([trailer], RECEIVER_RANK, 0), "sending a trailer", peer)
        if failure is not None:
            raise failure
        return TransferStats(num_blocks * layout.bytes_per_block, time.perf_counter() - started, self.name)

    @staticmethod
    def _send_layer(
        group: dist.ProcessGroup,
        layer_kv: torch.Tensor,
        index: torch.Tensor,
        staging: torch.Tensor,
        failure: BaseException | None,
        peer: str,
    ) -> None:
        if failure is None:
            torch.index_select(layer_kv, 1, index, out=staging)  # [2, blocks, ...], one gather per layer
        wait_for(group.send([staging], RECEIVER_RANK, 0), "sending a layer", peer)

    def close(self) -> None:
        self._pairs.clear()
        self._stores.clear()


def layer_shape(layout: KVLayout, num_blocks: int) -> tuple[int, ...]:
    """One layer's share of a transfer: [parts (K/V or a latent), num_blocks, block_size, kv_heads, head_dim]."""
    return layout.with_blocks(num_blocks).shape[1:]


register_sender(CollectiveSender.name, CollectiveSender)


# ---- the decode side --------------------------------------------------------------------------------
