"""KV transports: every transport round-trips bit-exact; corrupt, missing and misdirected bytes are errors."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmesh.engine.kv_cache import KVLayout, KVPool
from kvmesh.transport import (
    KVChunk,
    KVChunkReceiver,
    KVDestination,
    SharedKVPool,
    ShmSender,
    TransferError,
    TransferStats,
    check_transfer,
    copy_blocks,
    crc32_combine,
    grpc_stream,
    iter_chunks,
    make_sender,
    register_sender,
)
from kvmesh.transport.base import block_runs, run_copy

REPO_ROOT = Path(__file__).resolve().parents[2]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
_BITS_DTYPE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def make_layout(dtype: torch.dtype = torch.bfloat16, num_blocks: int = 12) -> KVLayout:
    return KVLayout(
        num_layers=3, num_blocks=num_blocks, block_size=4, num_kv_heads=2, head_dim=8, dtype=dtype
    )


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bits, so comparisons are exact (NaN payloads, -0.0) for every dtype."""
    return tensor.view(_BITS_DTYPE[tensor.element_size()])


def fill_random(pool: KVPool, seed: int) -> KVPool:
    # Random bit patterns, NaNs and infinities included: a transport copies bytes, never values.
    generator = torch.Generator().manual_seed(seed)
    raw = bits(pool.kv)
    info = torch.iinfo(raw.dtype)
    raw.copy_(torch.randint(info.min, info.max, raw.shape, generator=generator, dtype=raw.dtype))
    return pool


def make_pool(layout: KVLayout, seed: int) -> KVPool:
    return fill_random(KVPool(layout), seed)


def reference_copy(
    src: KVPool, src_ids: Sequence[int], dst: torch.Tensor, dst_ids: Sequence[int]
) -> torch.Tensor:
    expected = bits(dst).clone()
    expected[:, :, list(dst_ids)] = bits(src.kv)[:, :, list(src_ids)]
    return expected


@contextlib.contextmanager
def destination_pool(
    transport: str, layout: KVLayout
) -> Iterator[tuple[KVPool, Callable[[Sequence[int]], KVDestination]]]:
    """A decode-side pool that `transport` can reach, and how its owner describes reserved blocks to a
    writer (shm: signed with the pool's grant key, as the decode worker does)."""
    if transport == "shm":
        pool, segment = SharedKVPool.create(layout)
        with segment:
            yield pool, lambda ids: segment.destination("request-1", ids, host_id="")
    else:
        yield KVPool(layout), lambda ids: KVDestination(transport, tuple(ids), layout)


def transfer(
    transport: str, src: KVPool, src_ids: list[int], dst: KVPool, dest: KVDestination
) -> TransferStats:
    """Move blocks with `transport`, as the services do (push senders find `dst` through `dest`)."""
    if transport != "grpc":
        sender = make_sender(transport)
        try:
            return asyncio.run(sender.send(src, src_ids, dest))
        finally:
            sender.close()
    chunks = iter_chunks(src, src_ids, chunk_bytes=1000, dest=dest)
    receiver = KVChunkReceiver(dst, dest.block_ids)
    for chunk in chunks:  # (the Prefill response stream)
        receiver.add(chunk)
    return receiver.finish(chunks.num_bytes, chunks.crc32)


# -- every transport round-trips bit-exact ---------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("transport", ["shm", "grpc"])
def test_round_trip_is_bit_exact(transport: str, dtype: torch.dtype, no_leaked_segments: None) -> None:
    src = make_pool(make_layout(dtype, num_blocks=12), seed=1)
    src_ids = [7, 2, 3, 4, 11, 0]  # a run (2, 3, 4) between scattered ids
    dst_ids = [5, 9, 10, 11, 1, 14]
    dst_layout = make_layout(dtype, num_blocks=16)  # the pools differ in size, not in block layout
    with destination_pool(transport, dst_layout) as (dst, destination):
        fill_random(dst, seed=2)
        before = bits(dst.kv).clone()
        dest = destination(dst_ids)
        stats = transfer(transport, src, src_ids, dst, dest)
        assert torch.equal(bits(dst.kv), reference_copy(src, src_ids, before, dst_ids))
    assert stats == TransferStats(6 * dst_layout.bytes_per_block, stats.seconds, transport)


block_pairs = st.integers(
    min_value=1, max_value=10
).flatmap(
    lambda n: st.tuples(
        st.lists(st.integers(0, 11), min_size=n, max_size=n),  # source ids may repeat
        st.one_of(  # destination ids are distinct: scattered, or one fresh run
            st.permutations(range(14)).map(lambda ids: ids[:n]),
            st.integers(0, 14 - n).map(lambda start: list(range(start, start + n))),
        ),
    )
)


@settings(max_examples=40, deadline=None)
@given(ids=block_pairs, seed=st.integers(0, 2**16))
def test_copy_blocks_matches_indexing(ids: tuple[list[int], list[int]], seed: int) -> None:
    src_ids, dst_ids = ids
    src = make_pool(make_layout(num_blocks=12), seed)
    dst = make_pool(make_layout(num_blocks=14), seed + 1)
    expected = reference_copy(src, src_ids, dst.kv, dst_ids)
    copy_blocks(src.kv, src_ids, dst.kv, dst_ids)
    assert torch.equal(bits(dst.kv), expected)


@settings(max_examples=40, deadline=None)
@given(
    ids=block_pairs,
    chunk_bytes=st.sampled_from([1, 7, 64, 500, 1536, 4096, 1 << 20]),
    dtype=st.sampled_from(DTYPES),
)
def test_grpc_chunks_round_trip(
    ids: tuple[list[int], list[int]], chunk_bytes: int, dtype: torch.dtype
) -> None:
    src_ids, dst_ids = ids
    src = make_pool(make_layout(dtype, num_blocks=12), seed=3)
    dst = make_pool(make_layout(dtype, num_blocks=14), seed=4)
    expected = reference_copy(src, src_ids, dst.kv, dst_ids)
    chunks = iter_chunks(src, src_ids, chunk_bytes)
    receiver = KVChunkReceiver(dst, dst_ids)
    wire = bytearray()
    for chunk in chunks:
        assert 0 < len(chunk.payload) <= chunk_bytes
        wire += chunk.payload
        receiver.add(chunk)
    receiver.finish(chunks.num_bytes, chunks.crc32)
    assert torch.equal(bits(dst.kv), expected)
    # The wire format is the bytes of the gathered [L, 2, n, B, H, D] tensor, as documented.
    assert bytes(wire) == src.gather(src_ids).contiguous().view(torch.uint8).numpy().tobytes()
    assert chunks.crc32 == zlib.crc32(wire)


def test_grpc_device_pools_go_through_a_host_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    # The staging path that device (CUDA) pools take, exercised on CPU tensors.
    monkeypatch.setattr(grpc_stream, "_on_host", lambda tensor: False)
    src = make_pool(make_layout(num_blocks=12), seed=5)
    dst = make_pool(make_layout(num_blocks=14), seed=6)
    src_ids, dst_ids = [1, 5, 6, 2], [13, 0, 4, 5]
    expected = reference_copy(src, src_ids, dst.kv, dst_ids)
    chunks = iter_chunks(src, src_ids, chunk_bytes=333)
    receiver = KVChunkReceiver(dst, dst_ids)
    before = bits(dst.kv).clone()
    for chunk in chunks:
        receiver.add(chunk)
    assert torch.equal(bits(dst.kv), before)  # the device pool is written once, in finish()
    receiver.finish(chunks.num_bytes, chunks.crc32)
    assert torch.equal(bits(dst.kv), expected)


@settings(max_examples=60, deadline=None)
@given(a=st.binary(max_size=300), b=st.binary(max_size=300))
def test_crc32_combine_matches_zlib(a: bytes, b: bytes) -> None:
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


# -- corrupt, missing and misdirected bytes --------------------------------------------------------


def stream(src_ids: list[int], chunk_bytes: int = 300) -> tuple[list[KVChunk], int, int, KVPool]:
    src = make_pool(make_layout(), seed=9)
    encoder = iter_chunks(src, src_ids, chunk_bytes)
    chunks = list(encoder)
    return chunks, encoder.num_bytes, encoder.crc32, make_pool(make_layout(), seed=10)


def test_corrupted_chunk_is_rejected_before_writing() -> None:
    chunks, _, _, dst = stream([1, 2])
    receiver = KVChunkReceiver(dst, [3, 4])
    receiver.add(chunks[0])
    before = bits(dst.kv).clone()
    bad = bytearray(chunks[1].payload)
    bad[17] ^= 0x01
    with pytest.raises(TransferError, match="crc32"):
        receiver.add(KVChunk(chunks[1].offset_bytes, bytes(bad), chunks[1].crc32))
    assert torch.equal(bits(dst.kv), before)
    with pytest.raises(TransferError, match="already failed"):
        receiver.add(chunks[1])


@pytest.mark.parametrize("fault", ["lost", "repeated", "reordered"])
def test_out_of_order_chunks_are_rejected(fault: str) -> None:
    chunks, _, _, dst = stream([1, 2])
    receiver = KVChunkReceiver(dst, [3, 4])
    receiver.add(chunks[0])
    wrong = {"lost": chunks[2], "repeated": chunks[0], "reordered": chunks[3]}[fault]
    with pytest.raises(TransferError, match=f"chunk at offset {wrong.offset_bytes}, expected 300"):
        receiver.add(wrong)


def test_missing_bytes_fail_finish() -> None:
    chunks, num_bytes, crc, dst = stream([1, 2])
    receiver = KVChunkReceiver(dst, [3, 4])
    for chunk in chunks[:-1]:
        receiver.add(chunk)
    with pytest.raises(TransferError, match="missing bytes"):
        receiver.finish(num_bytes, crc)


def test_finish_checks_the_senders_totals() -> None:
    chunks, num_bytes, crc, dst = stream([1, 2])
    receiver = KVChunkReceiver(dst, [3, 4])
    for chunk in chunks:
        receiver.add(chunk)
    with pytest.raises(TransferError, match="sender streamed"):
        receiver.finish(num_bytes + 1, crc)
    receiver = KVChunkReceiver(dst, [3, 4])
    for chunk in chunks:
        receiver.add(chunk)
    with pytest.raises(TransferError, match="stream crc32"):
        receiver.finish(num_bytes, crc ^ 1)
    receiver = KVChunkReceiver(dst, [3, 4])
    for chunk in chunks:
        receiver.add(chunk)
    receiver.finish(num_bytes, crc)
    with pytest.raises(TransferError, match="already finished"):
        receiver.add(chunks[0])


def test_more_bytes_than_reserved_is_an_overflow() -> None:
    chunks, _, _, dst = stream([1, 2, 3])  # three blocks' worth, two reserved
    receiver = KVChunkReceiver(dst, [3, 4])
    with pytest.raises(TransferError, match="overflows"):
        for chunk in chunks:
            receiver.add(chunk)


def test_encoder_crc_needs_the_whole_stream() -> None:
    encoder = iter_chunks(make_pool(make_layout(), seed=0), [0])
    with pytest.raises(RuntimeError):
        _ = encoder.crc32


def test_mismatched_layouts_are_a_clear_value_error() -> None:
    src = make_pool(make_layout(torch.bfloat16), seed=0)
    other = KVLayout(
        num_layers=3, num_blocks=12, block_size=4, num_kv_heads=1, head_dim=16, dtype=torch.float16
    )
    with pytest.raises(
        ValueError, match=r"num_kv_heads 2 vs 1, head_dim 8 vs 16, dtype torch.bfloat16 vs torch.float16"
    ):
        check_transfer(src.layout, [0], KVDestination("grpc", (0,), other))
    with pytest.raises(ValueError, match="dtype"):
        iter_chunks(src, [0], dest=KVDestination("grpc", (0,), make_layout(torch.float16)))
    with pytest.raises(ValueError, match="2 source blocks for 1 destination blocks"):
        check_transfer(src.layout, [0, 1], KVDestination("grpc", (0,), src.layout))
    with pytest.raises(ValueError, match="out of range"):
        check_transfer(src.layout, [12], KVDestination("grpc", (0,), src.layout))
    with pytest.raises(ValueError, match="repeat"):
        check_transfer(src.layout, [0, 1], KVDestination("grpc", (3, 3), src.layout))
    with pytest.raises(ValueError, match="repeat"):
        KVChunkReceiver(src, [3, 3])
    with pytest.raises(ValueError, match="wants transport 'grpc'"):
        asyncio.run(ShmSender().send(src, [0], KVDestination("grpc", (0,), src.layout)))


def test_cancelling_a_send_waits_for_the_copy() -> None:
    # The caller frees the blocks a copy touches once the send ends, cancelled or not.
    done = threading.Event()

    def slow_copy() -> None:
        time.sleep(0.2)
        done.set()

    async def main() -> None:
        task = asyncio.create_task(run_copy(slow_copy, num_bytes=1 << 30))
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert done.is_set()

    asyncio.run(main())


# -- the sender registry ---------------------------------------------------------------------------


class _OtherSender(ShmSender):
    """Another class, to register under a taken name."""


def test_sender_registry() -> None:
    assert isinstance(make_sender("shm"), ShmSender)
    with pytest.raises(ValueError, match="stream transport"):
        make_sender("grpc")
    with pytest.raises(ValueError, match="unknown transport 'carrier-pigeon'"):
        make_sender("carrier-pigeon")
    register_sender("shm", ShmSender)  # re-registering the same class is fine
    with pytest.raises(ValueError, match="already registered"):
        register_sender("shm", _OtherSender)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_copy_blocks_gathers_scattered_blocks_into_a_destination_run(dtype: torch.dtype) -> None:
    # 10 single-block runs vs 1 destination run x 6 slabs: copy_blocks takes the per-slab gather path.
    src = make_pool(make_layout(dtype, num_blocks=12), seed=11)
    dst = make_pool(make_layout(dtype, num_blocks=14), seed=12)
    src_ids, dst_ids = [9, 0, 4, 11, 2, 7, 7, 5, 1, 10], list(range(3, 13))
    expected = reference_copy(src, src_ids, dst.kv, dst_ids)
    copy_blocks(src.kv, src_ids, dst.kv, dst_ids)
    assert torch.equal(bits(dst.kv), expected)


def test_block_runs_find_runs_in_any_listing_order() -> None:
    assert block_runs([5, 3, 4, 9], [2, 0, 1, 7]) == [(3, 0, 3), (9, 7, 1)]
    assert block_runs([1, 2, 3], [3, 2, 1]) == [(3, 1, 1), (2, 2, 1), (1, 3, 1)]
    assert block_runs([], []) == []
