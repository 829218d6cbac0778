"""The default model kvmesh ships: there, small, a GQA Llama with an 8k context, loaded by our engine and by
`transformers` with the same logits, and what `kvmesh up` serves when given no --model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gateway.layout import PromptLayout
from gateway.server import EDIT_SLACK_TOKENS
from kvmesh import default_model_path
from kvmesh.client import Client
from kvmesh.engine.config import EngineConfig
from kvmesh.engine.engine import Engine
from kvmesh.engine.special_tokens import SPECIAL_TOKENS
from kvmesh.engine.tokenizer import Tokenizer
from training.edit_data import make_snippet

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
MODEL = default_model_path()
MAX_BYTES = 30 * 2**20
FP32_ATOL = 1e-4

ORIGINAL = '''def parse_pairs(text):
    """Split "key=value" lines into a dict."""
    pairs = {}
    for line in text.splitlines():
        key, _, value = line.partition("=")
        pairs[key.strip()] = value.strip()
    return pairs
'''
UPDATED = ORIGINAL.replace(
    "    for line in text.splitlines():\n",
    "    for line in text.splitlines():\n        if not line.strip():\n            continue\n",
)
SNIPPET = make_snippet(ORIGINAL, UPDATED)


def test_the_checkpoint_is_complete_documented_and_small() -> None:
    names = {path.name for path in MODEL.iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "README.md",
    } <= names
    size = sum(path.stat().st_size for path in MODEL.iterdir())
    assert size <= MAX_BYTES, f"the default model is {size} bytes, over {MAX_BYTES}"


def test_config_is_a_gqa_llama_with_an_8k_context() -> None:
    config = json.loads((MODEL / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_key_value_heads"] < config["num_attention_heads"]
    assert config["max_position_embeddings"] >= 8192


def test_special_tokens_have_the_ids_the_layout_uses() -> None:
    tokenizer = Tokenizer.from_file(MODEL / "tokenizer.json")
    assert [tokenizer.token_to_id(token) for token in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))
    assert PromptLayout(tokenizer).uses_special_tokens


@pytest.mark.usefixtures("single_thread")
def test_logits_and_greedy_tokens_match_transformers() -> None:
    engine = Engine.from_pretrained(MODEL, "float32", "cpu", EngineConfig(prefill_chunk_size=40))
    prompt = PromptLayout(engine.tokenizer).edit(ORIGINAL, SNIPPET).token_ids
    reference = transformers.LlamaForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(input_ids=torch.tensor([prompt])).logits[0]
        reference_tokens = reference.generate(
            torch.tensor([prompt]), max_new_tokens=40, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(prompt) :].tolist()
    ours = engine.logits(prompt)
    assert (ours - expected).abs().max().item() <= FP32_ATOL
    assert engine.generate(prompt, 40, ignore_eos=True) == reference_tokens


@pytest.mark.slow
def test_kvmesh_up_serves_the_default_model_for_completions_and_edits(tmp_path: Path) -> None:
    # No --model: the shipped model. The edit's streamed text must be the engine's greedy output, decoded.
    environ = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "kvmesh.cli", "up", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environ,
        cwd=tmp_path,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("kvmesh up: gateway on "), line + (
            process.stderr.read() if process.poll() else ""
        )
        client = Client(line.split()[4], timeout_s=120)
        edited = "".join(chunk.text for chunk in client.edit(ORIGINAL, SNIPPET))
        completion = list(client.complete(prefix="def parse_pairs(text):\n    ", suffix="", max_tokens=16))
    finally:
        process.terminate()
        process.communicate(timeout=60)
    engine = Engine.from_pretrained(MODEL, dtype="float32", device="cpu")
    prompt = PromptLayout(engine.tokenizer).edit(ORIGINAL, SNIPPET)
    limit = len(prompt.draft_token_ids) + EDIT_SLACK_TOKENS  # the gateway's default for edits
    assert edited == engine.tokenizer.decode(engine.generate(prompt.token_ids, limit))
    assert completion[-1].usage.completion_tokens > 0
