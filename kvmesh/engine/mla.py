"""Multi-latent attention (DeepSeek-V2/V3) over a paged latent cache.

Per token and layer the pool holds one vector, shared by every head (`KVPool.latent(i)`):

    latent = [ c (kv_lora_rank, after kv_a_layernorm) ; k_pe (qk_rope_head_dim, rotated) ]

Head h's key and value are up-projected from it by kv_b_proj, whose rows per head are W_uk[h] [nope, R]
then W_uv[h] [v, R]:

    k_h = [ W_uk[h] c ; k_pe ]        v_h = W_uv[h] c

Two ways to attend, equal in exact arithmetic (tests/engine/test_mla.py checks both against dense MLA):

- expanded (prompt chunks, verifications: many queries per sequence): gather each sequence's latents,
  up-project K and V per head for its context, ordinary attention;
- absorbed (decodes: one query per sequence): q_h . k_h = (W_uk[h]^T q_nope_h) . c + q_pe_h . k_pe, so
  the query moves into latent space and every head attends to the one cached vector (MQA with head dim
  R + rope, the heads folded into the query axis); the output W_uv[h] (sum_j p_hj c_j) is projected up
  after attention. Nothing per head is materialised per cached token.

With the "triton" attention backend (CUDA) every token, prompt chunks too, takes the absorbed form through
one kernel that reads the latent pool in place (`triton_attention.triton_latent_attention`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvmesh.engine.attention import AttentionBatch, AttentionGroup
from kvmesh.engine.kv_cache import KVPool
from kvmesh.engine.model import RMSNorm, rope_inverse_frequencies
from kvmesh.engine.model_config import MLAConfig, ModelConfig, RopeConfig
from kvmesh.engine.triton_attention import triton_latent_attention

LATENT_NORM_EPS = 1e-6
"""q_a_layernorm and kv_a_layernorm use RMSNorm's default epsilon, not rms_norm_eps (as transformers)."""


class LatentRotary(nn.Module):
    """cos/sin of each rotated pair's angle for every position, times yarn's attention factor."""

    def __init__(self, rope: RopeConfig, rope_dim: int, max_positions: int) -> None:
        super().__init__()
        inv_freq = rope_inverse_frequencies(rope, rope_dim)
        angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)  # [P, rope / 2]
        self.register_buffer("cos", angles.cos() * rope.attention_factor, persistent=False)
        self.register_buffer("sin", angles.sin() * rope.attention_factor, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: [T, 1, rope / 2] float32, broadcasting over heads."""
        return self.cos[positions, None], self.sin[positions, None]


def apply_latent_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool
) -> torch.Tensor:
    """x: [T, heads, rope] -> rotated, in float32 then cast back; the output is always half-split
    ([first of each pair ; second of each pair]).

    NOTE: for interleaved checkpoints (pairs (x0, x1), (x2, x3), ...) the output order differs from V2's
    complex-number form, which writes pairs back interleaved; q and k are permuted alike, so every q . k and
    hence the model is the same, and the cache only ever meets our own order.
    """
    x32 = x.float()
    if interleaved:
        first, second = x32[..., 0::2], x32[..., 1::2]
    else:
        half = x.shape[-1] // 2
        first, second = x32[..., :half], x32[..., half:]
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1).to(x.dtype)


class MultiLatentAttention(nn.Module):
    """DeepSeek's attention; parameter names follow Hugging Face's (`q_proj` or `q_a_proj`/`q_a_layernorm`/
    `q_b_proj`, `kv_a_proj_with_mqa`, `kv_a_layernorm`, `kv_b_proj`, `o_proj`)."""

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        mla = config.mla
        assert mla is not None
        self.mla: MLAConfig = mla
        self.layer_index = layer_index
        self.num_heads = config.num_attention_heads
        hidden, bias, heads = config.hidden_size, config.attention_bias, config.num_attention_heads
        qk_dim = mla.qk_nope_head_dim + mla.qk_rope_head_dim
        if mla.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, heads * qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, mla.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(mla.q_lora_rank, heads * qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, mla.latent_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(mla.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(
            mla.kv_lora_rank, heads * (mla.qk_nope_head_dim + mla.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(heads * mla.v_head_dim, hidden, bias=config.o_proj_bias)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pool: KVPool, batch: AttentionBatch
    ) -> torch.Tensor:
        """x: [T, hidden] -> [T, hidden]; writes the T tokens' latents into the pool first."""
        mla, num_tokens = self.mla, x.shape[0]
        q = self.q_proj(x) if mla.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(num_tokens, self.num_heads, -1)
        q_nope, q_pe = q.split([mla.qk_nope_head_dim, mla.qk_rope_head_dim], dim=-1)
        compressed, k_pe = self.kv_a_proj_with_mqa(x).split([mla.kv_lora_rank, mla.qk_rope_head_dim], dim=-1)
        q_pe = apply_latent_rope(q_pe, cos, sin, mla.interleaved_rope)
        k_pe = apply_latent_rope(k_pe[:, None], cos, sin, mla.interleaved_rope)[:, 0]
        cache = pool.latent(self.layer_index)  # [num_blocks, block_size, latent_dim]
        latent = torch.cat([self.kv_a_layernorm(compressed), k_pe], dim=-1)
        cache.view(-1, mla.latent_dim).index_copy_(0, batch.slot_mapping, latent)

        if (
            batch.paged is not None
        ):  # the "triton" backend: every token in latent space, the pool read in place
            w_uk, w_uv = self.up_projections()
            q_latent = torch.cat([torch.einsum("thn,hnr->thr", q_nope, w_uk), q_pe], dim=-1)
            out = triton_latent_attention(q_latent, cache, mla.kv_lora_rank, batch.paged, mla.softmax_scale)
            return self.o_proj(torch.einsum("thr,hvr->thv", out, w_uv).reshape(num_tokens, -1))
        q = torch.cat([q_nope, q_pe], dim=-1)
        out = q.new_empty(num_tokens, self.num_heads, mla.v_head_dim)
        for group in batch.groups:
            decodes = group.query_index.shape[1] == 1
            out[group.out_row] = (self.attend_absorbed if decodes else self.attend_expanded)(q, cache, group)
        return self.o_proj(out.view(num_tokens, -1))

    def up_projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of kv_b_proj's weight: W_uk [heads, nope, R] and W_uv [heads, v, R]."""
        mla = self.mla
        weight = self.kv_b_proj.weight.view(self.num_heads, mla.qk_nope_head_dim + mla.v_head_dim, -1)
        return weight[:, : mla.qk_nope_head_dim], weight[:, mla.qk_nope_head_dim :]

    def attend_expanded(self, q: torch.Tensor, cache: torch.Tensor, group: AttentionGroup) -> torch.Tensor:
        """q: [T, heads, nope + rope] (the flat batch) -> [t, heads, v] for the group's tokens."""
        mla, heads = self.mla, self.num_heads
        latents = gather_latents(cache, group)  # [b, ctx, R + rope]
        num_seqs, num_ctx = latents.shape[:2]
        compressed, k_pe = latents.split([mla.kv_lora_rank, mla.qk_rope_head_dim], dim=-1)
        kv = self.kv_b_proj(compressed).view(num_seqs, num_ctx, heads, -1)
        k_nope, values = kv.split([mla.qk_nope_head_dim, mla.v_head_dim], dim=-1)
        k_pe = k_pe[:, :, None].expand(num_seqs, num_ctx, heads, mla.qk_rope_head_dim)
        keys = torch.cat([k_nope, k_pe], dim=-1).transpose(1, 2)  # [b, H, ctx, nope + rope]
        queries = q[group.query_index].transpose(1, 2)  # [b, H, max_q, nope + rope]
        out = F.scaled_dot_product_attention(
            queries, keys, values.transpose(1, 2), attn_mask=group.mask, scale=mla.softmax_scale
        )
        return out.transpose(1, 2).reshape(-1, heads, mla.v_head_dim)[group.token_row]

    def attend_absorbed(self, q: torch.Tensor, cache: torch.Tensor, group: AttentionGroup) -> torch.Tensor:
        """Like attend_expanded, in latent space: [T, heads, nope + rope] -> [t, heads, v]."""
        mla, heads = self.mla, self.num_heads
        w_uk, w_uv = self.up_projections()
        latents = gather_latents(cache, group)  # [b, ctx, R + rope]
        queries = q[group.query_index]  # [b, max_q, H, nope + rope]
        num_seqs, max_q = queries.shape[:2]
        q_nope, q_pe = queries.split([mla.qk_nope_head_dim, mla.qk_rope_head_dim], dim=-1)
        q_latent = torch.cat([torch.einsum("bqhn,hnr->bqhr", q_nope, w_uk), q_pe], dim=-1)
        # Heads fold into the query axis (row i * H + h), all against the one latent per cached token (MQA
        # with head dim R + rope): two batched products, the mask broadcast over the heads of a decode.
        # NOTE: written out, not SDPA: on CPU, SDPA took its math path for these shapes (profiled) and ran
        # about 3x slower at 4k contexts.
        q_latent = q_latent.reshape(num_seqs, max_q * heads, mla.latent_dim)
        scores = torch.bmm(q_latent, latents.transpose(1, 2)).float() * mla.softmax_scale  # [b, q * H, ctx]
        mask = group.mask[:, 0]  # [b, max_q, ctx]
        scores.masked_fill_(~(mask if max_q == 1 else mask.repeat_interleave(heads, dim=1)), float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(latents.dtype)
        out = torch.bmm(probs, latents[..., : mla.kv_lora_rank])  # [b, q * H, R]
        out = out.reshape(num_seqs * max_q, heads, mla.kv_lora_rank)[group.token_row]
        return torch.einsum("thr,hvr->thv", out, w_uv)


def gather_latents(cache: torch.Tensor, group: AttentionGroup) -> torch.Tensor:
    """[num_blocks, block_size, D] -> each of the group's sequences' slots in order: [b, max_ctx, D]."""
    # NOTE: index_select copies whole blocks (see kvmesh.engine.attention._attend).
    num_seqs = group.block_tables.shape[0]
    return cache.index_select(0, group.block_tables.view(-1)).view(num_seqs, -1, cache.shape[-1])
