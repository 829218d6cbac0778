"""Loading a Hugging Face-format checkpoint directory from local disk (nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from kvmesh.engine.deepseek import DeepseekForCausalLM
from kvmesh.engine.model import CausalLM
from kvmesh.engine.model_config import CheckpointError, ModelConfig, model_config_from_hf
from kvmesh.engine.moe import stack_expert_weights

MIXTRAL_NAMES = (
    (".block_sparse_moe.", ".mlp."),
    (".w1.", ".gate_proj."),
    (".w2.", ".down_proj."),
    (".w3.", ".up_proj."),
)
"""Mixtral's checkpoint names -> ours (the same modules Qwen-MoE checkpoints name gate/up/down_proj)."""

LanguageModel = CausalLM | DeepseekForCausalLM
"""What the engine runs: forward(input_ids, positions, pool, batch) -> hidden, logits(hidden), config."""

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def read_json(path: Path, *, required: bool = True) -> dict[str, Any] | None:
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path}: missing (a Hugging Face checkpoint directory needs it)")
        return None
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return value


def load_model_config(path: Path) -> ModelConfig:
    raw = read_json(path / "config.json")
    assert raw is not None
    generation = read_json(path / "generation_config.json", required=False)
    return model_config_from_hf(raw, generation)


def safetensors_files(path: Path) -> list[Path]:
    """model.safetensors, or the shards named by model.safetensors.index.json."""
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    index_path = path / "model.safetensors.index.json"
    if not index_path.is_file():
        raise CheckpointError(f"{path}: neither model.safetensors nor model.safetensors.index.json is there")
    index = read_json(index_path)
    assert index is not None
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path}: no 'weight_map' object")
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if not (path / shard).is_file():
            raise CheckpointError(f"{path / shard}: missing (named by {index_path.name})")
    return [path / shard for shard in shards]


def our_name(name: str, config: ModelConfig) -> str:
    """The parameter a checkpoint tensor's name maps to in our model."""
    if config.architecture == "mixtral" and ".block_sparse_moe." in name:
        for theirs, ours in MIXTRAL_NAMES:
            name = name.replace(theirs, ours)
    return name


def build_model(config: ModelConfig) -> LanguageModel:
    """The model class a config needs, with uninitialised weights (on the current default device)."""
    return DeepseekForCausalLM(config) if config.mla is not None else CausalLM(config)


def is_extra_layer(name: str, config: ModelConfig) -> bool:
    """A tensor of a layer past num_hidden_layers: DeepSeek-V3's multi-token-prediction module, which
    transformers skips too (it serves MTP speculation, not the model's own logits)."""
    parts = name.split(".")
    return (
        config.mla is not None
        and parts[:2] == ["model", "layers"]
        and len(parts) > 2
        and parts[2].isdigit()
        and int(parts[2]) >= config.num_hidden_layers
    )


def load_model(path: str | Path, dtype: str | torch.dtype = "float32", device: str = "cpu") -> LanguageModel:
    """Build the model for a checkpoint directory and load its weights (cast to `dtype`)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a Hugging Face checkpoint directory)")
    config = load_model_config(path)
    torch_dtype = parse_dtype(dtype)
    with torch.device("meta"):
        model = build_model(config)
    expected = {name for name, _ in model.named_parameters()}
    raw: dict[str, torch.Tensor] = {}
    for file in safetensors_files(path):
        try:
            with safe_open(str(file), framework="pt", device="cpu") as reader:
                for name in reader.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    # inv_freq: a buffer some old checkpoints saved; lm_head: a tied copy.
                    skipped = (
                        name.endswith("rotary_emb.inv_freq")
                        or (name == "lm_head.weight" and "lm_head.weight" not in expected)
                        or is_extra_layer(name, config)
                    )
                    if not skipped:
                        keep = name.endswith(model.keep_float32)
                        raw[our_name(name, config)] = reader.get_tensor(name).to(
                            torch.float32 if keep else torch_dtype
                        )
        except (OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"{file}: cannot read safetensors ({exc})") from exc
    state = stack_expert_weights(raw)
    unexpected = [name for name in state if name not in expected]
    if unexpected:
        # NOTE: refused, not ignored: weights the config does not declare (biases, say) would otherwise
        # be dropped silently and the model would compute something else than it was trained to.
        shown = ", ".join(sorted(unexpected)[:5]) + (" ..." if len(unexpected) > 5 else "")
        raise CheckpointError(
            f"{path}: the safetensors files hold weights config.json does not declare: {shown}"
        )
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
        state.pop("lm_head.weight", None)
    missing = sorted(expected - state.keys())
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise CheckpointError(f"{path}: weights missing from the safetensors files: {shown}")
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # The rotary tables are buffers computed at construction, not weights: rebuild them off the meta device.
    model.rotary = model.make_rotary()
    return model.to(device).eval()
