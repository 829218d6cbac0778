"""Shared test factories: tiny Hugging Face checkpoints written by `transformers` itself, and a code tokenizer.

`make_hf_checkpoint(tmp_path, arch="qwen2", num_key_value_heads=1)` builds a seeded random model with
`transformers`' own config and model classes and saves it with `save_pretrained`, so our loader is tested
on exactly what `transformers` writes (transformers 5: `rope_parameters` and `dtype` in config.json,
no `lm_head.weight` when tied, `model.safetensors.index.json` when sharded).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest
import torch
from tokenizers import Tokenizer

from tests.k8s_support import K8S, OVERLAYS, render
from training.checkpoint import END_OF_TEXT, stdlib_corpus_files, train_code_tokenizer

TOKENIZER_VOCAB_SIZE = 512
"""The shared test tokenizer's vocabulary; tiny models default to exactly this many embeddings."""

TINY_CONFIG: dict[str, Any] = {
    "vocab_size": TOKENIZER_VOCAB_SIZE,
    "hidden_size": 64,
    "intermediate_size": 112,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}
"""Config values every tiny checkpoint starts from; `make_hf_checkpoint`'s overrides replace them."""


class MakeHFCheckpoint(Protocol):
    def __call__(
        self,
        path: Path,
        arch: str = "llama",
        *,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        max_shard_size: str | None = None,
        **overrides: Any,
    ) -> Path: ...


def _architectures() -> dict[str, tuple[type, type]]:
    transformers = pytest.importorskip("transformers")
    return {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
        "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
        "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
        "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM),
        "deepseek_v2": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM),
        "deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM),
    }


@torch.no_grad()
def randomize_parameters(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter with seeded values that make each part of the model matter.

    `transformers` initialises norms to one and biases to zero, and its 0.02 std makes attention
    nearly uniform at these widths, which would hide a wrong mask, RoPE or bias behind a 1e-4
    tolerance. Here matrices get std 1/sqrt(fan_in) (attention scores and logits of order one),
    biases std 0.1, and norm weights 1 + N(0, 0.1) (which also catches a Gemma-style `1 + w`).
    """
    generator = torch.Generator().manual_seed(seed)
    # NOTE: named_parameters dedups tied weights, so a tied lm_head is drawn once, as the embedding.
    for name, param in model.named_parameters():
        values = torch.empty(param.shape, dtype=torch.float32)
        if "norm" in name:
            values.normal_(1.0, 0.1, generator=generator)
        elif name.endswith(".bias"):
            values.normal_(0.0, 0.1, generator=generator)
        else:
            values.normal_(0.0, param.shape[-1] ** -0.5, generator=generator)
        param.copy_(values)
    for name, buffer in model.named_buffers():
        # DeepSeek-V3's routing bias is a saved buffer that transformers initialises to zero: make it choose.
        if name.endswith("e_score_correction_bias"):
            buffer.copy_(torch.empty(buffer.shape).normal_(0.0, 0.1, generator=generator))


def build_hf_checkpoint(
    path: Path,
    tokenizer_json: Path,
    arch: str = "llama",
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    **overrides: Any,
) -> Path:
    """Save a seeded random `arch` model with `transformers`' `save_pretrained`, plus tokenizer.json.

    `overrides` go to the config class (`num_key_value_heads=1`, `sliding_window=8`,
    `rope_parameters={...}`, ...). `dtype` is the dtype the weights are saved in.
    """
    config_class, model_class = _architectures()[arch]
    values = {**TINY_CONFIG, "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": None, **overrides}
    config = config_class(**values, attn_implementation="eager")
    torch.manual_seed(seed)  # transformers' own init runs first; randomize_parameters overwrites it all
    model = model_class(config)
    randomize_parameters(model, seed)
    model = model.to(dtype).eval()
    save_kwargs: dict[str, Any] = {"safe_serialization": True}
    if max_shard_size is not None:
        save_kwargs["max_shard_size"] = max_shard_size
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, **save_kwargs)
    shutil.copyfile(tokenizer_json, path / "tokenizer.json")
    generation_config = path / "generation_config.json"
    if not generation_config.exists():
        generation_config.write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 0}) + "\n")
    return path


@pytest.fixture(scope="session")
def code_tokenizer_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer.json trained once per session on a few standard library files."""
    tokenizer = train_code_tokenizer(stdlib_corpus_files(20), vocab_size=TOKENIZER_VOCAB_SIZE)
    assert tokenizer.token_to_id(END_OF_TEXT) == 0
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


@pytest.fixture(scope="session")
def code_tokenizer(code_tokenizer_json: Path) -> Tokenizer:
    return Tokenizer.from_file(str(code_tokenizer_json))


@pytest.fixture(scope="session")
def make_hf_checkpoint(code_tokenizer_json: Path) -> MakeHFCheckpoint:
    """`make_hf_checkpoint(path, arch="llama", *, seed, dtype, max_shard_size, **config overrides) -> path`."""

    def make(path: Path, arch: str = "llama", **kwargs: Any) -> Path:
        return build_hf_checkpoint(path, code_tokenizer_json, arch, **kwargs)

    return make


@pytest.fixture(scope="session")
def code_prompt(code_tokenizer: Tokenizer) -> Callable[[int], list[int]]:
    """`code_prompt(n)`: the first n token ids of some real Python source (not the tokenizer's corpus)."""
    source_files = stdlib_corpus_files(60)[40:]
    text = "\n".join(path.read_text(encoding="utf-8", errors="replace") for path in source_files)
    token_ids = code_tokenizer.encode(text).ids

    def prompt(num_tokens: int) -> list[int]:
        assert num_tokens <= len(token_ids), f"only {len(token_ids)} tokens of source available"
        return token_ids[:num_tokens]

    return prompt


@pytest.fixture
def single_thread() -> Iterator[None]:
    """Run the test on one torch thread (the machine's cores are shared), restoring the count after."""
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


@pytest.fixture(scope="session")
def mesh_model_path(tmp_path_factory: pytest.TempPathFactory, code_tokenizer: Tokenizer) -> Path:
    """A tiny random-weight checkpoint for tests that run the mesh (weights large enough that greedy
    decoding does not tie)."""
    from training.checkpoint import write_random_checkpoint

    return write_random_checkpoint(
        tmp_path_factory.mktemp("mesh-model"),
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tokenizer=code_tokenizer,
        init_std=0.2,
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` need CUDA: without it they are skipped, and say so."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marked gpu); run on a machine with a GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# The Kubernetes manifests, rendered once per session for tests/deploy/test_k8s*.py.
@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {overlay: render(K8S / "overlays" / overlay) for overlay in OVERLAYS}


@pytest.fixture(scope="session")
def with_podmonitors(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The cpu overlay with the podmonitor component added, as a user's overlay would add it."""
    root = tmp_path_factory.mktemp("overlay")
    overlay = os.path.relpath(K8S / "overlays" / "cpu", root)
    component = os.path.relpath(K8S / "components" / "podmonitor", root)
    (root / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: kvmesh\n"
        f"resources: [{overlay}]\ncomponents: [{component}]\n"
    )
    return render(root)
