"""The NCCL transport's protocol through its gloo twin, between real processes (spawned senders).

The decode side (this process) hosts the rendezvous store and receives; a spawned process plays the
prefill worker. Rendezvous data goes to it over a pipe here, standing in for the Prefill request.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import signal
import uuid
from collections.abc import Iterator
from multiprocessing.connection import Connection

import pytest
import torch

from kvmesh.engine.kv_cache import KVLayout, KVPool
from kvmesh.transport import KVDestination, TransferError, make_sender
from kvmesh.transport.collective import CollectiveSender, PeerLost
from kvmesh.transport.collective_receiver import CollectiveReceiver

LAYOUT = KVLayout(num_layers=4, num_blocks=24, block_size=4, num_kv_heads=2, head_dim=8, dtype=torch.bfloat16)
BIG_LAYOUT = KVLayout(
    num_layers=8, num_blocks=64, block_size=16, num_kv_heads=8, head_dim=128, dtype=torch.float32
)
_BITS = {2: torch.int16, 4: torch.int32}


def make_source(layout: KVLayout, seed: int) -> KVPool:
    pool = KVPool(layout)
    generator = torch.Generator().manual_seed(seed)
    bits = torch.randint(-(2**15), 2**15, pool.kv.shape, generator=generator, dtype=torch.int32)
    pool.kv.copy_(
        bits.to(_BITS[layout.dtype.itemsize]).view(layout.dtype)
        if layout.dtype.itemsize == 2
        else bits.float()
    )
    return pool


def _sender_main(conn: Connection, layout: KVLayout, seed: int, mode: str) -> None:
    """The prefill worker's side: for each destination received, send the asked blocks."""
    torch.set_num_threads(1)

    async def main() -> None:
        sender = make_sender("nccl")
        pool = make_source(layout, seed)
        while True:
            message = await asyncio.to_thread(conn.recv)
            if message is None:
                break
            src_ids, dest = message
            layer_ready = None
            if mode == "die_after_one_layer":

                async def layer_ready(layer: int) -> None:
                    if layer == 1:
                        os.kill(os.getpid(), signal.SIGKILL)

            elif mode == "slow":

                async def layer_ready(layer: int) -> None:
                    await asyncio.sleep(0.2)

            elif mode == "fail_compute":

                async def layer_ready(layer: int) -> None:
                    if layer == 2:
                        raise RuntimeError("compute failed")

            try:
                stats = await sender.send(pool, src_ids, dest, layer_ready)
                conn.send(("ok", stats.num_bytes))
            except Exception as error:  # noqa: BLE001 (reported to the test)
                conn.send(("error", repr(error)))
        sender.close()

    asyncio.run(main())


@pytest.fixture
def spawn() -> Iterator:
    processes: list[mp.Process] = []
    ctx = mp.get_context("spawn")

    def start(layout: KVLayout, seed: int, mode: str = "") -> tuple[mp.Process, Connection]:
        ours, theirs = ctx.Pipe()
        process = ctx.Process(target=_sender_main, args=(theirs, layout, seed, mode), daemon=True)
        process.start()
        processes.append(process)
        return process, ours

    yield start
    for process in processes:
        process.join(timeout=10)
        if process.is_alive():
            process.kill()


def destination(
    receiver: CollectiveReceiver, peer: str, transfer_id: str, block_ids: list[int]
) -> KVDestination:
    rendezvous = receiver.rendezvous(peer)
    return KVDestination(
        "nccl",
        tuple(block_ids),
        receiver.layout,
        transfer_id=transfer_id,
        store_address=rendezvous.store_address,
        group_key=rendezvous.group_key,
        backend=rendezvous.backend,
    )


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(_BITS[tensor.element_size()])


@pytest.mark.timeout(120)
def test_round_trips_bit_exact_into_scattered_blocks_over_a_cached_group(spawn) -> None:
    async def main() -> None:
        dst = KVPool(LAYOUT)
        receiver = CollectiveReceiver(dst)
        process, conn = spawn(LAYOUT, seed=3)
        source = make_source(LAYOUT, seed=3)
        cases = [
            ([5, 1, 9, 2], [20, 3, 11, 0]),
            ([0, 1, 2, 3, 4, 5], [6, 7, 8, 9, 10, 11]),
            ([7, 7], [1, 23]),
        ]
        keys = set()
        for src_ids, dst_ids in cases:
            transfer_id = uuid.uuid4().hex
            pending = receiver.expect("prefill-a", transfer_id, dst_ids)
            dest = destination(receiver, "prefill-a", transfer_id, dst_ids)
            keys.add(dest.group_key)
            conn.send((src_ids, dest))
            stats = await asyncio.wait_for(pending.wait(), 60)
            assert (await asyncio.to_thread(conn.recv)) == ("ok", stats.num_bytes)
            assert stats.num_bytes == len(dst_ids) * LAYOUT.bytes_per_block
            assert torch.equal(bits(dst.kv[:, :, dst_ids]), bits(source.kv[:, :, src_ids]))
        assert len(keys) == 1 and receiver.num_pairs == 1  # one group for the pair, created once
        untouched = [b for b in range(LAYOUT.num_blocks) if b not in {d for _, ds in cases for d in ds}]
        assert not dst.kv[:, :, untouched].any()
        conn.send(None)

    asyncio.run(main())


@pytest.mark.timeout(120)
def test_cancel_mid_transfer_stops_writes_and_the_pair_stays_usable(spawn) -> None:
    async def main() -> None:
        dst = KVPool(LAYOUT)
        receiver = CollectiveReceiver(dst)
        _, conn = spawn(LAYOUT, seed=5, mode="slow")  # 0.2 s before each layer leaves
        dst_ids = [4, 2, 6]
        transfer_id = uuid.uuid4().hex
        pending = receiver.expect("p", transfer_id, dst_ids)
        conn.send(([1, 2, 3], destination(receiver, "p", transfer_id, dst_ids)))
        await asyncio.sleep(0.5)  # the first layers have landed
        receiver.forget("p", pending)  # the request was cancelled: the blocks may be freed from here
        snapshot = dst.kv.clone()
        with pytest.raises(TransferError, match="cancelled"):
            await pending.wait()
        assert (await asyncio.to_thread(conn.recv))[0] == "ok"  # the sender finished its transfer
        assert torch.equal(bits(dst.kv), bits(snapshot))  # nothing landed after the cancel
        # The next transfer on the same pair arrives intact.
        transfer_id = uuid.uuid4().hex
        pending = receiver.expect("p", transfer_id, [9, 10])
        conn.send(([0, 5], destination(receiver, "p", transfer_id, [9, 10])))
        await asyncio.wait_for(pending.wait(), 60)
        assert torch.equal(bits(dst.kv[:, :, [9, 10]]), bits(make_source(LAYOUT, 5).kv[:, :, [0, 5]]))
        conn.send(None)

    asyncio.run(main())


@pytest.mark.timeout(120)
def test_a_failed_compute_aborts_the_transfer_and_keeps_the_stream_in_step(spawn) -> None:
    async def main() -> None:
        receiver = CollectiveReceiver(KVPool(LAYOUT))
        _, conn = spawn(LAYOUT, seed=1, mode="fail_compute")
        transfer_id = uuid.uuid4().hex
        pending = receiver.expect("p", transfer_id, [0, 1])
        conn.send(([0, 1], destination(receiver, "p", transfer_id, [0, 1])))
        with pytest.raises(TransferError, match="aborted"):
            await asyncio.wait_for(pending.wait(), 60)
        status, message = await asyncio.to_thread(conn.recv)
        assert status == "error" and "compute failed" in message
        assert receiver.num_pairs == 1
        conn.send(None)

    asyncio.run(main())


@pytest.mark.timeout(120)
def test_a_peer_that_dies_mid_transfer_gives_a_clear_error_and_a_new_pair(spawn) -> None:
    async def main() -> None:
        receiver = CollectiveReceiver(KVPool(BIG_LAYOUT))
        process, conn = spawn(BIG_LAYOUT, seed=2, mode="die_after_one_layer")
        transfer_id = uuid.uuid4().hex
        dst_ids = list(range(10, 40))
        pending = receiver.expect("p", transfer_id, dst_ids)
        first = destination(receiver, "p", transfer_id, dst_ids)
        conn.send((list(range(30)), first))
        with pytest.raises(PeerLost, match="lost mid-transfer"):
            await asyncio.wait_for(pending.wait(), 60)
        await asyncio.to_thread(process.join, 10)
        assert process.exitcode == -signal.SIGKILL
        # The broken pair is dropped: the retry (to a new prefill process) rendezvouses afresh.
        assert receiver.num_pairs == 0
        assert receiver.rendezvous("p").group_key != first.group_key

    asyncio.run(main())


def test_a_destination_without_rendezvous_is_refused_before_any_byte() -> None:
    async def main() -> None:
        sender = CollectiveSender()
        dest = KVDestination("nccl", (0,), LAYOUT, transfer_id="t")
        with pytest.raises(ValueError, match="rendezvous"):
            await sender.send(KVPool(LAYOUT), [0], dest)
        with pytest.raises(ValueError, match="transfer_id"):
            await sender.send(KVPool(LAYOUT), [0], KVDestination("nccl", (0,), LAYOUT, store_address="h:1"))

    asyncio.run(main())
