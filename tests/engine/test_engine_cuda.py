"""The engine on a CUDA device against the same weights on the CPU, and the default model's speculative
edits there. Skipped without CUDA; run on an H100 (see bench/RESULTS.md for when)."""

from __future__ import annotations

import ast
import random

import pytest
import torch

from gateway.layout import PromptLayout
from kvmesh import default_model_path
from kvmesh.engine.engine import Engine
from kvmesh.engine.generate import generate_speculative
from kvmesh.engine.speculative import DraftCursor
from tests.factories import make_engine, make_model_config, random_ids
from training.edit_data import make_edit

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("shape", [{}, {"num_key_value_heads": 1}, {"sliding_window": 5}])
def test_cuda_logits_and_greedy_tokens_match_the_cpu(shape):
    cpu = make_engine(make_model_config(**shape), block_size=4, prefill_chunk_size=16)
    cuda = Engine(cpu.model.to("cuda"), cpu.tokenizer, cpu.engine_config)
    assert cuda.pool.kv.device.type == "cuda"
    reference = make_engine(make_model_config(**shape), block_size=4, prefill_chunk_size=16)
    ids = random_ids(45)
    torch.testing.assert_close(cuda.logits(ids).cpu(), reference.logits(ids), atol=1e-4, rtol=1e-4)
    prompts = [random_ids(n, seed=n) for n in (5, 17, 33)]
    assert cuda.generate_batch(prompts, 12, ignore_eos=True) == reference.generate_batch(
        prompts, 12, ignore_eos=True
    )
    assert cuda.pool_usage().num_blocks_used == 0


ORIGINAL = """\
def parse_header(line):
    \"\"\"Split a header line into its main value and a dict of parameters.\"\"\"
    parts = line.split(";")
    key = parts[0].strip().lower()
    params = {}
    for part in parts[1:]:
        if "=" not in part:
            continue
        name, value = part.split("=", 1)
        name = name.strip().lower()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        params[name] = value
    return key, params


def format_header(key, params):
    items = [key]
    for name, value in sorted(params.items()):
        items.append(f"{name}={value}")
    return "; ".join(items)
"""


def default_model_edit_prompt(engine: Engine) -> tuple[list[int], list[int]]:
    """A one-line edit of a 23-line file, laid out as the gateway lays it out: (prompt ids, the
    original's ids)."""
    edit = make_edit(ORIGINAL, ast.parse(ORIGINAL), random.Random(0), budget=(1, 1))
    assert edit is not None
    prompt = PromptLayout(engine.tokenizer).edit(edit.original, edit.snippet)
    return prompt.token_ids, prompt.draft_token_ids


def test_default_model_speculative_edit_on_cuda_equals_plain_greedy():
    """Verifying a chunk of draft tokens in one pass takes other kernels than one-token steps: the
    accepted tokens must still be plain greedy's, on the GPU too."""
    engine = Engine.from_pretrained(default_model_path(), device="cuda")
    prompt, original = default_model_edit_prompt(engine)
    plain = engine.generate(prompt, 400)
    speculative, stats = generate_speculative(engine, prompt, DraftCursor.for_edit(original, prompt), 400)
    assert speculative == plain
    assert stats.accepted_prediction_tokens > len(plain) // 2
    assert engine.pool_usage().num_blocks_used == 0


def test_default_model_greedy_edit_on_cuda_matches_the_cpu():
    cuda = Engine.from_pretrained(default_model_path(), device="cuda")
    cpu = Engine.from_pretrained(default_model_path(), device="cpu")
    prompt, _ = default_model_edit_prompt(cpu)
    assert cuda.generate(prompt, 400) == cpu.generate(prompt, 400)
