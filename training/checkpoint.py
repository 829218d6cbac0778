"""Writing Hugging Face-format checkpoints: a code tokenizer, and Llama weights (random or trained).

The default model's training script writes its result with `write_checkpoint`; tests need random
checkpoints that both `transformers` and our loader read. This module writes them with `tokenizers`,
`safetensors` and `torch` only (no `transformers`: it is not a runtime dependency).

A written directory holds:

    config.json              LlamaForCausalLM config (legacy keys: `rope_theta`, `torch_dtype`)
    generation_config.json   bos / eos ids
    model.safetensors        HF parameter names (`model.layers.{i}.self_attn.q_proj.weight`, ...)
    tokenizer.json           byte-level BPE with <|endoftext|> at id 0 and the FIM / edit tokens
    tokenizer_config.json    enough for `transformers.AutoTokenizer` to load tokenizer.json
"""

from __future__ import annotations

import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from kvmesh.engine.special_tokens import END_OF_TEXT, SPECIAL_TOKENS

# Folders of the standard library that are not representative source code (or not the stdlib at all).
_SKIPPED_STDLIB_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)


def stdlib_corpus_files(limit: int, stdlib: Path | None = None) -> list[Path]:
    """The first `limit` Python files of the running interpreter's standard library (or of the copy of
    one at `stdlib`), in sorted order.

    Test suites and installed packages are left out. Deterministic for a given Python build.
    """
    stdlib = stdlib or Path(sysconfig.get_paths()["stdlib"])
    if not stdlib.is_dir():
        raise FileNotFoundError(f"standard library folder {stdlib} not found")
    files = (
        path
        for path in stdlib.rglob("*.py")
        if not _SKIPPED_STDLIB_DIRS.intersection(path.relative_to(stdlib).parts[:-1])
    )
    return sorted(files, key=lambda path: path.relative_to(stdlib).as_posix())[:limit]


def _read_texts(files: list[Path]) -> Iterator[str]:
    for path in files:
        yield path.read_text(encoding="utf-8", errors="replace")


def train_code_tokenizer(files: list[Path], vocab_size: int = 2048) -> Tokenizer:
    """A byte-level BPE tokenizer trained on `files`, deterministically.

    Special tokens come first (`<|endoftext|>` = 0, then FIM prefix / suffix / middle, then edit
    original / snippet / output), then the 256 byte symbols, then merges. `encode` adds no special
    tokens. The vocabulary can come out smaller than `vocab_size` when the corpus runs out of merges.
    """
    if vocab_size < len(SPECIAL_TOKENS) + 256:
        raise ValueError(
            f"vocab_size {vocab_size} is below the {len(SPECIAL_TOKENS) + 256} special and byte tokens"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_read_texts(files), trainer=trainer, length=len(files))
    return tokenizer


def _param_shapes(
    *,
    vocab_size: int,
    hidden_size: int,
    intermediate_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    tie_word_embeddings: bool,
) -> list[tuple[str, tuple[int, ...]]]:
    """HF Llama parameter names and shapes, in a fixed order (the order random values are drawn in)."""
    head_dim = hidden_size // num_attention_heads
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab_size, hidden_size))]
    for i in range(num_hidden_layers):
        prefix = f"model.layers.{i}"
        shapes += [
            (f"{prefix}.input_layernorm.weight", (hidden_size,)),
            (f"{prefix}.self_attn.q_proj.weight", (num_attention_heads * head_dim, hidden_size)),
            (f"{prefix}.self_attn.k_proj.weight", (num_key_value_heads * head_dim, hidden_size)),
            (f"{prefix}.self_attn.v_proj.weight", (num_key_value_heads * head_dim, hidden_size)),
            (f"{prefix}.self_attn.o_proj.weight", (hidden_size, num_attention_heads * head_dim)),
            (f"{prefix}.post_attention_layernorm.weight", (hidden_size,)),
            (f"{prefix}.mlp.gate_proj.weight", (intermediate_size, hidden_size)),
            (f"{prefix}.mlp.up_proj.weight", (intermediate_size, hidden_size)),
            (f"{prefix}.mlp.down_proj.weight", (hidden_size, intermediate_size)),
        ]
    shapes.append(("model.norm.weight", (hidden_size,)))
    if not tie_word_embeddings:
        shapes.append(("lm_head.weight", (vocab_size, hidden_size)))
    return shapes


def write_random_checkpoint(
    path: Path | str,
    *,
    vocab_size: int,
    hidden_size: int,
    intermediate_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    max_position_embeddings: int = 8192,
    tie_word_embeddings: bool = True,
    seed: int = 0,
    tokenizer: Tokenizer | None = None,
    dtype: torch.dtype = torch.float32,
    init_std: float = 0.02,
    rope_theta: float = 10000.0,
    rms_norm_eps: float = 1e-5,
) -> Path:
    """Write a random-weight LlamaForCausalLM checkpoint directory at `path` and return it.

    Linear and embedding weights are drawn from normal(0, `init_std`) with a `torch.Generator` seeded
    by `seed` (so the same arguments give the same bytes); norm weights are ones. Without a
    `tokenizer`, one is trained on standard-library files with `vocab_size` entries. Raises
    ValueError when the shapes don't divide or the tokenizer doesn't fit in `vocab_size`.
    """
    if hidden_size % num_attention_heads:
        raise ValueError(
            f"hidden_size {hidden_size} is not a multiple of num_attention_heads {num_attention_heads}"
        )
    if num_attention_heads % num_key_value_heads:
        raise ValueError(
            f"num_attention_heads {num_attention_heads} is not a multiple of num_key_value_heads {num_key_value_heads}"
        )
    if tokenizer is None:
        tokenizer = train_code_tokenizer(stdlib_corpus_files(100), vocab_size=vocab_size)
    if tokenizer.get_vocab_size() > vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.get_vocab_size()} tokens, more than vocab_size {vocab_size}"
        )
    eos_token_id = tokenizer.token_to_id(END_OF_TEXT)
    if eos_token_id is None:
        raise ValueError(f"the tokenizer has no {END_OF_TEXT} token")

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dims = {
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "tie_word_embeddings": tie_word_embeddings,
    }
    shapes = _param_shapes(**dims)
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in shapes:
        if name.endswith("norm.weight"):
            tensor = torch.ones(shape)
        else:
            tensor = torch.empty(shape).normal_(0.0, init_std, generator=generator)
        tensors[name] = tensor.to(dtype).contiguous()
    write_checkpoint(
        path,
        tensors,
        llama_config(
            **dims,
            max_position_embeddings=max_position_embeddings,
            eos_token_id=eos_token_id,
            dtype=dtype,
            rope_theta=rope_theta,
            rms_norm_eps=rms_norm_eps,
        ),
        tokenizer,
    )
    return path


def llama_config(
    *,
    vocab_size: int,
    hidden_size: int,
    intermediate_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    max_position_embeddings: int,
    tie_word_embeddings: bool,
    eos_token_id: int,
    dtype: torch.dtype,
    rope_theta: float = 10000.0,
    rms_norm_eps: float = 1e-5,
) -> dict[str, object]:
    """The config.json of a LlamaForCausalLM checkpoint with these shapes."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "head_dim": hidden_size // num_attention_heads,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": rms_norm_eps,
        "rope_theta": rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": eos_token_id,
        "eos_token_id": eos_token_id,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def write_checkpoint(
    path: Path, tensors: dict[str, torch.Tensor], config: dict[str, object], tokenizer: Tokenizer
) -> None:
    """Write model.safetensors, config.json, generation_config.json and the tokenizer files into path."""
    path.mkdir(parents=True, exist_ok=True)
    eos_token_id = config["eos_token_id"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    _write_json(path / "config.json", config)
    _write_json(path / "generation_config.json", {"bos_token_id": eos_token_id, "eos_token_id": eos_token_id})
    tokenizer.save(str(path / "tokenizer.json"))
    _write_json(
        path / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": END_OF_TEXT,
            "eos_token": END_OF_TEXT,
            "unk_token": None,
            "add_prefix_space": False,
            "model_max_length": config["max_position_embeddings"],
            "additional_special_tokens": list(SPECIAL_TOKENS[1:]),
        },
    )


def _write_json(path: Path, value: object) -> None:
    path.write_text(json.dumps(value, indent=2) + "\n", encoding="utf-8")
