"""DeepSeek-V2/V3 configs: multi-latent attention, YaRN rope as these checkpoints use it, and routed plus
shared experts with V2's or V3's routing. Read into the same ModelConfig as every other model; what our
model does not implement is refused with the field named.

NOTE: where DeepSeek's own remote code and transformers disagree, we follow transformers (our parity
reference) and refuse the field when a config would make them differ: V2's norm_topk_prob (transformers
never renormalises V2's weights) and moe_layer_freq (transformers makes every layer from
first_k_dense_replace on an MoE).
"""

from __future__ import annotations

import math
from typing import Any

from kvmesh.engine.model_config import (
    MLAConfig,
    ModelConfig,
    MoEConfig,
    RopeConfig,
    eos_ids,
    refuse,
    rope_from_hf,
)

DEEPSEEK_ROPE_TYPES = ("default", "yarn")
V2_TOPK_METHODS = ("greedy", "group_limited_greedy")


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature correction for a context stretched `factor` times."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_rope(raw: dict[str, Any], params: dict[str, Any], theta: float) -> RopeConfig:
    """rope_parameters of type 'yarn' (DeepSeek's rope_scaling), with transformers' defaults."""
    max_positions = int(raw.get("max_position_embeddings", 2048))
    original = int(params.get("original_max_position_embeddings") or max_positions)
    factor = float(params.get("factor") or max_positions / original)
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise refuse("rope_parameters.partial_rotary_factor", params["partial_rotary_factor"], "only 1.0")
    return RopeConfig(
        theta=theta,
        rope_type="yarn",
        factor=factor,
        original_max_position_embeddings=original,
        beta_fast=float(params.get("beta_fast") or 32),
        beta_slow=float(params.get("beta_slow") or 1),
        truncate=bool(params.get("truncate", True)),
        attention_factor=float(attention_factor),
        mscale_all_dim=float(mscale_all_dim or 0.0),
    )


def deepseek_config_from_hf(raw: dict[str, Any], arch: str, generation_eos: tuple[int, ...]) -> ModelConfig:
    """A DeepseekV2/V3ForCausalLM config.json -> ModelConfig (with `mla` and `moe`). Raises UnsupportedModelError."""
    for field, value, allowed in (
        ("hidden_act", raw.get("hidden_act", "silu"), ("silu",)),
        ("pretraining_tp", raw.get("pretraining_tp") or 1, (1,)),
        ("mlp_bias", bool(raw.get("mlp_bias")), (False,)),
        ("quantization_config", raw.get("quantization_config"), (None,)),
    ):
        if value not in allowed:
            raise refuse(field, value, f"only {allowed[0]!r} is implemented")
    num_heads = int(raw["num_attention_heads"])
    num_kv_heads = int(raw.get("num_key_value_heads") or num_heads)
    if num_kv_heads != num_heads:
        raise refuse("num_key_value_heads", num_kv_heads, f"MLA expands K/V per query head ({num_heads})")
    rope = rope_from_hf(raw, DEEPSEEK_ROPE_TYPES)
    mla = _mla_from_hf(raw, arch, rope)
    return ModelConfig(
        architecture=arch,
        vocab_size=int(raw["vocab_size"]),
        hidden_size=int(raw["hidden_size"]),
        intermediate_size=int(raw["intermediate_size"]),
        num_hidden_layers=int(raw["num_hidden_layers"]),
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=mla.qk_nope_head_dim + mla.qk_rope_head_dim,
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope=rope,
        attention_bias=bool(raw.get("attention_bias", False)),
        o_proj_bias=bool(raw.get("attention_bias", False)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        sliding_window=None,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=generation_eos or eos_ids(raw.get("eos_token_id")),
        moe=_moe_from_hf(raw, arch),
        mla=mla,
    )


def _mla_from_hf(raw: dict[str, Any], arch: str, rope: RopeConfig) -> MLAConfig:
    q_lora_rank = raw.get("q_lora_rank")
    nope, rope_dim = int(raw["qk_nope_head_dim"]), int(raw["qk_rope_head_dim"])
    if rope_dim % 2:
        raise refuse("qk_rope_head_dim", rope_dim, "RoPE rotates pairs of dims: it must be even")
    scale = (nope + rope_dim) ** -0.5
    if rope.rope_type != "default" and rope.mscale_all_dim:
        scale *= yarn_mscale(rope.factor, rope.mscale_all_dim) ** 2
    return MLAConfig(
        q_lora_rank=None if q_lora_rank is None else int(q_lora_rank),
        kv_lora_rank=int(raw["kv_lora_rank"]),
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope_dim,
        v_head_dim=int(raw["v_head_dim"]),
        interleaved_rope=arch == "deepseek_v2" or bool(raw.get("rope_interleave", True)),
        softmax_scale=scale,
    )


def _moe_from_hf(raw: dict[str, Any], arch: str) -> MoEConfig:
    num_layers = int(raw["num_hidden_layers"])
    num_experts = raw.get("n_routed_experts")
    if not num_experts:
        raise refuse(
            "n_routed_experts", num_experts, "a DeepSeek model without routed experts is not implemented"
        )
    num_experts = int(num_experts)
    top_k = int(raw.get("num_experts_per_tok") or 0)
    if not 1 <= top_k <= num_experts:
        raise refuse("num_experts_per_tok", top_k, f"needs 1 <= k <= n_routed_experts={num_experts}")
    if int(raw.get("moe_layer_freq", 1)) != 1:
        raise refuse("moe_layer_freq", raw["moe_layer_freq"], "only 1 (every layer past the dense ones)")
    norm_topk_prob = bool(raw.get("norm_topk_prob", arch == "deepseek_v3"))
    if arch == "deepseek_v2":
        scoring, method = "softmax", raw.get("topk_method") or "greedy"
        if method not in V2_TOPK_METHODS:
            raise refuse("topk_method", method, f"DeepSeek-V2 implements {', '.join(V2_TOPK_METHODS)}")
        if norm_topk_prob:
            raise refuse(
                "norm_topk_prob", True, "transformers' DeepSeek-V2 never renormalises routed weights"
            )
        grouped = method == "group_limited_greedy"
    else:
        scoring, grouped = "sigmoid", True
        for field, allowed in (("topk_method", "noaux_tc"), ("scoring_func", "sigmoid")):
            if raw.get(field) not in (None, allowed):
                raise refuse(field, raw[field], f"DeepSeek-V3 implements {allowed!r}")
    num_groups, top_k_groups = 1, 1
    if grouped:
        num_groups, top_k_groups = int(raw.get("n_group") or 0), int(raw.get("topk_group") or 0)
        if num_groups < 1 or num_experts % num_groups:
            raise refuse("n_group", raw.get("n_group"), f"must divide n_routed_experts={num_experts}")
        per_group = num_experts // num_groups
        if not 1 <= top_k_groups <= num_groups or top_k > top_k_groups * per_group:
            raise refuse(
                "topk_group", raw.get("topk_group"), f"needs 1..n_group={num_groups} groups holding k={top_k}"
            )
        if scoring == "sigmoid" and per_group < 2:
            raise refuse("n_group", num_groups, "V3 ranks groups by their top-2 scores: 2+ experts per group")
    intermediate = int(raw["moe_intermediate_size"])
    first_sparse = int(raw.get("first_k_dense_replace") or 0)
    return MoEConfig(
        num_experts=num_experts,
        num_experts_per_tok=top_k,
        expert_intermediate_size=intermediate,
        norm_topk_prob=norm_topk_prob,
        shared_expert_intermediate_size=intermediate * int(raw.get("n_shared_experts") or 0),
        sparse_layers=tuple(range(first_sparse, num_layers)),
        scoring=scoring,
        num_groups=num_groups,
        top_k_groups=top_k_groups,
        routed_scaling_factor=float(raw.get("routed_scaling_factor", 1.0)),
    )
