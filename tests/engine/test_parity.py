"""Our engine against `transformers` on the same random-weight checkpoints, which `transformers` itself saved.

Logits go through the paged KV path with prompts longer than a block and a prefill chunk smaller than the
prompt (and not a multiple of the block size), so paging, chunking, RoPE positions and masks all count.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvmesh.engine.config import EngineConfig
from kvmesh.engine.engine import Engine
from training.checkpoint import write_random_checkpoint

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("single_thread")

BLOCK_SIZE = 16
PREFILL_CHUNK_SIZE = 24
"""Smaller than every prompt below, and not a multiple of BLOCK_SIZE: chunks end mid-block."""
PROMPT_LEN = 45
LONG_PROMPT_LEN = 70
"""For sliding windows: many times the window, so most keys fall out of it."""
NUM_NEW_TOKENS = 12
FP32_ATOL = 1e-4

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # NOTE: with head_dim 16 the wavelengths run from 6 to ~20k positions; an original context of 32 puts
    # them in all three llama3 bands (kept, smoothed, divided by factor).
    "original_max_position_embeddings": 32,
}


class Case:
    """One checkpoint to compare: an architecture, config overrides, and how to save or rewrite it."""

    def __init__(
        self,
        arch: str,
        overrides: dict[str, Any] | None = None,
        *,
        max_shard_size: str | None = None,
        legacy_config: dict[str, Any] | None = None,
        prompt_len: int = PROMPT_LEN,
    ) -> None:
        self.arch = arch
        self.overrides = overrides or {}
        self.max_shard_size = max_shard_size
        self.legacy_config = legacy_config
        """When set, config.json is rewritten the way transformers 4.x checkpoints spell it, plus these keys."""
        self.prompt_len = prompt_len


CASES = {
    "llama-gqa": Case("llama"),
    "llama-mqa": Case("llama", {"num_key_value_heads": 1}),
    "llama-mha": Case("llama", {"num_key_value_heads": 4}),
    "llama-tied": Case("llama", {"tie_word_embeddings": True}),
    "llama-attention-bias": Case("llama", {"attention_bias": True}),
    "llama-rope-theta": Case("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}),
    # head_dim 24 from 144 / 6; 6 query heads share 2 KV heads; odd MLP width and vocabulary.
    "llama-odd-sizes": Case(
        "llama",
        {
            "hidden_size": 144,
            "num_attention_heads": 6,
            "num_key_value_heads": 2,
            "intermediate_size": 200,
            "vocab_size": 601,
        },
    ),
    # An explicit head_dim that is not hidden_size / heads: q_proj maps 96 -> 144.
    "llama-explicit-head-dim": Case(
        "llama", {"hidden_size": 96, "num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 24}
    ),
    "llama3-rope": Case("llama", {"rope_parameters": LLAMA3_ROPE}, prompt_len=LONG_PROMPT_LEN),
    # The same rope scaling spelled as Llama-3.1's own config.json does: rope_theta + rope_scaling.
    "llama3-rope-legacy-config": Case(
        "llama", {"rope_parameters": LLAMA3_ROPE}, legacy_config={}, prompt_len=LONG_PROMPT_LEN
    ),
    "llama-sharded": Case("llama", {"tie_word_embeddings": True}, max_shard_size="50KB"),
    "qwen2": Case("qwen2"),
    "qwen2-tied-mqa": Case("qwen2", {"tie_word_embeddings": True, "num_key_value_heads": 1}),
    # Qwen2.5's config.json carries a sliding_window that use_sliding_window=false switches off.
    "qwen2-legacy-window-off": Case(
        "qwen2", legacy_config={"sliding_window": 8, "use_sliding_window": False, "max_window_layers": 1}
    ),
    "mistral-window": Case("mistral", {"sliding_window": 8}, prompt_len=LONG_PROMPT_LEN),
    "mistral-no-window": Case("mistral", {"sliding_window": None}, prompt_len=LONG_PROMPT_LEN),
    # q/k norms on a head_dim (24) that is not hidden_size / heads (16).
    "qwen3": Case("qwen3", {"head_dim": 24}),
    "qwen3-tied-mqa": Case("qwen3", {"tie_word_embeddings": True, "num_key_value_heads": 1, "head_dim": 16}),
    # An odd expert count, top-3, renormalised; and top-1 unnormalised with layer 0 dense (mlp_only_layers).
    "qwen3-moe-top3": Case(
        "qwen3_moe",
        {"num_experts": 5, "num_experts_per_tok": 3, "moe_intermediate_size": 40, "norm_topk_prob": True},
    ),
    "qwen3-moe-top1-dense-first": Case(
        "qwen3_moe",
        {"num_experts": 3, "num_experts_per_tok": 1, "moe_intermediate_size": 24, "mlp_only_layers": [0]},
    ),
    "mixtral-top2": Case("mixtral", {"num_local_experts": 3, "num_experts_per_tok": 2}),
    "mixtral-top1-window": Case(
        "mixtral",
        {"num_local_experts": 5, "num_experts_per_tok": 1, "sliding_window": 8},
        prompt_len=LONG_PROMPT_LEN,
    ),
    "qwen2-moe-shared": Case(
        "qwen2_moe",
        {
            "num_experts": 7,
            "num_experts_per_tok": 3,
            "moe_intermediate_size": 24,
            "shared_expert_intermediate_size": 40,
        },
    ),
    # decoder_sparse_step 2: layer 0 keeps the dense MLP; renormalised top-2.
    "qwen2-moe-sparse-step": Case(
        "qwen2_moe",
        {
            "num_experts": 4,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 24,
            "shared_expert_intermediate_size": 32,
            "decoder_sparse_step": 2,
            "norm_topk_prob": True,
        },
    ),
}
BF16_CASES = [
    "llama-gqa",
    "llama-tied",
    "llama3-rope",
    "qwen2",
    "mistral-window",
    "qwen3",
    "qwen3-moe-top3",
    "mixtral-top2",
    "qwen2-moe-shared",
]


def to_legacy_config(path: Path, extra: dict[str, Any]) -> None:
    """Rewrite config.json in transformers 4.x spelling: rope_theta + rope_scaling, torch_dtype, no layer_types."""
    config_path = path / "config.json"
    config = json.loads(config_path.read_text())
    rope = dict(config.pop("rope_parameters"))
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = None if rope["rope_type"] == "default" else rope
    config["torch_dtype"] = config.pop("dtype")
    config.pop("layer_types", None)
    config.update(extra)
    config_path.write_text(json.dumps(config, indent=2))


@pytest.fixture(scope="module", params=list(CASES))
def case_checkpoint(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, make_hf_checkpoint: Any
) -> tuple[Case, Path, Path]:
    """(case, directory the engine loads, directory transformers loads): the same weights."""
    case = CASES[request.param]
    path = make_hf_checkpoint(
        tmp_path_factory.mktemp(request.param),
        case.arch,
        max_shard_size=case.max_shard_size,
        **case.overrides,
    )
    if case.max_shard_size is not None:
        assert (path / "model.safetensors.index.json").is_file()
        assert not (path / "model.safetensors").exists()
    if case.legacy_config is None:
        return case, path, path
    legacy = tmp_path_factory.mktemp(f"{request.param}-legacy")
    shutil.copytree(path, legacy, dirs_exist_ok=True)
    to_legacy_config(legacy, case.legacy_config)
    return case, legacy, path


def load_engine(path: Path, dtype: str = "float32") -> Engine:
    return Engine.from_pretrained(
        path,
        dtype,
        config=EngineConfig(block_size=BLOCK_SIZE, num_blocks=64, prefill_chunk_size=PREFILL_CHUNK_SIZE),
    )


def load_reference(path: Path, dtype: torch.dtype = torch.float32) -> Any:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager")
    # NOTE: generation must run the full length, like our ignore_eos=True.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.eval()


def reference_logits(model: Any, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([token_ids])).logits[0].float()


def reference_greedy(model: Any, token_ids: list[int], num_new_tokens: int) -> list[int]:
    input_ids = torch.tensor([token_ids])
    with torch.no_grad():
        output = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=num_new_tokens,
        )
    new_ids = output[0, len(token_ids) :].tolist()
    assert len(new_ids) == num_new_tokens, "transformers stopped early: eos was not disabled"
    return new_ids


def test_logits_match_transformers(case_checkpoint: tuple[Case, Path, Path], code_prompt: Any) -> None:
    case, engine_path, reference_path = case_checkpoint
    token_ids = code_prompt(case.prompt_len)
    engine = load_engine(engine_path)
    ours = engine.logits(token_ids)
    theirs = reference_logits(load_reference(reference_path), token_ids)
    assert ours.dtype == torch.float32
    assert ours.shape == theirs.shape == (len(token_ids), engine.config.vocab_size)
    max_diff = (ours - theirs).abs().max().item()
    assert max_diff <= FP32_ATOL, (
        f"max |ours - transformers| = {max_diff:.2e} (logit scale {theirs.abs().max():.2f})"
    )
    assert engine.pool_usage().num_blocks_used == 0


def test_greedy_generation_matches_transformers(
    case_checkpoint: tuple[Case, Path, Path], code_prompt: Any
) -> None:
    case, engine_path, reference_path = case_checkpoint
    token_ids = code_prompt(case.prompt_len)
    ours = load_engine(engine_path).generate(token_ids, NUM_NEW_TOKENS, ignore_eos=True)
    assert ours == reference_greedy(load_reference(reference_path), token_ids, NUM_NEW_TOKENS)


@pytest.mark.parametrize("name", BF16_CASES)
def test_bfloat16_logits_close_to_transformers_bfloat16(
    name: str, tmp_path: Path, make_hf_checkpoint: Any, code_prompt: Any
) -> None:
    """bf16 keeps 8 significant bits, so a logit near 4 is itself rounded to a step of 2**-6 ~ 0.016, and two
    correct implementations round at different points (fused vs separate ops, accumulation order, where they
    upcast). Measured on these 2-layer models: ours vs transformers differ by ~1.3% of the logit scale
    (max |fp32 logit| ~ 4.5), and each is ~2% from fp32. The bound, 5% of the scale, leaves ~4x headroom,
    while the bugs this file guards against (a missing bias, a wrong RoPE band, a window off by one) move
    logits by 60-100% of the scale. Ours must also be about as close to fp32 as transformers' bf16 is.
    """
    case = CASES[name]
    path = make_hf_checkpoint(tmp_path, case.arch, **case.overrides)
    token_ids = code_prompt(case.prompt_len)
    ours = load_engine(path, dtype="bfloat16").logits(token_ids)
    theirs = reference_logits(load_reference(path, torch.bfloat16), token_ids)
    exact = reference_logits(load_reference(path, torch.float32), token_ids)
    scale = exact.abs().max().item()
    max_diff = (ours - theirs).abs().max().item()
    assert max_diff <= 5e-2 * scale, (
        f"bf16 max |ours - transformers| = {max_diff:.3f}, logit scale {scale:.2f}"
    )
    our_error = (ours - exact).abs().max().item()
    their_error = (theirs - exact).abs().max().item()
    assert our_error <= max(2 * their_error, 1e-2 * scale), (
        f"bf16 error vs fp32: ours {our_error:.3f}, theirs {their_error:.3f}"
    )


def test_bfloat16_checkpoint_runs_in_float32(
    tmp_path: Path, make_hf_checkpoint: Any, code_prompt: Any
) -> None:
    """Weights stored in bf16 and upcast on load are exactly representable: fp32 parity holds."""
    path = make_hf_checkpoint(tmp_path, "llama", dtype=torch.bfloat16)
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    token_ids = code_prompt(PROMPT_LEN)
    ours = load_engine(path, dtype="float32").logits(token_ids)
    theirs = reference_logits(load_reference(path, torch.float32), token_ids)
    assert (ours - theirs).abs().max().item() <= FP32_ATOL


@pytest.mark.parametrize("name", ["llama-gqa", "qwen3-moe-top3"])
def test_generate_batch_matches_transformers_one_prompt_at_a_time(
    name: str, tmp_path: Path, make_hf_checkpoint: Any, code_prompt: Any
) -> None:
    """Batching changes which tokens share an expert's matmul, never the tokens generated."""
    case = CASES[name]
    path = make_hf_checkpoint(tmp_path, case.arch, **case.overrides)
    full = code_prompt(LONG_PROMPT_LEN)
    prompts = [full[:20], full[:LONG_PROMPT_LEN], full[7:40]]
    ours = load_engine(path).generate_batch(prompts, NUM_NEW_TOKENS, ignore_eos=True)
    reference = load_reference(path)
    assert ours == [reference_greedy(reference, prompt, NUM_NEW_TOKENS) for prompt in prompts]


def test_write_random_checkpoint_loads_in_transformers_and_matches(
    tmp_path: Path, code_tokenizer: Any, code_prompt: Any
) -> None:
    """Our own checkpoint writer (legacy config keys, tied embeddings) is a valid Llama for both loaders."""
    path = write_random_checkpoint(
        tmp_path / "model",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=112,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tokenizer=code_tokenizer,
        init_std=0.125,
        seed=3,
    )
    token_ids = code_prompt(PROMPT_LEN)
    engine = load_engine(path)
    reference = load_reference(path)
    assert reference.config.tie_word_embeddings
    assert (engine.logits(token_ids) - reference_logits(reference, token_ids)).abs().max().item() <= FP32_ATOL
    text = "def f(x):\n    return x  # é\n"
    assert engine.tokenizer.encode(text) == code_tokenizer.encode(text).ids
    assert engine.tokenizer.decode(engine.tokenizer.encode(text)) == text


# ---- what we refuse ---------------------------------------------------------------------------


def edit_config(path: Path, **changes: Any) -> None:
    config_path = path / "config.json"
    config = json.loads(config_path.read_text())
    config.update(changes)
    config_path.write_text(json.dumps(config))


def assert_refused(path: Path, *needles: str) -> None:
    """Loading fails with a ValueError whose message names each needle (the field and its value)."""
    with pytest.raises(ValueError) as excinfo:
        Engine.from_pretrained(path, config=EngineConfig(num_blocks=8))
    message = str(excinfo.value)
    for needle in needles:
        assert needle.lower() in message.lower(), f"{needle!r} not named in: {message}"


UNSUPPORTED = {
    "gpt2-architecture": (
        "llama",
        {"architectures": ["GPT2LMHeadModel"]},
        ("architecture", "GPT2LMHeadModel"),
    ),
    "gelu": ("llama", {"hidden_act": "gelu"}, ("hidden_act", "gelu")),
    "qwen2-sliding-window": (
        "qwen2",
        {"use_sliding_window": True, "sliding_window": 8},
        ("use_sliding_window", "true"),
    ),
    "qwen3-moe-sliding-window": (
        "qwen3_moe",
        {"use_sliding_window": True, "sliding_window": 8},
        ("use_sliding_window", "true"),
    ),
    "deepseek-v4-architecture": (
        "llama",
        {"architectures": ["DeepseekV4ForCausalLM"]},
        ("architectures", "DeepseekV4ForCausalLM"),
    ),
    "yarn-rope": (
        "llama",
        {
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 256,
            }
        },
        ("rope", "yarn"),
    ),
    "yarn-rope-legacy": (
        "llama",
        {"rope_parameters": None, "rope_theta": 10000.0, "rope_scaling": {"type": "yarn", "factor": 4.0}},
        ("rope", "yarn"),
    ),
}


@pytest.mark.parametrize("name", UNSUPPORTED)
def test_unsupported_config_is_refused_naming_field_and_value(
    name: str, tmp_path: Path, make_hf_checkpoint: Any
) -> None:
    arch, changes, needles = UNSUPPORTED[name]
    path = make_hf_checkpoint(tmp_path, arch)
    edit_config(path, **changes)
    assert_refused(path, *needles)


def test_missing_config_json_is_named(tmp_path: Path, make_hf_checkpoint: Any) -> None:
    path = make_hf_checkpoint(tmp_path, "llama")
    (path / "config.json").unlink()
    with pytest.raises((FileNotFoundError, ValueError), match=r"config\.json"):
        Engine.from_pretrained(path, config=EngineConfig(num_blocks=8))


def test_malformed_config_json_is_named(tmp_path: Path, make_hf_checkpoint: Any) -> None:
    path = make_hf_checkpoint(tmp_path, "llama")
    (path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')
    with pytest.raises(ValueError, match=r"config\.json"):
        Engine.from_pretrained(path, config=EngineConfig(num_blocks=8))


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
def test_missing_safetensors_is_named(sharded: bool, tmp_path: Path, make_hf_checkpoint: Any) -> None:
    path = make_hf_checkpoint(tmp_path, "llama", max_shard_size="50KB" if sharded else None)
    victim = sorted(path.glob("*.safetensors"))[-1]
    victim.unlink()
    with pytest.raises((FileNotFoundError, ValueError), match=r"safetensors"):
        Engine.from_pretrained(path, config=EngineConfig(num_blocks=8))


def test_missing_tensor_is_named(tmp_path: Path, make_hf_checkpoint: Any) -> None:
    path = make_hf_checkpoint(tmp_path, "llama")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        Engine.from_pretrained(path, config=EngineConfig(num_blocks=8))
