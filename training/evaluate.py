"""Held-out evaluation of the default model (or any checkpoint trained the same way).

    python scripts/eval_default_model.py [--model kvmesh/models/default] [--cases 100] [--long-cases 50]

Everything comes from the standard-library files scripts/train_default_model.py held out (whole files,
never trained on), with a fixed seed:

- completion loss: mean cross-entropy per middle token of fill-in-the-middle prompts in SPM order (the
  gateway's layout), computed with transformers' LlamaForCausalLM on the checkpoint;
- apply-edit, on files of up to 40 lines and of 41-80 lines: one synthetic edit per file touching 1-10%
  of its lines (training.edit_data, new text drawn from held-out code), greedy output until
  <|endoftext|>; "exact" is the share of cases whose output equals the updated file; "copied" the share of
  output tokens inside runs matching the original's tokens (difflib on token ids), next to the same share
  for the expected output (what a perfect model gets).

Greedy outputs come from kvmesh's engine with the original as the speculative draft, which gives exactly
plain greedy decoding's tokens (tests/test_speculative.py); the first cases are checked against plain
`Engine.generate` here too.
"""

from __future__ import annotations

import argparse
import difflib
import math
import random
import statistics
import time
from pathlib import Path

import torch

from kvmesh import default_model_path
from kvmesh.engine.config import EngineConfig
from kvmesh.engine.engine import Engine
from kvmesh.engine.generate import generate_speculative_batch
from training.default_model_data import Corpus, ExampleMaker, corpus_files
from training.edit_data import line_budget, make_edit

CHECKED_AGAINST_PLAIN = 4
BATCH = 25


def copied_share(original: list[int], output: list[int]) -> float:
    """Share of output tokens inside runs that match the original (difflib's matching blocks)."""
    if not output:
        return 0.0
    matcher = difflib.SequenceMatcher(None, original, output, autojunk=False)
    return sum(block.size for block in matcher.get_matching_blocks()) / len(output)


def edit_cases(maker: ExampleMaker, rng: random.Random, count: int, min_lines: int, max_lines: int):
    cases = []
    while len(cases) < count:
        text, tree = maker.corpus.window(rng, min_lines, max_lines)
        edit = make_edit(
            text,
            tree,
            rng,
            kinds=rng.sample(["rename", "literal", "insert", "delete", "new_body"], 5),
            budget=line_budget(len(text.splitlines())),
            style=maker.corpus.style,
        )
        if edit is not None:
            cases.append(edit)
    return cases


def evaluate_edits(engine: Engine, maker: ExampleMaker, cases, label: str) -> dict[str, float]:
    prompts, drafts, expected = [], [], []
    for edit in cases:
        prompt = maker.layout.edit(edit.original, edit.snippet)
        prompts.append(prompt.token_ids)
        drafts.append(prompt.draft_token_ids)
        expected.append(maker.tokenizer.encode(edit.updated))
    limit = max(len(e) for e in expected) + 16
    started = time.perf_counter()
    results = []
    for start in range(0, len(prompts), BATCH):
        window = slice(start, start + BATCH)
        results += generate_speculative_batch(engine, prompts[window], drafts[window], limit)
    seconds = time.perf_counter() - started
    outputs = [[t for t in tokens if t != maker.eos] for tokens, _ in results]
    for i in range(min(CHECKED_AGAINST_PLAIN, len(cases))):
        plain = [t for t in engine.generate(prompts[i], limit) if t != maker.eos]
        if plain != outputs[i]:
            raise AssertionError(f"{label} case {i}: speculative output differs from plain greedy")
    exact = [maker.tokenizer.decode(out) == edit.updated for out, edit in zip(outputs, cases, strict=True)]
    figures = {
        "cases": len(cases),
        "exact": sum(exact) / len(cases),
        "copied": statistics.fmean(copied_share(d, o) for d, o in zip(drafts, outputs, strict=True)),
        "copied_expected": statistics.fmean(
            copied_share(d, e) for d, e in zip(drafts, expected, strict=True)
        ),
        "lines": statistics.fmean(len(edit.original.splitlines()) for edit in cases),
        "output_tokens": statistics.fmean(len(e) for e in expected),
        "tokens_per_pass": sum(len(o) for o in outputs) / sum(s.forward_passes for _, s in results),
        "seconds": seconds,
    }
    by_kind: dict[str, list[bool]] = {}
    for edit, ok in zip(cases, exact, strict=True):
        by_kind.setdefault(edit.kind, []).append(ok)
    figures["by_kind"] = {kind: f"{sum(oks)}/{len(oks)}" for kind, oks in sorted(by_kind.items())}
    return figures


@torch.no_grad()
def completion_loss(model_path: Path, maker: ExampleMaker, rng: random.Random, count: int) -> float:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    total, tokens = 0.0, 0
    for _ in range(count):
        example = maker.fill_in_the_middle(rng, 4, 40)
        ids = torch.tensor([example.token_ids])
        logits = model(input_ids=ids[:, :-1]).logits[0, example.answer_start - 1 :]
        target = ids[0, example.answer_start :]
        total += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
        tokens += target.numel()
    return total / tokens


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", type=Path, default=None, help="checkpoint (default: kvmesh's default model)"
    )
    parser.add_argument("--cases", type=int, default=100, help="edit cases of up to 40 lines")
    parser.add_argument("--long-cases", type=int, default=50, help="edit cases of 41-80 lines")
    parser.add_argument(
        "--completions", type=int, default=200, help="fill-in-the-middle prompts for the loss"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_path = args.model or default_model_path()
    engine = Engine.from_pretrained(model_path, "float32", "cpu", EngineConfig(num_blocks=4096))
    maker = ExampleMaker(Corpus(corpus_files(held_out=True)), engine.tokenizer)
    print(f"model: {model_path}; held-out corpus: {len(maker.corpus.files)} files")

    if args.completions:
        loss = completion_loss(model_path, maker, random.Random(f"{args.seed}:fim"), args.completions)
        print(
            f"completion loss (held-out FIM middles, {args.completions} prompts): {loss:.3f} nats/token "
            f"(perplexity {math.exp(loss):.2f})"
        )
    print(
        "| files | cases | mean lines | mean output tokens | exact | copied (output) | copied (expected) "
        "| tokens/forward pass | by kind (exact) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for label, count, low, high in (
        ("<= 40 lines", args.cases, 10, 40),
        ("41-80 lines", args.long_cases, 41, 80),
    ):
        if not count:
            continue
        cases = edit_cases(maker, random.Random(f"{args.seed}:{label}"), count, low, high)
        f = evaluate_edits(engine, maker, cases, label)
        print(
            f"| {label} | {f['cases']} | {f['lines']:.0f} | {f['output_tokens']:.0f} | {f['exact']:.0%} | "
            f"{f['copied']:.1%} | {f['copied_expected']:.1%} | {f['tokens_per_pass']:.1f} | "
            f"{', '.join(f'{k} {v}' for k, v in f['by_kind'].items())} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
