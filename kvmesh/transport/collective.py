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
import threading
import time
import uuid
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
    check_block_ids,
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


def _new_group(
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


def _wait(work: dist.Work, what: str, peer: str) -> None:
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
        return _new_group(store, dest.group_key, SENDER_RANK, dest.backend, device)

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
        await asyncio.to_thread(_wait, group.send([header], RECEIVER_RANK, 0), "sending a header", peer)
        index = torch.tensor(list(src_block_ids), device=device)
        staging = torch.empty(_layer_shape(layout, num_blocks), dtype=layout.dtype, device=device)
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
        await asyncio.to_thread(_wait, group.send([trailer], RECEIVER_RANK, 0), "sending a trailer", peer)
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
        _wait(group.send([staging], RECEIVER_RANK, 0), "sending a layer", peer)

    def close(self) -> None:
        self._pairs.clear()
        self._stores.clear()


def _layer_shape(layout: KVLayout, num_blocks: int) -> tuple[int, ...]:
    """One layer's share of a transfer: [parts (K/V or a latent), num_blocks, block_size, kv_heads, head_dim]."""
    return layout.with_blocks(num_blocks).shape[1:]


register_sender(CollectiveSender.name, CollectiveSender)


# ---- the decode side --------------------------------------------------------------------------------


class PendingTransfer:
    """A transfer the decode worker expects into its reserved blocks; `wait()` for it or `cancel()` it."""

    def __init__(
        self, key: int, pool: KVPool, block_ids: Sequence[int], loop: asyncio.AbstractEventLoop
    ) -> None:
        self.key = key
        self.pool = pool
        self.block_ids = tuple(block_ids)
        self.index = torch.tensor(self.block_ids, device=pool.kv.device)
        self.lock = threading.Lock()
        self.cancelled = False
        self._loop = loop
        self._done: asyncio.Future[TransferStats] = loop.create_future()
        self.started = time.perf_counter()

    async def wait(self) -> TransferStats:
        """Until every byte is in the reserved blocks. Raises TransferError (PeerLost: the peer died)."""
        return await asyncio.shield(self._done)

    def cancel(self) -> None:
        """From its return on, nothing writes into the reserved blocks (they may be freed). Idempotent."""
        with self.lock:
            self.cancelled = True
        self._loop.call_soon_threadsafe(self._settle, TransferError("transfer cancelled"))

    def write_layer(self, layer: int, blocks: torch.Tensor) -> None:
        """Scatter one received layer into the reserved blocks (the pump's thread), unless cancelled."""
        with self.lock:
            if not self.cancelled:
                self.pool.kv[layer].index_copy_(1, self.index, blocks)
                if blocks.is_cuda:
                    torch.cuda.current_stream(blocks.device).synchronize()

    def settle(self, outcome: TransferStats | BaseException) -> None:
        self._loop.call_soon_threadsafe(self._settle, outcome)

    def _settle(self, outcome: TransferStats | BaseException) -> None:
        if self._done.done():
            return
        if isinstance(outcome, BaseException):
            self._done.set_exception(outcome)
            self._done.exception()  # retrieved, so an unawaited failure is not logged
        else:
            self._done.set_result(outcome)


class _ReceivingPair:
    """One peer's group and the thread that receives its transfers, in the order the peer sends them."""

    def __init__(self, receiver: CollectiveReceiver, peer: str, group_key: str) -> None:
        self.peer = peer
        self.group_key = group_key
        self._receiver = receiver
        self._pending: dict[int, PendingTransfer] = {}
        self._lock = threading.Lock()
        self.broken: BaseException | None = None
        self.group: dist.ProcessGroup | None = None
        self._thread = threading.Thread(target=self._run, name=f"kv-recv-{peer}", daemon=True)
        self._thread.start()

    def expect(self, pending: PendingTransfer) -> None:
        with self._lock:
            if self.broken is not None:
                raise PeerLost(f"the group with {self.peer} is broken: {self.broken}")
            self._pending[pending.key] = pending

    def forget(self, pending: PendingTransfer) -> None:
        with self._lock:
            if self._pending.get(pending.key) is pending:
                del self._pending[pending.key]

    def _run(self) -> None:
        receiver = self._receiver
        try:
            self.group = _new_group(
                receiver.store, self.group_key, RECEIVER_RANK, receiver.backend, receiver.device
            )
            while True:
                self._receive_one(self.group)
        except BaseException as error:  # noqa: BLE001 (the pair is over; its waiters learn why)
            self._break(error)

    def _receive_one(self, group: dist.ProcessGroup) -> None:
        device, layout = self._receiver.device, self._receiver.layout
        header = torch.empty(4, dtype=torch.int64, device=device)
        _wait(group.recv([header], SENDER_RANK, 0), "receiving a header", self.peer)
        magic, key, num_blocks, num_layers = header.tolist()
        if magic != MAGIC or num_layers != layout.num_layers or not 0 < num_blocks <= layout.num_blocks:
            raise PeerLost(
                f"{self.peer} sent a malformed header {header.tolist()}: the stream is out of step"
            )
        with self._lock:
            pending = self._pending.get(key)
        if pending is not None and len(pending.block_ids) != num_blocks:
            pending.settle(
                TransferError(f"{self.peer} sent {num_blocks} blocks for {len(pending.block_ids)} reserved")
            )
            pending = None  # drained into staging, never written
        staging = torch.empty(_layer_shape(layout, num_blocks), dtype=layout.dtype, device=device)
        for layer in range(num_layers):
            _wait(group.recv([staging], SENDER_RANK, 0), "receiving a layer", self.peer)
            if pending is not None:
                pending.write_layer(layer, staging)
        trailer = torch.empty(2, dtype=torch.int64, device=device)
        _wait(group.recv([trailer], SENDER_RANK, 0), "receiving a trailer", self.peer)
        if pending is None:
            return
        self.forget(pending)
        magic, status = trailer.tolist()
        if magic != MAGIC:
            raise PeerLost(f"{self.peer} sent a malformed trailer: the stream is out of step")
        if status != 0:
            pending.settle(TransferError(f"{self.peer} aborted the transfer (its compute failed)"))
        else:
            num_bytes = num_blocks * layout.bytes_per_block
            pending.settle(
                TransferStats(num_bytes, time.perf_counter() - pending.started, CollectiveSender.name)
            )

    def _break(self, error: BaseException) -> None:
        if not isinstance(error, TransferError):
            error = PeerLost(f"the group with {self.peer} failed: {error}")
        with self._lock:
            self.broken = error
            pending, self._pending = list(self._pending.values()), {}
        self._receiver._drop(self)
        for transfer in pending:
            transfer.settle(PeerLost(f"the peer {self.peer} was lost mid-transfer: {error}"))


@dataclass(frozen=True)
class Rendezvous:
    """What the decode worker tells a prefill worker (in `KVDestination`) to join their pair's group."""

    store_address: str
    group_key: str
    backend: str


class CollectiveReceiver:
    """The decode side: hosts the rendezvous store and one receiving group per prefill worker.

    Create it inside the event loop that awaits transfers. `expect(peer, transfer_id, block_ids)` before
    sending the Prefill request; `await pending.wait()` after its done message; `pending.cancel()` when
    the request is cancelled (the blocks may be freed on return).
    """

    def __init__(self, pool: KVPool, advertise_host: str = "127.0.0.1", bind_host: str = "") -> None:
        self.pool = pool
        self.layout = pool.layout
        self.device = pool.kv.device
        self.backend = backend_for(self.device)
        self.store = dist.TCPStore(
            bind_host or advertise_host,
            0,
            is_master=True,
            timeout=datetime.timedelta(seconds=RENDEZVOUS_TIMEOUT_S),
            wait_for_workers=False,
        )
        self.store_address = f"{advertise_host}:{self.store.port}"
        self._pairs: dict[str, _ReceivingPair] = {}
        self._lock = threading.Lock()

    def rendezvous(self, peer: str) -> Rendezvous:
        """The pair's rendezvous for the prefill worker at `peer`; its group is created on first use."""
        return Rendezvous(self.store_address, self._pair(peer).group_key, self.backend)

    def expect(self, peer: str, transfer_id: str, block_ids: Sequence[int]) -> PendingTransfer:
        """Register a transfer into `block_ids`; raises PeerLost when the pair broke meanwhile."""
        check_block_ids(self.layout, block_ids, "destination", unique=True)
        pending = PendingTransfer(transfer_key(transfer_id), self.pool, block_ids, asyncio.get_running_loop())
        self._pair(peer).expect(pending)
        return pending

    def forget(self, peer: str, pending: PendingTransfer) -> None:
        """Stop expecting `pending` (cancelled or failed); its bytes, if they come, are drained."""
        pending.cancel()
        with self._lock:
            pair = self._pairs.get(peer)
        if pair is not None:
            pair.forget(pending)

    def _pair(self, peer: str) -> _ReceivingPair:
        with self._lock:
            pair = self._pairs.get(peer)
            if pair is None:
                pair = self._pairs[peer] = _ReceivingPair(self, peer, uuid.uuid4().hex)
            return pair

    def _drop(self, pair: _ReceivingPair) -> None:
        with self._lock:
            if self._pairs.get(pair.peer) is pair:
                del self._pairs[pair.peer]

    @property
    def num_pairs(self) -> int:
        return len(self._pairs)
