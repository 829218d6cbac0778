"""The default model's training data helpers that the model card's figures rest on (training/
default_model_data.py, training/train.py): corrupted answer inputs, repetitive copies and
edits, the two-stage schedule, the recipes, and the batches made ahead in DataLoader workers."""

from __future__ import annotations

import argparse
import difflib
import json
import random

import pytest
import torch

import training.default_model_data as data
import training.train as train
from kvmesh import default_model_path
from kvmesh.engine.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def maker() -> data.ExampleMaker:
    """An ExampleMaker without a corpus: enough for the random-token tasks."""
    tokenizer = Tokenizer.from_file(default_model_path() / "tokenizer.json")
    maker = data.ExampleMaker.__new__(data.ExampleMaker)
    maker.tokenizer = tokenizer
    maker.eos = tokenizer.token_to_id(data.END_OF_TEXT)
    return maker


def test_corrupt_changes_only_answer_inputs_and_collate_keeps_clean_targets() -> None:
    rng = random.Random(0)
    examples = [data.Example(list(range(10, 10 + n)), answer_start=n // 3) for n in (40, 90, 200)]
    noisy = train.corrupt(examples, rng, rate=0.1)
    changed = 0
    for clean, dirty in zip(examples, noisy, strict=True):
        assert len(dirty.token_ids) == len(clean.token_ids)
        assert dirty.token_ids[: clean.answer_start] == clean.token_ids[: clean.answer_start]
        assert dirty.token_ids[-1] == clean.token_ids[-1], "the last token is only a target"
        changed += sum(a != b for a, b in zip(clean.token_ids, dirty.token_ids, strict=True))
    assert changed > 0
    inputs, targets, mask = train.collate(examples, 0, noisy)
    for row, (clean, dirty) in enumerate(zip(examples, noisy, strict=True)):
        n = len(clean.token_ids)
        assert inputs[row, : n - 1].tolist() == dirty.token_ids[:-1]
        assert targets[row, : n - 1].tolist() == clean.token_ids[1:]
        assert mask[row].nonzero().flatten().tolist() == list(range(clean.answer_start - 1, n - 1))


def test_repetitive_examples_copy_or_apply_one_line(maker: data.ExampleMaker) -> None:
    marker = maker.tokenizer.encode(data.MARKER + "\n")
    copies = edits = 0
    for seed in range(40):
        example = maker.repetitive(random.Random(seed), 6, 20)
        ids, start = example.token_ids, example.answer_start
        original = ids[1 : ids.index(maker.tokenizer.token_to_id(data.EDIT_SNIPPET))]
        snippet = ids[len(original) + 2 : start - 1]
        answer = ids[start:-1]
        assert ids[-1] == maker.eos
        assert ids[start - 1] == maker.tokenizer.token_to_id(data.EDIT_OUTPUT)
        if snippet == marker:
            copies += 1
            assert answer == original
            continue
        edits += 1
        # The snippet's body (context lines and the new line) is a run of the answer, and the answer
        # differs from the original in at most one line's tokens (5 phrases of up to 3 tokens, newline).
        body = snippet[len(marker) :] if snippet[: len(marker)] == marker else snippet
        body = body[: -len(marker)] if body[-len(marker) :] == marker else body
        assert any(answer[i : i + len(body)] == body for i in range(len(answer) - len(body) + 1))
        matcher = difflib.SequenceMatcher(None, original, answer, autojunk=False)
        same = sum(block.size for block in matcher.get_matching_blocks())
        assert len(original) - same <= 16 and len(answer) - same <= 16
    assert copies and edits


def test_polish_stage_restarts_the_learning_rate_after_the_curriculum() -> None:
    args = argparse.Namespace(steps=100, polish_steps=50, lr=2e-3, polish_lr=1e-3, warmup=10)
    assert train.phase_at(0, 100, 50) is train.PHASES[0]
    assert train.phase_at(99, 100, 50) is train.PHASES[-1]
    assert train.phase_at(100, 100, 50) is train.POLISH_PHASES[0]
    # Stage 1 ends at 10% of its peak.
    assert train.learning_rate_at(99, args) == pytest.approx(2e-4, rel=0.01)
    assert train.learning_rate_at(100, args) == pytest.approx(1e-4)  # stage 2 warms up again
    assert train.learning_rate_at(109, args) == pytest.approx(1e-3)
    assert max(train.learning_rate_at(s, args) for s in range(100, 150)) == pytest.approx(1e-3)


def test_recipes_fill_what_the_command_line_leaves_out() -> None:
    cpu = train.parse_args(["--recipe", "cpu", "--device", "cpu"])
    assert (cpu.layers, cpu.steps, cpu.polish_steps, cpu.batch_tokens, cpu.workers) == (
        4,
        1500,
        1300,
        6144,
        0,
    )
    gpu = train.parse_args(["--recipe", "gpu", "--steps", "7", "--device", "cuda"])
    assert (gpu.layers, gpu.steps, gpu.polish_steps, gpu.batch_tokens) == (6, 7, 8130, 24576)
    assert gpu.workers >= 0
    # The shipped checkpoint is what the gpu recipe trains.
    config = json.loads((default_model_path() / "config.json").read_text())
    assert config["num_hidden_layers"] == train.RECIPES["gpu"]["layers"]


def test_collate_pads_to_a_multiple_and_masks_the_padding() -> None:
    examples = [data.Example(list(range(10, 10 + n)), answer_start=3) for n in (5, 70)]
    plain = train.collate(examples, 0)
    padded = train.collate(examples, 0, pad_to=64)
    assert plain[0].shape == (2, 69) and padded[0].shape == (2, 128)
    for a, b in zip(plain, padded, strict=True):
        assert b[:, :69].equal(a)
    assert not padded[2][:, 69:].any()


def test_step_batches_depend_on_the_step_alone_in_workers_too() -> None:
    """What makes resuming and DataLoader workers safe: step n's batch is the same made in any process,
    in any order."""
    tokenizer = Tokenizer.from_file(default_model_path() / "tokenizer.json")
    maker = data.ExampleMaker(data.Corpus(data.corpus_files(held_out=False)[:30]), tokenizer)
    args = train.parse_args(["--recipe", "cpu", "--device", "cpu", "--steps", "40", "--polish-steps", "10"])
    batches = train.StepBatches(maker, args)
    steps = [45, 3, 44, 20]
    alone = [batches[step] for step in steps]
    loader = torch.utils.data.DataLoader(
        batches, batch_size=None, sampler=steps, num_workers=2, multiprocessing_context="fork"
    )
    for mine, theirs in zip(alone, loader, strict=True):
        assert all(a.equal(b) for a, b in zip(mine, theirs, strict=True))
    assert not alone[0][0].equal(alone[2][0]) or not alone[0][2].equal(alone[2][2])
