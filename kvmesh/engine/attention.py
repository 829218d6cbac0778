"""Paged attention over the KV pool, for a batch of sequences that each add one or more tokens.

One forward pass takes T new tokens from B sequences, flattened (`[T]`), so the linear layers see one
matrix. For attention the queries are scattered into a padded `[B, max_q]` grid, each sequence's keys
and values are gathered from its blocks into `[B, max_ctx]`, and one masked SDPA call covers every
sequence: decode (one query each), chunked prefill (many) and speculative verification (a few) alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AttentionBatch:
    """Where the batch's tokens go in the pool and what each query may see; built once per forward pass."""

    slot_mapping: torch.Tensor
    """[T] int64: flat slot (block_id * block_size + offset) where each new token's K and V are written."""
    block_tables: torch.Tensor
    """[B, max_blocks] int64: each sequence's blocks, padded with block 0 (masked out)."""
    query_index: torch.Tensor
    """[B, max_q] int64: row of the flat batch for each padded query (padding points at row 0)."""
    token_row: torch.Tensor
    """[T] int64: position of each flat token in the padded [B * max_q] grid."""
    mask: torch.Tensor
    """[B, 1, max_q, max_blocks * block_size] bool: True where a query may attend to a key slot."""


def build_attention_batch(
    block_tables: list[list[int]],
    num_cached: list[int],
    num_new: list[int],
    block_size: int,
    sliding_window: int | None,
    device: torch.device,
) -> tuple[AttentionBatch, torch.Tensor]:
    """Metadata for sequences that have `num_cached[b]` tokens in the pool and add `num_new[b]` now.

    Returns the batch and the positions `[T]` of the new tokens. Every sequence's block table must
    already cover `num_cached[b] + num_new[b]` tokens.
    """
    num_seqs = len(block_tables)
    max_q = max(num_new)
    max_blocks = max(len(table) for table in block_tables)
    cached = torch.tensor(num_cached, dtype=torch.int64)
    new = torch.tensor(num_new, dtype=torch.int64)
    tables = torch.zeros(num_seqs, max_blocks, dtype=torch.int64)
    for b, table in enumerate(block_tables):
        tables[b, : len(table)] = torch.tensor(table, dtype=torch.int64)

    # Query grid: q_offset[b, i] = i; valid where i < num_new[b].
    q_offset = torch.arange(max_q, dtype=torch.int64).expand(num_seqs, max_q)
    q_valid = q_offset < new[:, None]
    q_pos = cached[:, None] + q_offset  # [B, max_q] absolute positions
    starts = torch.cumsum(new, 0) - new
    query_index = torch.where(q_valid, starts[:, None] + q_offset, torch.zeros_like(q_offset))
    grid_rows = torch.arange(num_seqs * max_q, dtype=torch.int64).view(num_seqs, max_q)
    token_row = grid_rows[q_valid]
    positions = q_pos[q_valid]

    block_of_token = positions // block_size
    seq_of_token = torch.repeat_interleave(torch.arange(num_seqs), new)
    slot_mapping = tables[seq_of_token, block_of_token] * block_size + positions % block_size

    key_pos = torch.arange(max_blocks * block_size, dtype=torch.int64)
    mask = key_pos[None, None, :] <= q_pos[:, :, None]  # causal, which also hides slots past the end
    if sliding_window is not None:
        mask &= key_pos[None, None, :] > q_pos[:, :, None] - sliding_window
    # NOTE: padded query rows must see at least one key, or SDPA returns NaN for them (they are dropped anyway).
    mask[:, :, 0] |= ~q_valid
    batch = AttentionBatch(
        slot_mapping=slot_mapping.to(device),
        block_tables=tables.to(device),
        query_index=query_index.to(device),
        token_row=token_row.to(device),
        mask=mask[:, None].to(device),
    )
    return batch, positions.to(device)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: AttentionBatch,
    scale: float,
) -> torch.Tensor:
    """Write the new K/V into the pool, then attend over each sequence's cached and new tokens.

    q: [T, num_heads, head_dim]; k, v: [T, num_kv_heads, head_dim];
    k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim] (one layer of the pool).
    Returns [T, num_heads, head_dim].
    """
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, batch.slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, batch.slot_mapping, v)

    num_seqs, max_blocks = batch.block_tables.shape
    # [B, max_blocks, block_size, H_kv, D] -> [B, H_kv, max_ctx, D]
    # NOTE: index_select along the block dimension copies whole blocks; generic advanced indexing
    # (k_cache[block_tables]) is several times slower for the same bytes.
    flat_tables = batch.block_tables.view(-1)
    keys = k_cache.index_select(0, flat_tables).view(num_seqs, -1, num_kv_heads, head_dim).transpose(1, 2)
    values = v_cache.index_select(0, flat_tables).view(num_seqs, -1, num_kv_heads, head_dim).transpose(1, 2)
    queries = q[batch.query_index].transpose(1, 2)  # [B, H, max_q, D]
    out = F.scaled_dot_product_attention(
        queries, keys, values, attn_mask=batch.mask, scale=scale, enable_gqa=num_kv_heads != q.shape[1]
    )
    # [B, H, max_q, D] -> [B * max_q, H, D] -> the T real rows
    return out.transpose(1, 2).reshape(-1, q.shape[1], head_dim)[batch.token_row]
