"""Multi-latent attention over the paged latent cache against dense MLA (every head's K and V expanded for
the whole sequence, one causal softmax), across block boundaries, prefill chunks and batch mixes; and the
absorbed (latent-space) path against the expanded one on the same cache."""

from __future__ import annotations

import math

import pytest
import torch

from kvmesh.engine.attention import build_attention_batch
from kvmesh.engine.deepseek_config import deepseek_config_from_hf
from kvmesh.engine.kv_cache import KVPool, kv_layout_for
from kvmesh.engine.mla import LatentRotary, MultiLatentAttention, apply_latent_rope
from kvmesh.engine.model_config import ModelConfig

pytestmark = pytest.mark.usefixtures("single_thread")

BLOCK_SIZE = 4
NUM_BLOCKS = 96


def make_config(q_lora_rank: int | None, arch: str = "DeepseekV3ForCausalLM") -> ModelConfig:
    raw = {
        "architectures": [arch],
        "vocab_size": 32,
        "hidden_size": 48,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 3,
        "q_lora_rank": q_lora_rank,
        "kv_lora_rank": 20,
        "qk_nope_head_dim": 10,
        "qk_rope_head_dim": 6,
        "v_head_dim": 14,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 16,
        "n_group": 2,
        "topk_group": 1,
        "max_position_embeddings": 256,
    }
    return deepseek_config_from_hf(raw, "deepseek_v3" if "V3" in arch else "deepseek_v2", ())


def make_attention(config: ModelConfig, seed: int = 0) -> tuple[MultiLatentAttention, LatentRotary]:
    torch.manual_seed(seed)
    attention = MultiLatentAttention(config, 0)
    with torch.no_grad():
        for name, param in attention.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.1)
            else:
                param.normal_(0.0, param.shape[-1] ** -0.5)
    assert config.mla is not None
    return attention.eval(), LatentRotary(config.rope, config.mla.qk_rope_head_dim, 256)


def dense_mla(attention: MultiLatentAttention, rotary: LatentRotary, x: torch.Tensor) -> torch.Tensor:
    """One whole sequence x [N, hidden], causal, per-head K and V: [N, hidden]."""
    mla, heads, num = attention.mla, attention.num_heads, x.shape[0]
    cos, sin = rotary(torch.arange(num))
    q = (
        attention.q_proj(x)
        if mla.q_lora_rank is None
        else attention.q_b_proj(attention.q_a_layernorm(attention.q_a_proj(x)))
    )
    q_nope, q_pe = q.view(num, heads, -1).split([mla.qk_nope_head_dim, mla.qk_rope_head_dim], dim=-1)
    compressed, k_pe = attention.kv_a_proj_with_mqa(x).split([mla.kv_lora_rank, mla.qk_rope_head_dim], dim=-1)
    kv = attention.kv_b_proj(attention.kv_a_layernorm(compressed)).view(num, heads, -1)
    k_nope, v = kv.split([mla.qk_nope_head_dim, mla.v_head_dim], dim=-1)
    q = torch.cat([q_nope, apply_latent_rope(q_pe, cos, sin, mla.interleaved_rope)], dim=-1)
    k_pe = apply_latent_rope(k_pe[:, None], cos, sin, mla.interleaved_rope).expand(num, heads, -1)
    k = torch.cat([k_nope, k_pe], dim=-1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * mla.softmax_scale
    scores = scores.masked_fill(~torch.ones(num, num, dtype=torch.bool).tril(), -math.inf)
    out = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
    return attention.o_proj(out.reshape(num, -1))


def run_paged(
    config: ModelConfig,
    attention: MultiLatentAttention,
    rotary: LatentRotary,
    xs: list[torch.Tensor],
    passes: list[list[int]],
) -> tuple[list[torch.Tensor], KVPool]:
    """Feed each sequence's rows pass by pass (passes[p][b] new tokens of sequence b, 0: not in the pass)."""
    layout = kv_layout_for(config, BLOCK_SIZE, torch.float32, NUM_BLOCKS)
    pool = KVPool(layout)
    # Blocks handed out from the top down, so a block table is never the identity.
    free = list(range(NUM_BLOCKS))
    tables: list[list[int]] = [[] for _ in xs]
    done = [0] * len(xs)
    outs: list[list[torch.Tensor]] = [[] for _ in xs]
    for counts in passes:
        members = [b for b, n in enumerate(counts) if n]
        for b in members:
            while len(tables[b]) * BLOCK_SIZE < done[b] + counts[b]:
                tables[b].append(free.pop())
        batch, positions = build_attention_batch(
            [tables[b] for b in members],
            [done[b] for b in members],
            [counts[b] for b in members],
            BLOCK_SIZE,
            None,
            torch.device("cpu"),
        )
        x = torch.cat([xs[b][done[b] : done[b] + counts[b]] for b in members])
        cos, sin = rotary(positions)
        with torch.no_grad():
            out = attention(x, cos, sin, pool, batch)
        for b, chunk in zip(members, out.split([counts[b] for b in members]), strict=True):
            outs[b].append(chunk)
            done[b] += counts[b]
    return [torch.cat(chunks) for chunks in outs], pool


PASSES = [
    [20, 9, 0, 0],  # two prompt chunks, one ending mid-block
    [17, 1, 5, 0],  # a chunk, a decode and a short prompt together
    [1, 1, 1, 70],  # decodes (the absorbed path) beside a long chunk in a group of its own
    [1, 3, 1, 1],  # a 3-token verification among decodes
    [1, 1, 1, 1],
]


@pytest.mark.parametrize("q_lora_rank", [None, 16])
@pytest.mark.parametrize("arch", ["DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM"])
def test_paged_latent_attention_equals_dense_mla(q_lora_rank: int | None, arch: str) -> None:
    config = make_config(q_lora_rank, arch)
    attention, rotary = make_attention(config)
    lengths = [sum(p[b] for p in PASSES) for b in range(4)]
    torch.manual_seed(1)
    xs = [torch.randn(n, config.hidden_size) for n in lengths]
    paged, pool = run_paged(config, attention, rotary, xs, PASSES)
    for x, out in zip(xs, paged, strict=True):
        with torch.no_grad():
            expected = dense_mla(attention, rotary, x)
        assert (out - expected).abs().max().item() < 1e-5
    assert pool.layout.latent and pool.latent(0).shape == (NUM_BLOCKS, BLOCK_SIZE, 20 + 6)


def test_absorbed_path_equals_expanded_path() -> None:
    config = make_config(16)
    attention, _ = make_attention(config, seed=3)
    layout = kv_layout_for(config, BLOCK_SIZE, torch.float32, NUM_BLOCKS)
    pool = KVPool(layout)
    torch.manual_seed(4)
    pool.kv.normal_()
    num_cached, num_new = [0, 5, 17, 40, 3], [1, 1, 1, 1, 6]
    tables = [list(range(i * 12, i * 12 + 12)) for i in range(len(num_new))]
    batch, _ = build_attention_batch(tables, num_cached, num_new, BLOCK_SIZE, None, torch.device("cpu"))
    q = torch.randn(sum(num_new), attention.num_heads, 10 + 6)
    cache = pool.latent(0)
    assert len(batch.groups) == 2  # the decodes, and the 6-token query
    for group in batch.groups:
        with torch.no_grad():
            absorbed = attention.attend_absorbed(q, cache, group)
            expanded = attention.attend_expanded(q, cache, group)
        assert absorbed.shape == expanded.shape == (len(group.out_row), attention.num_heads, 14)
        assert (absorbed - expanded).abs().max().item() < 1e-5
