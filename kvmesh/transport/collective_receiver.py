"""The receiving side of the collective transport (see kvmesh.transport.collective): the decode worker's
rendezvous store, one receiving thread per peer, and the transfers it expects."""

from __future__ import annotations

import asyncio
import datetime
import logging
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kvmesh.engine.kv_cache import KVPool
from kvmesh.transport.base import (
    TransferError,
    TransferStats,
    check_block_ids,
)
from kvmesh.transport.collective import (
    MAGIC,
    RECEIVER_RANK,
    RENDEZVOUS_TIMEOUT_S,
    SENDER_RANK,
    CollectiveSender,
    PeerLost,
    backend_for,
    layer_shape,
    new_group,
    transfer_key,
    wait_for,
)

logger = logging.getLogger(__name__)


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
            self.group = new_group(
                receiver.store, self.group_key, RECEIVER_RANK, receiver.backend, receiver.device
            )
            while True:
                self._receive_one(self.group)
        except BaseException as error:  # noqa: BLE001 (the pair is over; its waiters learn why)
            self._break(error)

    def _receive_one(self, group: dist.ProcessGroup) -> None:
        device, layout = self._receiver.device, self._receiver.layout
        header = torch.empty(4, dtype=torch.int64, device=device)
        wait_for(group.recv([header], SENDER_RANK, 0), "receiving a header", self.peer)
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
        staging = torch.empty(layer_shape(layout, num_blocks), dtype=layout.dtype, device=device)
        for layer in range(num_layers):
            wait_for(group.recv([staging], SENDER_RANK, 0), "receiving a layer", self.peer)
            if pending is not None:
                pending.write_layer(layer, staging)
        trailer = torch.empty(2, dtype=torch.int64, device=device)
        wait_for(group.recv([trailer], SENDER_RANK, 0), "receiving a trailer", self.peer)
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
