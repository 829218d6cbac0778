"""gRPC stream transport: KV bytes in checksummed chunks of the Prefill response stream (works anywhere).

Wire format (both sides must agree; the services map these to protobuf fields one to one):

- The stream is the raw bytes of `src_pool.kv[:, :, src_block_ids]`, a C-contiguous
  [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim] tensor in the pools' dtype, native
  (little-endian) byte order. bfloat16 travels as its raw 2 bytes per element, like every dtype.
- It is cut into chunks of `chunk_bytes` (the last one shorter): `KVChunk(offset_bytes, payload,
  crc32)`, `crc32 = zlib.crc32(payload)`, sent in offset order with no gap.
- A done message closes it: the total bytes and the crc32 of the whole stream (`KVChunkEncoder.crc32`).

The prefill side reads its pool straight into each chunk's payload (one copy, no gathered tensor),
all at once or layer by layer as the prompt's last chunk is computed (`KVChunkEncoder.achunks`);
the decode side verifies each chunk, then writes it straight into its reserved blocks (one copy).
"""

from __future__ import annotations

import functools
import time
import zlib
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass

import torch

from kvmesh.engine.kv_cache import KVPool
from kvmesh.transport.base import (
    STREAM_TRANSPORT,
    KVDestination,
    LayerReady,
    TransferError,
    TransferStats,
    check_block_ids,
    check_transfer,
)

DEFAULT_CHUNK_BYTES = 1 << 20
"""1 MiB: big enough that per-message costs vanish, well under gRPC's 4 MiB default message limit."""


@dataclass(frozen=True)
class KVChunk:
    """One piece of the stream: bytes [offset_bytes, offset_bytes + len(payload)) of the wire tensor."""

    offset_bytes: int
    payload: bytes | memoryview
    """bytes from the encoder; the receiver takes any bytes-like view (e.g. into a received message)."""
    crc32: int
    """zlib.crc32 of payload."""


def iter_chunks(
    src_pool: KVPool,
    src_block_ids: Sequence[int],
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    *,
    dest: KVDestination | None = None,
) -> KVChunkEncoder:
    """The chunks that carry `src_block_ids` of `src_pool`; see `KVChunkEncoder`.

    Pass the decode side's `dest` to check the transfer before anything is sent (layouts, block counts):
    a dtype mismatch between the two pools would otherwise arrive as well-formed garbage.
    """
    return KVChunkEncoder(src_pool, src_block_ids, chunk_bytes, dest=dest)


class KVChunkEncoder(Iterator[KVChunk]):
    """Iterates the chunks of one transfer (the prefill side); single use.

    Each chunk is a snapshot taken when it is produced, so the source blocks must stay unchanged until
    the iteration ends. `num_bytes` is known up front; `crc32` once the last chunk was produced.
    Raises ValueError at construction for a malformed transfer (ids out of range, bad `dest`).
    """

    def __init__(
        self,
        src_pool: KVPool,
        src_block_ids: Sequence[int],
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        *,
        dest: KVDestination | None = None,
    ) -> None:
        if chunk_bytes <= 0:
            raise ValueError(f"chunk_bytes must be positive, got {chunk_bytes}")
        if dest is not None:
            if dest.transport != STREAM_TRANSPORT:
                raise ValueError(f"destination wants transport {dest.transport!r}, not {STREAM_TRANSPORT!r}")
            check_transfer(src_pool.layout, src_block_ids, dest)
        check_block_ids(src_pool.layout, src_block_ids, "source", unique=False)
        self.num_bytes = len(src_block_ids) * src_pool.layout.bytes_per_block
        self._crc32: int | None = None
        self._src_pool = src_pool
        self._src_block_ids = list(src_block_ids)
        self._chunk_bytes = chunk_bytes
        self._chunks = self._generate()

    @property
    def crc32(self) -> int:
        """zlib.crc32 of the whole stream. Raises RuntimeError before the last chunk was produced."""
        if self._crc32 is None:
            raise RuntimeError("the stream's crc32 is known only after its last chunk")
        return self._crc32

    def __next__(self) -> KVChunk:
        return next(self._chunks)

    async def achunks(self, layer_ready: LayerReady) -> AsyncIterator[KVChunk]:
        """The same chunks as iterating, but layer l's bytes are read only once `layer_ready(l)` returned
        (layer-wise transfer: the wire is layer-major, so each layer is a contiguous range of it)."""
        chunker = _Chunker(self._chunk_bytes)
        for layer in range(self._src_pool.layout.num_layers):
            await layer_ready(layer)
            for segment in _wire_segments(self._src_pool, self._src_block_ids, layer):
                for chunk in chunker.feed(segment):
                    yield chunk
        for chunk in chunker.flush():
            yield chunk
        self._crc32 = chunker.crc32

    def _generate(self) -> Iterator[KVChunk]:
        chunker = _Chunker(self._chunk_bytes)
        for layer in range(self._src_pool.layout.num_layers):
            for segment in _wire_segments(self._src_pool, self._src_block_ids, layer):
                yield from chunker.feed(segment)
        yield from chunker.flush()
        self._crc32 = chunker.crc32


class _Chunker:
    """Cuts a stream of byte segments into chunks of `chunk_bytes` (the last one shorter)."""

    def __init__(self, chunk_bytes: int) -> None:
        self._chunk_bytes = chunk_bytes
        self._offset = 0
        self._pieces: list[memoryview] = []
        self._num_pending = 0
        self.crc32 = 0
        """zlib.crc32 of every chunk made so far."""

    def feed(self, segment: memoryview) -> Iterator[KVChunk]:
        # NOTE: pieces are views into the pool; a chunk copies them when it is made, so a segment must
        # stay unchanged until the chunk that ends after it was made (the source blocks are final).
        while len(segment) > 0:
            take = min(len(segment), self._chunk_bytes - self._num_pending)
            self._pieces.append(segment[:take])
            segment = segment[take:]
            self._num_pending += take
            if self._num_pending == self._chunk_bytes:
                yield self._emit()

    def flush(self) -> Iterator[KVChunk]:
        if self._num_pending:
            yield self._emit()

    def _emit(self) -> KVChunk:
        chunk = _make_chunk(self._offset, self._pieces)
        self.crc32 = crc32_combine(self.crc32, chunk.crc32, self._num_pending)
        self._offset += self._num_pending
        self._pieces, self._num_pending = [], 0
        return chunk


def _make_chunk(offset: int, pieces: list[memoryview]) -> KVChunk:
    payload = b"".join(pieces)
    return KVChunk(offset, payload, zlib.crc32(payload))


class KVChunkReceiver:
    """Verifies a transfer's chunks and writes them into reserved blocks of `dst_pool` (the decode side).

    `add` each chunk in stream order, then `finish` with the done message's totals. The clock starts at
    construction: build it when the first chunk arrives to time the transfer alone. After any
    TransferError the receiver is failed (every later call raises) and the reserved blocks hold partial
    data: the caller frees them.
    """

    def __init__(self, dst_pool: KVPool, block_ids: Sequence[int]) -> None:
        check_block_ids(dst_pool.layout, block_ids, "destination", unique=True)
        self.num_bytes = len(block_ids) * dst_pool.layout.bytes_per_block
        self.num_bytes_received = 0
        self._dst_pool = dst_pool
        self._block_ids = list(block_ids)
        self._staging: torch.Tensor | None = None
        if _on_host(dst_pool.kv):
            layers = range(dst_pool.layout.num_layers)
            self._segments = [
                seg for layer in layers for seg in _pool_segments(dst_pool.kv, block_ids, layer)
            ]
        else:
            # Device pools: receive into host memory, copy to the device in finish().
            shape = dst_pool.layout.with_blocks(len(block_ids)).shape
            self._staging = torch.empty(shape, dtype=dst_pool.layout.dtype)
            self._segments = [_byte_view(self._staging)]
        self._segment_index = 0
        self._segment_offset = 0
        self._crc32 = 0
        self._error: str | None = None
        self._finished = False
        self._started = time.perf_counter()

    def add(self, chunk: KVChunk) -> None:
        """Verify `chunk` and write its bytes into the reserved blocks.

        Changes only the reserved blocks, and only after the chunk's checksum matched. Raises
        TransferError for a checksum mismatch, an offset other than the next expected byte (a lost,
        repeated or reordered chunk), more bytes than the reserved blocks hold, or use after finish.
        """
        self._check_usable()
        payload = memoryview(chunk.payload).cast("B")
        if chunk.offset_bytes != self.num_bytes_received:
            self._fail(
                f"chunk at offset {chunk.offset_bytes}, expected {self.num_bytes_received}: "
                "a chunk was lost, repeated or reordered"
            )
        if self.num_bytes_received + len(payload) > self.num_bytes:
            self._fail(
                f"chunk at offset {chunk.offset_bytes} of {len(payload)} bytes overflows the "
                f"{self.num_bytes} bytes of {len(self._block_ids)} reserved blocks"
            )
        crc = zlib.crc32(payload)
        if crc != chunk.crc32:
            self._fail(
                f"chunk at offset {chunk.offset_bytes}: crc32 {crc:#010x}, sender said {chunk.crc32:#010x}"
            )
        self._write(payload)
        self._crc32 = crc32_combine(self._crc32, crc, len(payload))
        self.num_bytes_received += len(payload)

    def finish(self, total_bytes: int, total_crc32: int) -> TransferStats:
        """Check the done message's totals against what arrived; then the reserved blocks are complete.

        Raises TransferError if the sender's total differs from the reserved size, bytes are missing,
        or the stream's crc32 differs.
        """
        self._check_usable()
        if total_bytes != self.num_bytes:
            self._fail(
                f"sender streamed {total_bytes} bytes, the {len(self._block_ids)} reserved blocks hold {self.num_bytes}"
            )
        if self.num_bytes_received != self.num_bytes:
            self._fail(f"missing bytes: received {self.num_bytes_received} of {self.num_bytes}")
        if self._crc32 != total_crc32:
            self._fail(f"stream crc32 {self._crc32:#010x}, sender said {total_crc32:#010x}")
        if self._staging is not None:
            self._dst_pool.scatter(self._block_ids, self._staging)
        self._finished = True
        return TransferStats(self.num_bytes, time.perf_counter() - self._started, STREAM_TRANSPORT)

    def _write(self, payload: memoryview) -> None:
        # Segments are the reserved blocks' bytes in wire order; a chunk may span several.
        while len(payload) > 0:
            segment = self._segments[self._segment_index]
            take = min(len(payload), len(segment) - self._segment_offset)
            segment[self._segment_offset : self._segment_offset + take] = payload[:take]
            payload = payload[take:]
            self._segment_offset += take
            if self._segment_offset == len(segment):
                self._segment_index += 1
                self._segment_offset = 0

    def _check_usable(self) -> None:
        if self._error is not None:
            raise TransferError(f"transfer already failed: {self._error}")
        if self._finished:
            raise TransferError("transfer already finished")

    def _fail(self, message: str) -> None:
        self._error = message
        raise TransferError(message)


def _on_host(tensor: torch.Tensor) -> bool:
    """Whether the bytes can be read and written in place; device pools go through a host copy."""
    return tensor.device.type == "cpu"


def _byte_view(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, writable, shared with it (any dtype, bfloat16 included)."""
    # NOTE: through uint8 because numpy has no bfloat16.
    return tensor.reshape(-1).view(torch.uint8).numpy().data


def _pool_segments(kv: torch.Tensor, block_ids: Sequence[int], layer: int) -> Iterator[memoryview]:
    """Byte views of one layer of a CPU pool's blocks in wire order, one per (K/V, run of consecutive ids)."""
    if not kv.is_contiguous():
        raise ValueError("KV pool tensor must be contiguous")
    _, num_parts, num_blocks = kv.shape[:3]
    block_bytes = kv[0, 0, 0].numel() * kv.element_size()  # one block of one layer's K or V
    runs: list[tuple[int, int]] = []  # (first block id, number of blocks)
    for block_id in block_ids:
        if runs and block_id == runs[-1][0] + runs[-1][1]:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((block_id, 1))
    pool_bytes = _byte_view(kv)
    for part in range(num_parts):
        base = (layer * num_parts + part) * num_blocks * block_bytes
        for first, n in runs:
            start = base + first * block_bytes
            yield pool_bytes[start : start + n * block_bytes]


def _wire_segments(src_pool: KVPool, block_ids: Sequence[int], layer: int) -> Iterator[memoryview]:
    """One layer's bytes of the wire stream (the wire is layer-major)."""
    if _on_host(src_pool.kv):
        return _pool_segments(src_pool.kv, block_ids, layer)
    # Device pools: one gather of the layer to host memory.
    index = torch.tensor(list(block_ids), device=src_pool.kv.device)
    return iter([_byte_view(src_pool.kv[layer].index_select(1, index).cpu().contiguous())])


# crc32_combine from zlib (not exposed by Python's zlib): the stream's crc32 from the chunks' crc32s,
# without a second pass over the bytes. Arithmetic on polynomials over GF(2) modulo the CRC-32
# polynomial, bit-reflected like zlib.crc32.
_CRC32_POLY = 0xEDB88320


def _multmodp(a: int, b: int) -> int:
    """a * b modulo the CRC-32 polynomial."""
    m = 1 << 31
    product = 0
    while True:
        if a & m:
            product ^= b
            if a & (m - 1) == 0:
                return product
        m >>= 1
        b = (b >> 1) ^ _CRC32_POLY if b & 1 else b >> 1


def _x2n_table() -> list[int]:
    table = [1 << 30]  # x^1
    for _ in range(31):
        table.append(_multmodp(table[-1], table[-1]))  # x^(2^k)
    return table


_X2N_TABLE = _x2n_table()


@functools.lru_cache(maxsize=64)
def _x8nmodp(num_bytes: int) -> int:
    """x^(8 * num_bytes) modulo the CRC-32 polynomial; cached because chunks mostly share one size."""
    p = 1 << 31  # x^0
    k = 3
    while num_bytes:
        if num_bytes & 1:
            p = _multmodp(_X2N_TABLE[k & 31], p)
        num_bytes >>= 1
        k += 1
    return p


def crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """zlib.crc32(a + b) from crc1 = zlib.crc32(a), crc2 = zlib.crc32(b) and len2 = len(b)."""
    return _multmodp(_x8nmodp(len2), crc1) ^ crc2
