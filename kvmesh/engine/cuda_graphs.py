"""Decode passes over static buffers, captured once per batch size as CUDA graphs and replayed.

A decode pass (every sequence adds one token) has the same shapes whenever its batch size is the same, so on
CUDA it can be captured once per size and replayed: one graph launch instead of the few hundred kernel
launches a pass makes from Python, which is what bounds a decode step of a small batch on a GPU. The pass
reads its inputs from buffers that never move (token ids, positions, KV slots, the Triton kernel's
metadata); a batch of B sequences runs the smallest captured size >= B, its extra rows attending to, and
writing into, a scratch block of the pool that no sequence owns.

With capture off the same buffers run eagerly (the CPU, where the kernel runs in Triton's interpreter):
the tests check the buffer plumbing there against the ordinary path, and only the capture and the replay
need a GPU (`tests/engine/test_triton_attention.py`, marked gpu).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from typing import TYPE_CHECKING

import torch

from kvmesh.engine.attention import AttentionBatch
from kvmesh.engine.kv_cache import num_blocks_for_tokens
from kvmesh.engine.sequence import Sequence
from kvmesh.engine.triton_attention import PagedAttentionMetadata

if TYPE_CHECKING:
    from kvmesh.engine.engine import Engine

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
"""Batch sizes captured (those up to the engine's max_num_seqs)."""


class DecodeGraphs:
    """Static-buffer decode passes for an engine on the "triton" attention backend."""

    def __init__(self, engine: Engine, batch_sizes: Seq[int] = DEFAULT_BATCH_SIZES, *, capture: bool) -> None:
        if engine.attention_backend != "triton":
            raise ValueError(
                "decode graphs need the triton attention backend (its metadata has fixed shapes); "
                f"this engine runs {engine.attention_backend!r}"
            )
        if capture and engine.device.type != "cuda":
            raise ValueError(f"CUDA graphs capture on a CUDA device, not {engine.device}")
        limit = engine.engine_config.max_num_seqs
        self.sizes = sorted({min(size, limit) for size in batch_sizes if size >= 1})
        self.engine = engine
        max_size = self.sizes[-1]
        pool_tokens = engine.pool.layout.num_blocks * engine.block_size
        self.max_blocks = num_blocks_for_tokens(
            min(engine.config.max_position_embeddings, pool_tokens), engine.block_size
        )
        # NOTE: one block taken from the pool for good: padding rows write their K/V there and attend to it.
        [self.scratch_block] = engine.pool.allocator.allocate(1)
        device, i32 = engine.device, torch.int32
        self.input_ids = torch.zeros(max_size, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_size, dtype=torch.int64, device=device)
        self.slot_mapping = torch.zeros(max_size, dtype=torch.int64, device=device)
        self.block_tables = torch.full(
            (max_size, self.max_blocks), self.scratch_block, dtype=i32, device=device
        )
        self.num_cached = torch.zeros(max_size, dtype=i32, device=device)
        self.num_new = torch.ones(max_size, dtype=i32, device=device)
        self.query_start = torch.arange(max_size, dtype=i32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        if capture:
            self._capture_all()

    def size_for(self, batch_size: int) -> int | None:
        """The smallest size at or above batch_size, or None when the batch is larger than every size."""
        return next((size for size in self.sizes if size >= batch_size), None)

    def run(self, seqs: list[Sequence]) -> torch.Tensor:
        """Logits [len(seqs), vocab] (float32) of one decode pass: each sequence computes its one uncomputed
        token. The caller checked that each has exactly one and blocks reserved for it."""
        size = self.size_for(len(seqs))
        if size is None:
            raise ValueError(f"{len(seqs)} sequences: more than the largest decode size {self.sizes[-1]}")
        self._fill(seqs, size)
        graph = self.graphs.get(size)
        if graph is None:
            logits = self._forward(size)
        else:
            graph.replay()
            logits = self.outputs[size]
        # NOTE: a copy: the graph's output buffer is overwritten by the next replay.
        return logits[: len(seqs)].clone()

    def _fill(self, seqs: list[Sequence], size: int) -> None:
        """Copy the batch into the buffers' first `size` rows; rows past len(seqs) point at the scratch block."""
        block_size, scratch = self.engine.block_size, self.scratch_block
        num_pad = size - len(seqs)
        positions = [seq.num_computed_tokens for seq in seqs] + [0] * num_pad
        tables = [seq.block_table for seq in seqs] + [[scratch]] * num_pad
        width = max(len(table) for table in tables)
        host_tables = torch.tensor(
            [table + [scratch] * (width - len(table)) for table in tables], dtype=torch.int32
        )
        slots = [
            table[p // block_size] * block_size + p % block_size
            for table, p in zip(tables, positions, strict=True)
        ]
        ids = [seq.token_ids[seq.num_computed_tokens] for seq in seqs] + [0] * num_pad
        # NOTE: columns past `width` keep stale block ids: the kernel never reads past a row's last position.
        self.block_tables[:size, :width].copy_(host_tables, non_blocking=True)
        self.input_ids[:size].copy_(torch.tensor(ids), non_blocking=True)
        self.positions[:size].copy_(torch.tensor(positions), non_blocking=True)
        self.num_cached[:size].copy_(torch.tensor(positions, dtype=torch.int32), non_blocking=True)
        self.slot_mapping[:size].copy_(torch.tensor(slots), non_blocking=True)

    def _forward(self, size: int) -> torch.Tensor:
        """One decode pass of `size` rows on the buffers: logits [size, vocab]."""
        engine = self.engine
        meta = PagedAttentionMetadata(
            block_tables=self.block_tables[:size],
            num_cached=self.num_cached[:size],
            num_new=self.num_new[:size],
            query_start=self.query_start[:size],
            max_num_new=1,
            block_size=engine.block_size,
            sliding_window=engine.config.sliding_window,
        )
        batch = AttentionBatch(self.slot_mapping[:size], (), meta)
        with torch.inference_mode():
            hidden = engine.model(self.input_ids[:size], self.positions[:size], engine.pool, batch)
            return engine.model.logits(hidden)

    def _capture_all(self) -> None:
        """Capture every size, largest first, sharing one memory pool. The buffers as allocated are a batch
        of padding rows (every row at the scratch block), so the warm-up and the capture touch no sequence's
        KV."""
        memory_pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for size in reversed(self.sizes):
                self._forward(size)  # warm-up: Triton compiles, cuBLAS picks its kernels, outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        for size in reversed(self.sizes):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=memory_pool):
                self.outputs[size] = self._forward(size)
            self.graphs[size] = graph
        torch.cuda.synchronize()
