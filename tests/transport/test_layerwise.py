"""Layer-wise transfer: blocks that leave layer by layer during the last chunk equal a whole transfer.

A real engine loop computes a prompt in several chunks; the transfer starts before the compute and each
layer leaves when the last chunk computed it. What lands must equal, bit for bit, the blocks shipped
in one piece after the compute, on shm and on the gRPC stream (chunk for chunk, crc32 included).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
import torch

from kvmesh.engine.engine import Engine
from kvmesh.engine.kv_cache import KVPool
from kvmesh.engine.loop import EngineLoop
from kvmesh.engine.sequence import Sequence
from kvmesh.transport import KVChunk, KVChunkReceiver, SharedKVPool, ShmSender, iter_chunks
from kvmesh.transport.base import LayerReady
from kvmesh.transport.layerwise import LayerProgress, LayerWatch
from tests.factories import make_engine

_BITS = {2: torch.int16, 4: torch.int32}
PROMPT = [(7 * i + 3) % 250 + 10 for i in range(150)]


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(_BITS[tensor.element_size()])


async def compute_layerwise(
    engine: Engine, ship: Callable[[list[int], LayerReady], object]
) -> tuple[Sequence, list[int], list[int]]:
    """Compute PROMPT prefill-only through an engine loop while `ship` sends it layer by layer; returns
    the sequence, its block ids, and the layers in the order they were reported ready."""
    loop = EngineLoop(engine)
    progress = LayerProgress(engine, loop)
    task = loop.start()
    seq = engine.add_sequence(PROMPT)
    seq.prefill_only = True
    watch: LayerWatch = progress.watch(seq)
    order: list[int] = []

    async def layer_ready(layer: int) -> None:
        await watch.layer_ready(layer)
        order.append(layer)

    async def compute() -> None:
        stream = await loop.submit(seq)
        outcome = await stream.outputs.get()
        assert not isinstance(outcome, BaseException)
        watch.complete()

    computing = asyncio.ensure_future(compute())
    await watch.final_pass()
    assert seq.num_computed_tokens < len(seq)  # the transfer began before the compute ended
    block_ids = list(seq.block_table)
    await ship(block_ids, layer_ready)  # type: ignore[misc]
    await computing
    task.cancel()
    return seq, block_ids, order


@pytest.fixture
def engine() -> Engine:
    engine = make_engine(prefill_chunk_size=32, num_blocks=64)
    assert engine.pool.layout.num_layers >= 2
    return engine


def test_shm_layerwise_equals_the_whole_transfer(engine: Engine) -> None:
    async def main() -> None:
        layout = engine.pool.layout
        with_layers_pool, with_layers = SharedKVPool.create(layout)
        whole_pool, whole = SharedKVPool.create(layout)
        sender = ShmSender()
        try:
            dst_ids: list[int] = []

            async def ship(block_ids: list[int], layer_ready: LayerReady) -> None:
                dst_ids.extend(range(40, 40 - len(block_ids), -1))  # scattered, descending
                dest = with_layers.destination("r1", dst_ids, "h")
                await sender.send(engine.pool, block_ids, dest, layer_ready)

            _, block_ids, order = await compute_layerwise(engine, ship)
            assert order == list(range(layout.num_layers))
            await sender.send(engine.pool, block_ids, whole.destination("r2", dst_ids, "h"))
            assert torch.equal(bits(with_layers_pool.kv), bits(whole_pool.kv))
            assert with_layers_pool.kv[:, :, dst_ids].abs().sum() > 0
        finally:
            sender.close()
            with_layers.close()
            whole.close()

    asyncio.run(main())


def test_grpc_stream_layerwise_equals_the_whole_stream_chunk_for_chunk(engine: Engine) -> None:
    async def main() -> None:
        layout = engine.pool.layout
        streamed: list[KVChunk] = []
        crcs: list[int] = []

        async def ship(block_ids: list[int], layer_ready: LayerReady) -> None:
            encoder = iter_chunks(engine.pool, block_ids, chunk_bytes=3000)
            async for chunk in encoder.achunks(layer_ready):
                streamed.append(chunk)
            crcs.append(encoder.crc32)

        _, block_ids, _ = await compute_layerwise(engine, ship)
        whole = iter_chunks(engine.pool, block_ids, chunk_bytes=3000)
        expected = list(whole)
        assert [(c.offset_bytes, bytes(c.payload), c.crc32) for c in streamed] == [
            (c.offset_bytes, bytes(c.payload), c.crc32) for c in expected
        ]
        assert crcs == [whole.crc32]
        dst = KVPool(layout)
        dst_ids = list(range(len(block_ids) + 5, 5, -1))
        receiver = KVChunkReceiver(dst, dst_ids)
        for chunk in streamed:
            receiver.add(chunk)
        receiver.finish(whole.num_bytes, whole.crc32)
        assert torch.equal(bits(dst.kv[:, :, dst_ids]), bits(engine.pool.kv[:, :, block_ids]))

    asyncio.run(main())


def test_a_failed_pass_reaches_the_waiting_transfer() -> None:
    async def main() -> None:
        engine = make_engine(prefill_chunk_size=32, num_blocks=64)
        loop = EngineLoop(engine)
        progress = LayerProgress(engine, loop)
        seq = engine.add_sequence(PROMPT)
        watch = progress.watch(seq)
        watch.fail(RuntimeError("pass failed"))
        with pytest.raises(RuntimeError, match="pass failed"):
            await watch.final_pass()
        with pytest.raises(RuntimeError, match="pass failed"):
            await watch.layer_ready(0)

    asyncio.run(main())
