"""DeepSeek-V2/V3 (multi-latent attention + routed and shared experts) against `transformers` on random-weight
checkpoints it saved itself, with shapes unlike the released ones: nope, rope and v head dims all differ,
q_lora on and off, dense first layers, top-k 1, 2 and 3, group-limited routing, YaRN with mscale.

Prompts are longer than a block and prefilled in chunks that end mid-block; greedy generation decodes
through the absorbed (latent-space) path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kvmesh.engine.loader import load_model
from tests.engine.test_parity import (
    FP32_ATOL,
    LONG_PROMPT_LEN,
    NUM_NEW_TOKENS,
    PROMPT_LEN,
    assert_refused,
    edit_config,
    load_engine,
    load_reference,
    reference_greedy,
    reference_logits,
)

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("single_thread")

MLA_SHAPE = {
    "num_key_value_heads": 4,
    "kv_lora_rank": 24,
    "qk_nope_head_dim": 12,
    "qk_rope_head_dim": 8,
    "v_head_dim": 20,
    "moe_intermediate_size": 24,
}
YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 32,
    "mscale": 0.9,
    "mscale_all_dim": 0.7,
    "beta_fast": 32,
    "beta_slow": 1,
}
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    # DeepSeek-Coder-V2-Lite's recipe: no q_lora, greedy softmax top-k, 2 shared experts, a dense first layer.
    "v2-greedy-top3": (
        "deepseek_v2",
        {
            "q_lora_rank": None,
            "n_routed_experts": 7,
            "num_experts_per_tok": 3,
            "n_shared_experts": 2,
            "first_k_dense_replace": 1,
            "routed_scaling_factor": 1.5,
        },
    ),
    "v2-group-limited-top1-qlora": (
        "deepseek_v2",
        {
            "q_lora_rank": 32,
            "n_routed_experts": 6,
            "num_experts_per_tok": 1,
            "n_shared_experts": 1,
            "topk_method": "group_limited_greedy",
            "n_group": 3,
            "topk_group": 2,
            "first_k_dense_replace": 0,
        },
    ),
    # DeepSeek-V3's recipe: q_lora, sigmoid scores + correction bias, groups by top-2 sum, renormalised.
    "v3-top2-qlora": (
        "deepseek_v3",
        {
            "q_lora_rank": 32,
            "n_routed_experts": 8,
            "num_experts_per_tok": 2,
            "n_shared_experts": 1,
            "n_group": 4,
            "topk_group": 2,
            "first_k_dense_replace": 1,
            "norm_topk_prob": True,
        },
    ),
    "v3-half-split-rope-yarn-top3": (
        "deepseek_v3",
        {
            "q_lora_rank": None,
            "n_routed_experts": 6,
            "num_experts_per_tok": 3,
            "n_shared_experts": 1,
            "n_group": 2,
            "topk_group": 2,
            "first_k_dense_replace": 0,
            "norm_topk_prob": False,
            "rope_interleave": False,
            "rope_parameters": YARN,
            "max_position_embeddings": 128,
        },
    ),
}
LONG_CASES = ("v3-half-split-rope-yarn-top3",)


@pytest.fixture(scope="module", params=list(CASES))
def checkpoint(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, make_hf_checkpoint: Any
) -> tuple[str, Path]:
    arch, overrides = CASES[request.param]
    return request.param, make_hf_checkpoint(
        tmp_path_factory.mktemp(request.param), arch, **MLA_SHAPE, **overrides
    )


def prompt_len(name: str) -> int:
    return LONG_PROMPT_LEN if name in LONG_CASES else PROMPT_LEN


def test_logits_and_greedy_tokens_match_transformers(checkpoint: tuple[str, Path], code_prompt: Any) -> None:
    name, path = checkpoint
    token_ids = code_prompt(prompt_len(name))
    engine = load_engine(path)
    assert engine.pool.layout.latent
    ours = engine.logits(token_ids)
    reference = load_reference(path)
    theirs = reference_logits(reference, token_ids)
    max_diff = (ours - theirs).abs().max().item()
    assert max_diff <= FP32_ATOL, f"max |ours - transformers| = {max_diff:.2e}"
    generated = engine.generate(token_ids, NUM_NEW_TOKENS, ignore_eos=True)
    assert generated == reference_greedy(reference, token_ids, NUM_NEW_TOKENS)


def test_router_picks_transformers_experts_bit_for_bit(
    checkpoint: tuple[str, Path], code_prompt: Any
) -> None:
    _, path = checkpoint
    reference = load_reference(path)
    captured: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for layer in reference.model.layers:
        if hasattr(layer.mlp, "gate") and hasattr(layer.mlp.gate, "top_k"):
            layer.mlp.gate.register_forward_hook(
                lambda _m, args, out: captured.append(
                    (args[0].reshape(-1, args[0].shape[-1]), out[1], out[2])
                )
            )
    with torch.no_grad():
        reference(input_ids=torch.tensor([code_prompt(40)]))
    ours = [layer.mlp for layer in load_model(path).model.layers if hasattr(layer.mlp, "gate")]
    assert len(ours) == len(captured) > 0
    for moe, (hidden, their_weights, their_experts) in zip(ours, captured, strict=True):
        with torch.no_grad():
            weights, experts = moe.route(hidden)
        # sorted=False leaves the k in an unspecified order: compare per expert id.
        ours_order, theirs_order = experts.argsort(-1), their_experts.argsort(-1)
        assert torch.equal(experts.gather(1, ours_order), their_experts.gather(1, theirs_order))
        assert torch.equal(weights.gather(1, ours_order), their_weights.gather(1, theirs_order))


@pytest.mark.parametrize("name", ["v2-greedy-top3", "v3-top2-qlora"])
def test_bfloat16_logits_close_to_transformers_bfloat16(
    name: str, tmp_path: Path, make_hf_checkpoint: Any, code_prompt: Any
) -> None:
    """The bound of test_parity's bf16 test: 5% of the fp32 logit scale, and about as close to fp32 as theirs."""
    arch, overrides = CASES[name]
    path = make_hf_checkpoint(tmp_path, arch, **MLA_SHAPE, **overrides)
    token_ids = code_prompt(PROMPT_LEN)
    ours = load_engine(path, dtype="bfloat16").logits(token_ids)
    theirs = reference_logits(load_reference(path, torch.bfloat16), token_ids)
    exact = reference_logits(load_reference(path, torch.float32), token_ids)
    scale = exact.abs().max().item()
    assert (ours - theirs).abs().max().item() <= 5e-2 * scale
    their_error = (theirs - exact).abs().max().item()
    assert (ours - exact).abs().max().item() <= max(2 * their_error, 1e-2 * scale)


def test_generate_batch_matches_transformers_one_prompt_at_a_time(
    tmp_path: Path, make_hf_checkpoint: Any, code_prompt: Any
) -> None:
    """Prompt chunks ride in the same passes as other sequences' latent-space decodes."""
    arch, overrides = CASES["v3-top2-qlora"]
    path = make_hf_checkpoint(tmp_path, arch, **MLA_SHAPE, **overrides)
    full = code_prompt(LONG_PROMPT_LEN)
    prompts = [full[:20], full[:LONG_PROMPT_LEN], full[7:40]]
    ours = load_engine(path).generate_batch(prompts, NUM_NEW_TOKENS, ignore_eos=True)
    reference = load_reference(path)
    assert ours == [reference_greedy(reference, prompt, NUM_NEW_TOKENS) for prompt in prompts]


def test_the_cache_holds_one_latent_per_token_and_layer(tmp_path: Path, make_hf_checkpoint: Any) -> None:
    arch, overrides = CASES["v2-greedy-top3"]
    engine = load_engine(make_hf_checkpoint(tmp_path, arch, **MLA_SHAPE, **overrides))
    latent_dim = MLA_SHAPE["kv_lora_rank"] + MLA_SHAPE["qk_rope_head_dim"]
    assert engine.pool.layout.head_dim == latent_dim and engine.pool.layout.num_kv_heads == 1
    assert engine.kv_bytes_per_token == engine.config.num_hidden_layers * latent_dim * 4


REFUSED = {
    "v2-topk-method": ("deepseek_v2", {"topk_method": "noaux_tc"}, ("topk_method", "noaux_tc")),
    "v2-norm-topk-prob": ("deepseek_v2", {"norm_topk_prob": True}, ("norm_topk_prob", "true")),
    "v3-scoring-func": ("deepseek_v3", {"scoring_func": "softmax"}, ("scoring_func", "softmax")),
    "moe-layer-freq": ("deepseek_v2", {"moe_layer_freq": 2}, ("moe_layer_freq", "2")),
    "kv-heads": ("deepseek_v3", {"num_key_value_heads": 2}, ("num_key_value_heads", "2")),
    "fp8": ("deepseek_v3", {"quantization_config": {"quant_method": "fp8"}}, ("quantization_config", "fp8")),
    "n-group": ("deepseek_v3", {"n_group": 3}, ("n_group", "3")),
    "rope-llama3": (
        "deepseek_v2",
        {"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 2.0}},
        ("rope", "llama3"),
    ),
}


@pytest.mark.parametrize("name", REFUSED)
def test_unsupported_deepseek_config_is_refused_naming_field(
    name: str, tmp_path: Path, make_hf_checkpoint: Any
) -> None:
    arch, changes, needles = REFUSED[name]
    base = {"n_routed_experts": 4, "num_experts_per_tok": 2, "q_lora_rank": None}
    if arch == "deepseek_v3":
        base |= {"n_group": 2, "topk_group": 1}
    path = make_hf_checkpoint(tmp_path, arch, **MLA_SHAPE, **base)
    edit_config(path, **changes)
    assert_refused(path, *needles)
