"""Paged attention as one Triton kernel that reads K and V from the pool in place.

`attention.paged_attention` gathers each sequence's blocks into a contiguous copy and runs SDPA per
group of similar query lengths. This kernel instead walks the block table itself, so a forward pass of
any mix of decodes, speculative verifications and prompt chunks is one launch with no copy.

Grid: `(query tile, sequence, kv head x head tile)`. A program owns up to `BLOCK_Q` consecutive queries of
one sequence together with `HEADS` of the `GROUP = num_heads // num_kv_heads` query heads that share the kv
head, as one `[BLOCK_M = BLOCK_Q * HEADS, dims]` tile (row r is query `r // HEADS`, head `r % HEADS` of the
program's heads), so every K/V tile it loads serves all its rows. `HEADS` is the group padded to a power
of two, capped so that BLOCK_M stays at most 64 (32 for values wider than 256 dims); a larger group (MLA:
16 to 128 query heads on its one latent) is split over `HEAD_TILES` programs per kv head.

Loop: over the tile's key positions in steps of `BLOCK_N` keys. For each key the block id comes from
the block table (`block_table[p // block_size]`, slot `p % block_size`), the QK product and the PV
product are `tl.dot`s, and softmax is online (running max and sum, float32, base 2). The loop starts at
the first key any of the tile's queries can see (0, or the sliding window's start for its first query)
and stops after its last query's position, so fully masked key tiles are never loaded; inside the range
a key is masked per query when it is past the query's position or outside its window.

Head dims that are not a power of two (80, 96, 192) are padded to one and masked. The value may be
narrower than the key (`v_head_dim <= head_dim`): the key is then dotted in two parts, its first
`v_head_dim` dims (padded like the value) and the tail (padded on its own), so MLA's 576-wide latent is
512 + 64 dims rather than 1024. v_cache may be a view of k_cache's first dims (MLA's value is the latent's
first kv_lora_rank dims); the kernel then reuses the K tile as the V tile. `triton_latent_attention` is
MLA's absorbed (latent-space) attention on top: one kv head, the latent as key and its prefix as value.

The output is cast to q's dtype. The caller writes the new tokens' K/V into the pool before the call.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

__all__ = [
    "PagedAttentionMetadata",
    "paged_metadata",
    "triton_available",
    "triton_latent_attention",
    "triton_paged_attention",
]


def triton_available() -> bool:
    """True when triton imports; kvmesh runs without it (it is only a test extra)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True)
class PagedAttentionMetadata:
    """Where each sequence's queries and keys are; built once per forward pass, shared by every layer."""

    block_tables: torch.Tensor
    """[B, max_blocks] int32: each sequence's blocks, padded with block 0 (never read)."""
    num_cached: torch.Tensor
    """[B] int32: tokens of each sequence already in the pool before this pass."""
    num_new: torch.Tensor
    """[B] int32: tokens each sequence adds in this pass (its queries)."""
    query_start: torch.Tensor
    """[B] int32: row of the flat batch where each sequence's queries begin."""
    max_num_new: int
    block_size: int
    sliding_window: int | None


def paged_metadata(
    tables: torch.Tensor,
    num_cached: torch.Tensor,
    num_new: torch.Tensor,
    query_start: torch.Tensor,
    block_size: int,
    sliding_window: int | None,
    device: torch.device | str,
) -> PagedAttentionMetadata:
    """The kernel's metadata from the per-sequence tensors `attention.build_attention_batch` builds (any
    integer dtype, on the CPU): block tables [B, max_blocks] padded with 0, cached and new token counts and
    each sequence's first row in the flat batch [B]."""
    return PagedAttentionMetadata(
        block_tables=tables.to(device, torch.int32),
        num_cached=num_cached.to(device, torch.int32),
        num_new=num_new.to(device, torch.int32),
        query_start=query_start.to(device, torch.int32),
        max_num_new=int(num_new.max()),
        block_size=block_size,
        sliding_window=sliding_window,
    )


@functools.cache
def _kernel():
    """The @triton.jit kernel, built on first use so that importing this module does not need triton."""
    import triton
    import triton.language as tl

    @triton.jit
    def paged_attention_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, cached_ptr, new_ptr, start_ptr,
        qk_scale, window,
        stride_qt, stride_qh, stride_ot, stride_oh,
        stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_table,
        GROUP: tl.constexpr, HEADS: tl.constexpr, HEAD_TILES: tl.constexpr,
        BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr,
        V_DIM: tl.constexpr, V_DIM_PAD: tl.constexpr, TAIL_DIM: tl.constexpr, TAIL_PAD: tl.constexpr,
        V_IN_K: tl.constexpr, V_LIKE_K: tl.constexpr,
        USE_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):  # fmt: skip
        tile, seq, head_tile = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        num_new = tl.load(new_ptr + seq)
        first_q = tile * BLOCK_Q
        # NOTE: the grid has tiles for the longest sequence; shorter ones have nothing to do in the rest.
        if first_q >= num_new:
            return
        num_cached = tl.load(cached_ptr + seq)
        kv_head = head_tile // HEAD_TILES

        rows = tl.arange(0, BLOCK_Q * HEADS)
        q_index = first_q + rows // HEADS  # query's index within the sequence's new tokens
        in_group = (head_tile % HEAD_TILES) * HEADS + rows % HEADS  # head's index within the kv head's group
        head = kv_head * GROUP + in_group
        row_valid = (q_index < num_new) & (in_group < GROUP)
        q_pos = num_cached + q_index  # absolute position of each row's query
        token = (tl.load(start_ptr + seq) + q_index).to(tl.int64)
        q_rows = token * stride_qt + head * stride_qh
        # The key's dims [0, V_DIM), as wide as the value, and its tail [V_DIM, V_DIM + TAIL_DIM), if any.
        dims = tl.arange(0, V_DIM_PAD)
        dim_valid = dims < V_DIM
        q_mask = row_valid[:, None] & dim_valid[None, :]
        q = tl.load(q_ptr + q_rows[:, None] + dims[None, :], mask=q_mask, other=0.0)
        if TAIL_DIM > 0:
            tail = V_DIM + tl.arange(0, TAIL_PAD)
            tail_valid = tail < V_DIM + TAIL_DIM
            q_tail_mask = row_valid[:, None] & tail_valid[None, :]
            q_tail = tl.load(q_ptr + q_rows[:, None] + tail[None, :], mask=q_tail_mask, other=0.0)

        # Keys this tile can see: up to its last query's position, from its first query's window start.
        key_end = num_cached + tl.minimum(first_q + BLOCK_Q, num_new)
        key_start = 0
        if USE_WINDOW:
            key_start = tl.maximum(num_cached + first_q - window + 1, 0) // BLOCK_N * BLOCK_N

        # NOTE: the running max starts finite, not -inf, so a row that sees no key in some tile (padding
        # rows, or a window that starts later) gets exp(-inf - m) = 0 rather than exp(-inf + inf) = NaN.
        m_i = tl.full([BLOCK_Q * HEADS], -1.0e30, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_Q * HEADS], dtype=tl.float32)
        acc = tl.zeros([BLOCK_Q * HEADS, V_DIM_PAD], dtype=tl.float32)
        for n_start in range(key_start, key_end, BLOCK_N):
            k_pos = n_start + tl.arange(0, BLOCK_N)
            k_valid = k_pos < key_end
            block = tl.load(tables_ptr + seq * stride_table + k_pos // PAGE, mask=k_valid, other=0)
            # NOTE: int64 offsets: a large pool has more than 2**31 elements.
            k_rows = block.to(tl.int64) * stride_kb + (k_pos % PAGE) * stride_ks + kv_head * stride_kh
            kv_mask = k_valid[:, None] & dim_valid[None, :]
            k_offsets = k_rows[:, None] + dims[None, :]
            k = tl.load(k_ptr + k_offsets, mask=kv_mask, other=0.0)
            if V_IN_K:  # the value is the key's first V_DIM dims (MLA's latent): this tile already holds it
                v = k
            elif V_LIKE_K:  # a separate pool laid out like k's (the usual K/V pair): the same offsets
                v = tl.load(v_ptr + k_offsets, mask=kv_mask, other=0.0)
            else:
                v_rows = block.to(tl.int64) * stride_vb + (k_pos % PAGE) * stride_vs + kv_head * stride_vh
                v = tl.load(v_ptr + v_rows[:, None] + dims[None, :], mask=kv_mask, other=0.0)

            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            if TAIL_DIM > 0:
                tail_mask = k_valid[:, None] & tail_valid[None, :]
                k_tail = tl.load(k_ptr + k_rows[:, None] + tail[None, :], mask=tail_mask, other=0.0)
                s += tl.dot(q_tail, tl.trans(k_tail), input_precision=DOT_PRECISION)
            s = s * qk_scale
            visible = k_pos[None, :] <= q_pos[:, None]  # causal; for real rows also hides keys past key_end
            if USE_WINDOW:
                visible = visible & (k_pos[None, :] > q_pos[:, None] - window)
            s = tl.where(visible, s, float("-inf"))

            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

        # A padding row can see no key at all (l_i == 0, with a window); it is not stored, but keep it finite.
        acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        out_offsets = token[:, None] * stride_ot + head[:, None] * stride_oh + dims[None, :]
        tl.store(
            out_ptr + out_offsets,
            acc.to(out_ptr.dtype.element_ty),
            mask=row_valid[:, None] & dim_valid[None, :],
        )

    return paged_attention_kernel


def _next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def triton_paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: PagedAttentionMetadata,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of each sequence's new queries over its cached and new tokens, read from the pool.

    q: [T, num_heads, head_dim]; k_cache: [num_blocks, block_size, num_kv_heads, head_dim] and v_cache:
    [num_blocks, block_size, num_kv_heads, v_head_dim] with v_head_dim <= head_dim (one layer of the pool,
    the new tokens' K/V already written; v_cache may be a view of k_cache's first v_head_dim dims).
    Returns [T, num_heads, v_head_dim], written into `out` when given (every row of it is written).
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, v_dim = k_cache.shape[2], v_cache.shape[3]
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not split into {num_kv_heads} kv heads")
    if k_cache.shape[1] != meta.block_size or k_cache.shape[3] != head_dim:
        raise ValueError(f"pool {tuple(k_cache.shape)} does not match block_size {meta.block_size} / q")
    if v_cache.shape[:3] != k_cache.shape[:3] or v_dim > head_dim:
        raise ValueError(f"v_cache {tuple(v_cache.shape)} does not match k_cache {tuple(k_cache.shape)}")
    out = q.new_empty(num_tokens, num_heads, v_dim) if out is None else out
    if out.shape != (num_tokens, num_heads, v_dim) or out.dtype != q.dtype:
        raise ValueError(
            f"out is {tuple(out.shape)} {out.dtype}, expected {(num_tokens, num_heads, v_dim)} {q.dtype}"
        )
    if (q.stride(2), out.stride(2), k_cache.stride(3), v_cache.stride(3)) != (1, 1, 1, 1):
        raise ValueError("q, out and the pool need a contiguous head dim")
    if num_tokens == 0:
        return out

    group = num_heads // num_kv_heads
    # NOTE: a program's tile has at most max_rows rows (queries x heads of one group): 64, or 32 for values
    # wider than 256 dims (MLA's 512), whose float32 accumulator spills at 64 rows (ptxas, sm_90). A larger
    # group (MLA's 16 to 128 heads on one latent) is split over HEAD_TILES programs per kv head, each
    # loading the K/V tiles for its HEADS heads: each split reads K/V again (V3: 4 reads, mostly from L2).
    v_dim_pad = max(_next_power_of_2(v_dim), 16)
    max_rows = 64 if v_dim_pad <= 256 else 32
    heads = min(_next_power_of_2(group), max_rows)
    # NOTE: tl.dot needs at least 16 rows, so BLOCK_Q * HEADS >= 16; an all-decode batch gets
    # tiles just that small, a batch with longer queries max_rows (its decodes then waste padding rows).
    # BLOCK_Q is a constexpr, so there is one compiled variant per power of two it takes (a handful).
    block_q = min(_next_power_of_2(meta.max_num_new), max(max_rows // heads, 1))
    block_q = max(block_q, 16 // heads, 1)
    # NOTE: keys wider than the value (MLA: 512 + 64 rope dims) are not padded to the next power of two
    # (1024) but dotted in two parts, [0, v_dim) padded like the value and the tail padded on its own.
    tail = head_dim - v_dim
    tail_pad = max(_next_power_of_2(tail), 16) if tail else 0
    key_bytes = (v_dim_pad + tail_pad) * q.element_size()
    # NOTE: 64-key K/V tiles while a key is at most 256 bytes (16-bit up to 128 dims); wider keys (fp32 at
    # 128 dims, any dtype at 256, 16-bit MLA's 512 + 64) take 32, so that the tiles fit in shared memory,
    # and fp32 MLA 16 (at 32 it spills heavily).
    block_n = 64 if key_bytes <= 256 else 32 if key_bytes <= 1152 else 16
    # NOTE: a v_cache that is k_cache's first dims (same storage and strides: MLA) reuses the K tile as the
    # V tile rather than loading it again; a separate v_cache with k's strides (a K/V pool) k's offsets.
    v_like_k = v_cache.stride() == k_cache.stride()
    v_in_k = v_like_k and v_cache.data_ptr() == k_cache.data_ptr()
    head_tiles = _cdiv(group, heads)
    grid = (_cdiv(meta.max_num_new, block_q), meta.block_tables.shape[0], num_kv_heads * head_tiles)
    _kernel()[grid](
        q, k_cache, v_cache, out,
        meta.block_tables, meta.num_cached, meta.num_new, meta.query_start,
        scale * 1.4426950408889634,  # log2(e): the kernel uses exp2
        meta.sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), meta.block_tables.stride(0),
        GROUP=group, HEADS=heads, HEAD_TILES=head_tiles, BLOCK_Q=block_q, BLOCK_N=block_n,
        PAGE=meta.block_size, V_DIM=v_dim, V_DIM_PAD=v_dim_pad, TAIL_DIM=tail, TAIL_PAD=tail_pad,
        V_IN_K=v_in_k, V_LIKE_K=v_like_k, USE_WINDOW=meta.sliding_window is not None,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else None,  # NOTE: not tf32 for fp32 pools
        num_warps=4 if v_dim_pad + tail_pad <= 128 else 8,
    )  # fmt: skip
    return out


def triton_latent_attention(
    q_latent: torch.Tensor,
    latent_cache: torch.Tensor,
    kv_lora_rank: int,
    meta: PagedAttentionMetadata,
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Multi-latent attention in latent space (`MultiLatentAttention.attend_absorbed` before W_uv), paged.

    q_latent: [T, num_heads, kv_lora_rank + rope] (`[W_uk[h]^T q_nope ; q_pe]`); latent_cache:
    [num_blocks, block_size, kv_lora_rank + rope] (`KVPool.latent(i)`, the new tokens' latents written).
    Every head scores against each token's whole latent and takes its first kv_lora_rank dims as the value:
    MQA with one kv head. Returns [T, num_heads, kv_lora_rank].
    """
    return triton_paged_attention(
        q_latent, latent_cache[:, :, None, :], latent_cache[:, :, None, :kv_lora_rank], meta, scale, out
    )
