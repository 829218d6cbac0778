"""Paged attention over the KV pool, for a batch of sequences that each add one or more tokens.

One forward pass takes T new tokens from B sequences, flattened (`[T]`), so the linear layers see one
matrix. For attention the sequences are split into groups of similar query length (decodes; speculative
verifications and short chunks; each long prompt chunk alone). Per group the queries are scattered into
a padded `[b, max_q]` grid, each sequence's keys and values are gathered from its blocks into
`[b, max_ctx]`, and one masked SDPA call covers the group.

NOTE: groups exist so that a prompt chunk can ride in the same pass as running decodes: in one padded
grid every decode row would be as wide as the chunk.

With the "triton" backend (CUDA pools) none of that is built: one kernel walks the block tables in place
for the whole batch (`kvmesh.engine.triton_attention`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvmesh.engine.triton_attention import (
    PagedAttentionMetadata,
    paged_metadata,
    triton_paged_attention,
)

SHORT_QUERY_TOKENS = 64
"""Sequences adding at most this many tokens share a group; longer chunks get a group each."""


@dataclass(frozen=True)
class AttentionGroup:
    """Sequences whose queries share one padded grid and one SDPA call."""

    block_tables: torch.Tensor
    """[b, max_blocks] int64: each sequence's blocks, padded with block 0 (masked out)."""
    query_index: torch.Tensor
    """[b, max_q] int64: row of the flat batch for each padded query (padding points at row 0)."""
    token_row: torch.Tensor
    """[t] int64: position in the padded [b * max_q] grid of each of the group's tokens."""
    out_row: torch.Tensor
    """[t] int64: row of the flat batch that each of the group's tokens is."""
    mask: torch.Tensor
    """[b, 1, max_q, max_blocks * block_size] bool: True where a query may attend to a key slot."""


@dataclass(frozen=True)
class AttentionBatch:
    """Where the batch's tokens go in the pool and what each query may see; built once per forward pass."""

    slot_mapping: torch.Tensor
    """[T] int64: flat slot (block_id * block_size + offset) where each new token's K and V are written."""
    groups: tuple[AttentionGroup, ...]
    """The "sdpa" backend's padded groups (empty with "triton")."""
    paged: PagedAttentionMetadata | None = None
    """The "triton" backend's per-sequence metadata (None with "sdpa")."""


def _group_of(num_new: list[int]) -> list[list[int]]:
    """Sequence indices by group: single-token decodes, then short queries, then each long one alone."""
    decodes = [b for b, n in enumerate(num_new) if n == 1]
    short = [b for b, n in enumerate(num_new) if 1 < n <= SHORT_QUERY_TOKENS]
    long = [[b] for b, n in enumerate(num_new) if n > SHORT_QUERY_TOKENS]
    return [group for group in (decodes, short, *long) if group]


def build_attention_batch(
    block_tables: list[list[int]],
    num_cached: list[int],
    num_new: list[int],
    block_size: int,
    sliding_window: int | None,
    device: torch.device,
    backend: str = "sdpa",
) -> tuple[AttentionBatch, torch.Tensor]:
    """Metadata for sequences that have `num_cached[b]` tokens in the pool and add `num_new[b]` now.

    Returns the batch and the positions `[T]` of the new tokens. Every sequence's block table must
    already cover `num_cached[b] + num_new[b]` tokens. backend: "sdpa" (padded groups) or "triton".
    """
    new = torch.tensor(num_new, dtype=torch.int64)
    cached = torch.tensor(num_cached, dtype=torch.int64)
    starts = torch.cumsum(new, 0) - new
    seq_of_token = torch.repeat_interleave(torch.arange(len(num_new)), new)
    positions = cached[seq_of_token] + torch.arange(int(new.sum())) - starts[seq_of_token]
    tables = torch.zeros(len(block_tables), max(len(table) for table in block_tables), dtype=torch.int64)
    for b, table in enumerate(block_tables):
        tables[b, : len(table)] = torch.tensor(table, dtype=torch.int64)
    slot_mapping = tables[seq_of_token, positions // block_size] * block_size + positions % block_size
    if backend == "triton":
        paged = paged_metadata(tables, cached, new, starts, block_size, sliding_window, device)
        return AttentionBatch(slot_mapping.to(device), (), paged), positions.to(device)
    groups = tuple(
        _build_group(members, tables, cached, new, starts, block_size, sliding_window, device)
        for members in _group_of(num_new)
    )
    return AttentionBatch(slot_mapping.to(device), groups), positions.to(device)


def _build_group(
    members: list[int],
    tables: torch.Tensor,
    cached: torch.Tensor,
    new: torch.Tensor,
    starts: torch.Tensor,
    block_size: int,
    sliding_window: int | None,
    device: torch.device,
) -> AttentionGroup:
    index = torch.tensor(members, dtype=torch.int64)
    new, cached, starts = new[index], cached[index], starts[index]
    num_seqs, max_q = len(members), int(new.max())
    max_blocks = int(((cached + new + block_size - 1) // block_size).max())
    # Query grid: q_offset[b, i] = i; valid where i < new[b].
    q_offset = torch.arange(max_q, dtype=torch.int64).expand(num_seqs, max_q)
    q_valid = q_offset < new[:, None]
    q_pos = cached[:, None] + q_offset  # [b, max_q] absolute positions
    rows = starts[:, None] + q_offset
    query_index = torch.where(q_valid, rows, torch.zeros_like(q_offset))
    grid_rows = torch.arange(num_seqs * max_q, dtype=torch.int64).view(num_seqs, max_q)

    key_pos = torch.arange(max_blocks * block_size, dtype=torch.int64)
    mask = key_pos[None, None, :] <= q_pos[:, :, None]  # causal, which also hides slots past the end
    if sliding_window is not None:
        mask &= key_pos[None, None, :] > q_pos[:, :, None] - sliding_window
    # NOTE: padded query rows must see at least one key, or SDPA returns NaN for them (they are dropped anyway).
    mask[:, :, 0] |= ~q_valid
    return AttentionGroup(
        block_tables=tables[index, :max_blocks].contiguous().to(device),
        query_index=query_index.to(device),
        token_row=grid_rows[q_valid].to(device),
        out_row=rows[q_valid].to(device),
        mask=mask[:, None].to(device),
    )


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

    if batch.paged is not None:
        return triton_paged_attention(q, k_cache, v_cache, batch.paged, scale)
    if len(batch.groups) == 1:
        return _attend(q, k_cache, v_cache, batch.groups[0], scale)
    out = torch.empty_like(q)
    for group in batch.groups:
        out[group.out_row] = _attend(q, k_cache, v_cache, group, scale)
    return out


def _attend(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: AttentionGroup, scale: float
) -> torch.Tensor:
    """One group's attention: [t, num_heads, head_dim] for the group's tokens, in flat-batch order."""
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    num_seqs = group.block_tables.shape[0]
    # [b, max_blocks, block_size, H_kv, D] -> [b, H_kv, max_ctx, D]
    # NOTE: index_select along the block dimension copies whole blocks; generic advanced indexing
    # (k_cache[block_tables]) is several times slower for the same bytes.
    flat_tables = group.block_tables.view(-1)
    keys = k_cache.index_select(0, flat_tables).view(num_seqs, -1, num_kv_heads, head_dim).transpose(1, 2)
    values = v_cache.index_select(0, flat_tables).view(num_seqs, -1, num_kv_heads, head_dim).transpose(1, 2)
    queries = q[group.query_index].transpose(1, 2)  # [b, H, max_q, D]
    out = F.scaled_dot_product_attention(
        queries, keys, values, attn_mask=group.mask, scale=scale, enable_gqa=num_kv_heads != q.shape[1]
    )
    # [b, H, max_q, D] -> [b * max_q, H, D] -> the group's real rows
    return out.transpose(1, 2).reshape(-1, q.shape[1], head_dim)[group.token_row]
