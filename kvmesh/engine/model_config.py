"""The model's shape, read from a Hugging Face config.json and checked against what our model implements."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "DeepseekV3ForCausalLM": "deepseek_v3",
}
DEEPSEEK_FAMILY = ("deepseek_v2", "deepseek_v3")
"""Multi-latent attention and DeepSeek's routed + shared experts (`kvmesh.engine.deepseek`)."""
QWEN_FAMILY = ("qwen2", "qwen3", "qwen3_moe", "qwen2_moe")
"""Architectures whose config carries use_sliding_window (off in every released checkpoint)."""
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class CheckpointError(ValueError):
    """A checkpoint file is missing or malformed; the message names the file."""


class UnsupportedModelError(ValueError):
    """The checkpoint's config asks for something this model does not implement; the message names the field."""


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding parameters (Hugging Face `rope_parameters` / `rope_scaling`)."""

    theta: float
    """Base of the rotary frequencies."""
    rope_type: str = "default"
    """'default', 'linear' or 'llama3'."""
    factor: float = 1.0
    """Scaling factor (linear, llama3)."""
    low_freq_factor: float = 1.0
    """llama3: wavelengths above original_max / low_freq_factor are fully scaled."""
    high_freq_factor: float = 4.0
    """llama3: wavelengths below original_max / high_freq_factor are left alone."""
    original_max_position_embeddings: int = 8192
    """llama3, yarn: the context the model was pretrained on, in tokens."""
    beta_fast: float = 32.0
    """yarn: rotations per context below which a frequency starts to be interpolated."""
    beta_slow: float = 1.0
    """yarn: rotations per context below which a frequency is fully interpolated."""
    truncate: bool = True
    """yarn: round the correction range to whole dimensions."""
    attention_factor: float = 1.0
    """yarn: scale of cos and sin (from mscale / mscale_all_dim when the config gives none)."""
    mscale_all_dim: float = 0.0
    """yarn (DeepSeek): the softmax scale is multiplied by (0.1 * mscale_all_dim * ln(factor) + 1) ** 2."""


@dataclass(frozen=True)
class MoEConfig:
    """A sparse mixture-of-experts MLP: a router picks top-k experts per token (Mixtral, Qwen2/Qwen3-MoE)."""

    num_experts: int
    num_experts_per_tok: int
    """k: experts each token is sent to."""
    expert_intermediate_size: int
    """Width of each expert's SwiGLU MLP."""
    norm_topk_prob: bool
    """Renormalise the k chosen probabilities to sum to one (Mixtral always does)."""
    shared_expert_intermediate_size: int = 0
    """Qwen2-MoE: width of the always-on shared expert (0: none); its output is scaled by sigmoid(gate)."""
    sparse_layers: tuple[int, ...] = ()
    """Layers whose MLP is the MoE; the others keep the dense MLP (intermediate_size)."""
    scoring: str = "softmax"
    """DeepSeek: 'softmax' (V2) or 'sigmoid' (V3, plus e_score_correction_bias to choose, never to weight)."""
    num_groups: int = 1
    """DeepSeek: experts are split into this many groups; a token picks experts from top_k_groups of them."""
    top_k_groups: int = 1
    """DeepSeek: groups a token may route to (V2 ranks groups by their best score, V3 by its top-2 sum)."""
    routed_scaling_factor: float = 1.0
    """DeepSeek: the routed experts' weights are multiplied by this."""


@dataclass(frozen=True)
class MLAConfig:
    """DeepSeek's multi-latent attention: K and V are up-projected from one cached latent per token."""

    q_lora_rank: int | None
    """Width of the query's low-rank bottleneck (q_a_proj, q_a_layernorm, q_b_proj); None: one q_proj."""
    kv_lora_rank: int
    """Width of the compressed KV (the cached latent, after kv_a_layernorm)."""
    qk_nope_head_dim: int
    """Per-head query/key dims without position (the key's from kv_b_proj)."""
    qk_rope_head_dim: int
    """Per-head query dims, and the one shared cached key, that carry RoPE."""
    v_head_dim: int
    interleaved_rope: bool
    """RoPE rotates pairs (x0, x1), (x2, x3), ... (V2; V3's rope_interleave), not halves."""
    softmax_scale: float
    """qk_head_dim ** -0.5, times yarn's mscale_all_dim correction squared."""

    @property
    def latent_dim(self) -> int:
        """What the cache holds per token and layer: kv_lora_rank + qk_rope_head_dim."""
        return self.kv_lora_rank + self.qk_rope_head_dim


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder's shape."""

    architecture: str
    """A value of SUPPORTED_ARCHITECTURES: 'llama', 'qwen2', 'mistral', 'qwen3', 'qwen3_moe', ..."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    """Width of the SwiGLU MLP."""
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    """Equal to num_attention_heads for MHA, fewer for GQA, 1 for MQA."""
    head_dim: int
    max_position_embeddings: int
    """Longest context the model accepts, in tokens."""
    rms_norm_eps: float
    rope: RopeConfig
    attention_bias: bool
    """Bias on the q, k and v projections (Qwen2; Llama's attention_bias)."""
    o_proj_bias: bool
    """Bias on the output projection (Llama's attention_bias only)."""
    tie_word_embeddings: bool
    sliding_window: int | None
    """Mistral: a query attends to at most this many most recent positions, itself included."""
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    qk_norm: bool = False
    """Qwen3: per-head RMSNorm on q and k before RoPE."""
    moe: MoEConfig | None = None
    """The sparse MLP, for mixtures of experts."""
    mla: MLAConfig | None = None
    """Multi-latent attention (DeepSeek-V2/V3), which replaces the K/V projections and the K/V cache."""

    @property
    def num_queries_per_kv(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    def fingerprint(self) -> str:
        """A stable digest of the shape; part of the block-hash namespace together with the weights' identity."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def rope_from_hf(raw: dict[str, Any], supported: tuple[str, ...] = SUPPORTED_ROPE_TYPES) -> RopeConfig:
    # transformers 5 writes `rope_parameters` (with rope_theta inside); 4.x writes rope_theta + rope_scaling.
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in supported:
        raise UnsupportedModelError(
            f"config.json: rope type {rope_type!r} (rope_parameters.rope_type) is not supported; "
            f"supported: {', '.join(supported)}"
        )
    if rope_type == "yarn":
        from kvmesh.engine.deepseek_config import yarn_rope

        return yarn_rope(raw, params, theta)
    return RopeConfig(
        theta=theta,
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)),
    )


def refuse(field: str, value: Any, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"config.json: {field}={value!r} is not supported: {why}")


def model_config_from_hf(raw: dict[str, Any], generation_config: dict[str, Any] | None = None) -> ModelConfig:
    """Validate a parsed config.json and turn it into a ModelConfig. Raises UnsupportedModelError."""
    archs = raw.get("architectures") or []
    arch = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        raise refuse("architectures", archs, f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    if arch in DEEPSEEK_FAMILY:
        from kvmesh.engine.deepseek_config import deepseek_config_from_hf

        return deepseek_config_from_hf(raw, arch, eos_ids((generation_config or {}).get("eos_token_id")))
    hidden_act = raw.get("hidden_act", "silu")
    if hidden_act != "silu":
        raise refuse("hidden_act", hidden_act, "the SwiGLU MLP needs 'silu'")
    if raw.get("mlp_bias"):
        raise refuse("mlp_bias", raw["mlp_bias"], "MLP biases are not implemented")
    if raw.get("pretraining_tp", 1) not in (1, None):
        raise refuse("pretraining_tp", raw["pretraining_tp"], "only 1 is implemented")

    num_heads = int(raw["num_attention_heads"])
    num_kv_heads = int(raw.get("num_key_value_heads") or num_heads)
    if num_heads % num_kv_heads:
        raise refuse("num_key_value_heads", num_kv_heads, f"must divide num_attention_heads={num_heads}")
    hidden = int(raw["hidden_size"])
    head_dim = int(raw.get("head_dim") or hidden // num_heads)

    sliding_window: int | None = None
    if arch in QWEN_FAMILY and raw.get("use_sliding_window"):
        raise refuse("use_sliding_window", True, "Qwen's per-layer sliding window is not implemented")
    if arch in ("mistral", "mixtral") and raw.get("sliding_window") is not None:
        sliding_window = int(raw["sliding_window"])

    eos = eos_ids((generation_config or {}).get("eos_token_id")) or eos_ids(raw.get("eos_token_id"))
    # Qwen2 always has q/k/v biases; Qwen2-MoE names them qkv_bias; neither biases o_proj.
    qkv_bias_only = arch == "qwen2" or (arch == "qwen2_moe" and raw.get("qkv_bias", True))
    attention_bias = bool(raw.get("attention_bias", False)) or qkv_bias_only
    return ModelConfig(
        architecture=arch,
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(raw["intermediate_size"]),
        num_hidden_layers=int(raw["num_hidden_layers"]),
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope=rope_from_hf(raw),
        attention_bias=attention_bias,
        o_proj_bias=bool(raw.get("attention_bias", False)) and arch not in ("qwen2", "qwen2_moe"),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        sliding_window=sliding_window,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=eos,
        qk_norm=arch in ("qwen3", "qwen3_moe"),
        moe=_moe_from_hf(raw, arch),
    )


def _moe_from_hf(raw: dict[str, Any], arch: str) -> MoEConfig | None:
    if arch not in ("qwen3_moe", "mixtral", "qwen2_moe"):
        return None
    num_layers = int(raw["num_hidden_layers"])
    num_experts = int(raw.get("num_experts") or raw.get("num_local_experts") or 0)
    top_k = int(raw.get("num_experts_per_tok", 2))
    if num_experts < 1 or not 1 <= top_k <= num_experts:
        raise refuse("num_experts_per_tok", top_k, f"needs 1 <= k <= num_experts={num_experts}")
    if arch == "mixtral":
        return MoEConfig(num_experts, top_k, int(raw["intermediate_size"]), True, 0, tuple(range(num_layers)))
    step = int(raw.get("decoder_sparse_step", 1))
    mlp_only = set(raw.get("mlp_only_layers") or ())
    sparse = tuple(i for i in range(num_layers) if i not in mlp_only and (i + 1) % step == 0)
    return MoEConfig(
        num_experts,
        top_k,
        int(raw["moe_intermediate_size"]),
        bool(raw.get("norm_topk_prob", False)),
        int(raw.get("shared_expert_intermediate_size") or 0) if arch == "qwen2_moe" else 0,
        sparse,
    )
