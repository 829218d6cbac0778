"""make_* factories for tiny models and engines built in memory (no files, no transformers)."""

from __future__ import annotations

import functools
from dataclasses import replace
from typing import Any

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from kvmesh.engine.config import EngineConfig
from kvmesh.engine.engine import Engine
from kvmesh.engine.model import CausalLM
from kvmesh.engine.model_config import ModelConfig, RopeConfig
from kvmesh.engine.tokenizer import Tokenizer

TINY_TEXT = [
    "def add(a, b):\n    return a + b\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "for i in range(10):\n    print(i * i)\n",
    "import os\nimport sys\n\nprint(os.getcwd(), sys.argv)\n",
]


@functools.cache
def make_tokenizer(vocab_size: int = 300) -> Tokenizer:
    inner = HFTokenizer(models.BPE())
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    inner.train_from_iterator(TINY_TEXT * 20, trainer)
    return Tokenizer(inner)


def make_model_config(**overrides: object) -> ModelConfig:
    config = ModelConfig(
        architecture="llama",
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        rope=RopeConfig(theta=10000.0),
        attention_bias=False,
        o_proj_bias=False,
        tie_word_embeddings=False,
        sliding_window=None,
        bos_token_id=0,
        eos_token_ids=(0,),
    )
    return replace(config, **overrides)  # type: ignore[arg-type]


def make_model(config: ModelConfig | None = None, seed: int = 0) -> CausalLM:
    torch.manual_seed(seed)
    model = CausalLM(config or make_model_config())
    # Larger weights than nn.Linear's default make logits spread out, so greedy ties are unlikely.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0, 0.1)
    return model.eval()


def make_engine(config: ModelConfig | None = None, *, seed: int = 0, **engine_options: Any) -> Engine:
    """A tiny random model's engine; engine_options are EngineConfig fields (block size 4 and 256 blocks
    unless given)."""
    engine_config = EngineConfig(**{"block_size": 4, "num_blocks": 256, **engine_options})
    return Engine(make_model(config, seed), make_tokenizer(), engine_config)


def random_ids(num_tokens: int, vocab_size: int = 300, seed: int = 0) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    # Token 0 is end-of-sequence in the tiny models; prompts avoid it.
    return torch.randint(1, vocab_size, (num_tokens,), generator=generator).tolist()
