"""A Llama-family decoder in plain PyTorch: RMSNorm, RoPE, SwiGLU, MHA/GQA/MQA attention.

Covers Llama (incl. Llama-3 rope scaling), Qwen2 (qkv bias), Mistral (sliding window), Qwen3 (q/k norms)
and, with the sparse MLP of `kvmesh.engine.moe`, Mixtral, Qwen2-MoE and Qwen3-MoE. Module and
parameter names follow Hugging Face's, so a checkpoint's state dict loads as it is. The model sees a
flat batch of new tokens (`[T]`) and reads/writes its KV through the pool; paging, batching and
sampling live in the engine around it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from kvmesh.engine.attention import AttentionBatch, paged_attention
from kvmesh.engine.kv_cache import KVPool
from kvmesh.engine.model_config import ModelConfig, RopeConfig
from kvmesh.engine.moe import SparseMoE, SwiGLU


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # NOTE: normalised in float32 and cast back before the weight, as transformers does (bf16 parity).
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inverse_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """[head_dim / 2] float32 inverse frequencies, with linear or Llama-3 scaling applied."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        low_freq_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
        high_freq_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    if rope.rope_type == "yarn":
        return _yarn_inverse_frequencies(rope, head_dim, inv_freq)
    return inv_freq


def _yarn_inverse_frequencies(rope: RopeConfig, head_dim: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """YaRN: high frequencies kept, low ones divided by factor, a linear ramp between (as transformers has it)."""

    def correction_dim(num_rotations: float) -> float:
        context = rope.original_max_position_embeddings
        return head_dim * math.log(context / (num_rotations * 2 * math.pi)) / (2 * math.log(rope.theta))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp
    return inv_freq / rope.factor * (1 - extrapolation) + inv_freq * extrapolation


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position up to the model's context, looked up by position."""

    def __init__(self, rope: RopeConfig, head_dim: int, max_positions: int) -> None:
        super().__init__()
        inv_freq = rope_inverse_frequencies(rope, head_dim)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        angles = torch.cat([freqs, freqs], dim=-1)  # [max_positions, head_dim]
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: [T, 1, head_dim] in `dtype`, broadcasting over heads."""
        return self.cos[positions, None].to(dtype), self.sin[positions, None].to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim], rotated in half-split layout (Hugging Face's `rotate_half`)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        hidden, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=config.o_proj_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pool: KVPool, batch: AttentionBatch
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        q = self.q_proj(x).view(num_tokens, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k_cache, v_cache = pool.layer(self.layer_index)
        out = paged_attention(q, k, v, k_cache, v_cache, batch, self.scale)
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))


class DecoderLayer(nn.Module):
    """Pre-norm residual block: x + self_attn(norm(x)), then x + mlp(norm(x)); every architecture's layer,
    with its own attention and MLP modules."""

    def __init__(self, config: ModelConfig, self_attn: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pool: KVPool, batch: AttentionBatch
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, pool, batch)
        return x + self.mlp(self.post_attention_layernorm(x))


def llama_layer(config: ModelConfig, layer_index: int) -> DecoderLayer:
    """A Llama-family layer: GQA attention, and a sparse MoE or a dense SwiGLU MLP."""
    moe = config.moe
    mlp: nn.Module = (
        SparseMoE(config.hidden_size, moe)
        if moe is not None and layer_index in moe.sparse_layers
        else SwiGLU(config.hidden_size, config.intermediate_size)
    )
    return DecoderLayer(config, Attention(config, layer_index), mlp)


class Decoder(nn.Module):
    def __init__(self, config: ModelConfig, make_layer: Callable[[ModelConfig, int], DecoderLayer]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(make_layer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class CausalLM(nn.Module):
    """The decoder plus its LM head; `forward` returns final hidden states, `logits` projects chosen rows."""

    keep_float32: tuple[str, ...] = ()
    """Suffixes of parameters that stay float32 in any model dtype (none here)."""
    make_layer = staticmethod(llama_layer)
    """The architecture's layer (`kvmesh.engine.deepseek` has its own)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Decoder(config, self.make_layer)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = self.make_rotary()

    def make_rotary(self) -> nn.Module:
        """The rotary tables (buffers computed from the config, not weights)."""
        return RotaryEmbedding(self.config.rope, self.config.head_dim, self.config.max_position_embeddings)

    def rotary_at(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for the positions, as the layers' attention takes them."""
        return self.rotary(positions, dtype)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, pool: KVPool, batch: AttentionBatch
    ) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, hidden]; writes the T tokens' KV into the pool."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary_at(positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, cos, sin, pool, batch)
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] float32."""
        return self.lm_head(hidden).float()
