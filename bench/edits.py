"""Speculative edits against plain greedy decoding and transformers' prompt lookup, on real edit cases.

    python bench/edits.py [--model PATH] [--cases 12] [--quick] [--threads 1] [--repeats 3] [--seed 0]
                          [--device cuda]

Edit cases are built from real source files of this interpreter's standard library (only the files the
default model's training holds out) and site-packages: files of 20-120 lines, picked with a seeded
shuffle (the same files for a given seed and set of installed packages). Each gets one synthetic edit
touching 1-10% of its lines, by kind in turn: a local identifier renamed throughout its function, changed
literal(s), inserted line(s), deleted line(s), a new function body. The update snippet is fast-apply
style: the changed region with two lines of context, and "# ... existing code ..." markers for what is
left out. The prompt is `PromptLayout.edit(original,
snippet)`; the expected output is the updated file. One more case has an UNRELATED draft: a real edit's
prompt, speculated from another file's tokens (and looking up in that file's edit prompt instead of the
real one), to measure what a draft that never matches costs.

Every case runs, on the same weights and the same prompt, for n = expected output tokens + 8 tokens
(eos ignored, so all three produce exactly n):

- (a) plain greedy: `Engine.generate(prompt, n, ignore_eos=True)`.
- (b) speculative: `generate_speculative(engine, prompt, cursor, n, ignore_eos=True)` with
  `cursor = DraftCursor.for_edit(original, prompt)`: the original as the draft, and where the output
  leaves it, prompt lookup in the prompt (the snippet) and the output so far.
- (c) transformers' prompt lookup decoding: `LlamaForCausalLM.generate(do_sample=False,
  prompt_lookup_num_tokens=10)` (still a `generate` kwarg in transformers 5), eos off.

Every output of (b) and (c) is checked equal to (a), token for token; a mismatch is printed loudly with
the logit margin at the first differing token (a margin near 0 is a floating-point near-tie, anything
else a bug). Tokens per forward pass for (b) counts decode passes only: `SpecStats.forward_passes`
includes the prefill passes (ceil(prompt tokens / prefill chunk), prefix caching is off here), which
are subtracted, and the first output token (it comes from the prefill) is left out:
(n - 1) / decode passes, which is 1.00 for plain decoding. Tokens/s is end to end, prefill included.
After a warm-up (each decoder, 32 tokens after the first case's prompt), each case runs the three
--repeats times, interleaved (a b c a b c ...); the median time of each is reported.

Goals (issue 6, on the trained default model): >= 8 tokens per forward pass, >= 5x over (a), >= 2x over
(c), and >= 0.95x (a) with the unrelated draft. Tokens per pass measure the model as much as the
decoder: where the model's output leaves the original (a wrong token, a lost place), drafts are rejected;
a model that copies nothing (random weights) gives ~1 token per pass and ~1x, the decoder's overhead.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import os
import platform
import random
import statistics
import sys
import sysconfig
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from bench.engine import cpu_model_name
from gateway.layout import PromptLayout
from kvmesh import default_model_path
from kvmesh.engine.config import EngineConfig
from kvmesh.engine.engine import Engine
from kvmesh.engine.generate import generate_speculative
from kvmesh.engine.speculative import DraftCursor
from training.default_model_data import is_held_out
from training.edit_data import EDIT_KINDS, make_edit, plain_source

MIN_LINES, MAX_LINES = 20, 120
EXTRA_TOKENS = 8
"""Tokens generated past the expected output (a trained model would stop there; eos is ignored)."""
PROMPT_LOOKUP_NUM_TOKENS = 10
SKIPPED_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__", "testing", "_vendor", "vendor"})
DEGENERATE_DISTINCT_TOKENS = 5
NEAR_TIE = 1e-3
"""A first mismatch whose logit margin is below this is a floating-point near-tie, not a logic error."""


# --- edit cases --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EditCase:
    name: str
    """Edit kind and source file, as shown in the table."""
    original: str
    updated: str
    snippet: str
    num_lines: int
    num_changed_lines: int
    draft: str
    """The text whose tokens are the draft: the original, or an unrelated file."""
    unrelated: bool = False


def candidate_files(seed: int) -> Iterator[tuple[str, Path]]:
    """(label, path) of .py files from the stdlib and site-packages, shuffled with seed, alternating. Of
    the stdlib, only the files the default model was not trained on (those its training holds out)."""
    pools = []
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    purelib = Path(sysconfig.get_paths()["purelib"])
    for root, prefix in ((stdlib, "stdlib"), (purelib, "site-packages")):
        files = sorted(
            path.relative_to(root).as_posix()
            for path in root.rglob("*.py")
            if not SKIPPED_DIRS.intersection(path.relative_to(root).parts[:-1])
            and "site-packages" not in path.relative_to(root).parts
            and (prefix != "stdlib" or is_held_out(path.relative_to(root).as_posix()))
        )
        random.Random(f"{seed}:{prefix}").shuffle(files)
        pools.append([(f"{prefix}/{rel}", root / rel) for rel in files])
    for pair in zip(*pools, strict=False):
        yield from pair


def read_source(path: Path) -> tuple[str, ast.Module] | None:
    """The file's text and syntax tree when it is a plain 20-120-line Python file, else None."""
    try:
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return None
    num_lines = len(text.splitlines())
    if not MIN_LINES <= num_lines <= MAX_LINES or not plain_source(text):
        return None
    return text, tree


def build_cases(num_cases: int, seed: int) -> list[EditCase]:
    """num_cases edits of distinct files, kinds in turn, then one case with an unrelated draft."""
    cases: list[EditCase] = []
    for label, path in candidate_files(seed):
        source = read_source(path)
        if source is None:
            continue
        text, tree = source
        if len(cases) == num_cases:
            # The unrelated case: the previous file's edit, drafted from this file.
            name = f"UNRELATED draft {label} for {cases[-1].name}"
            return [*cases, replace(cases[-1], name=name, draft=text, unrelated=True)]
        rng = random.Random(f"{seed}:{label}")
        turn = len(cases) % len(EDIT_KINDS)
        edit = make_edit(text, tree, rng, kinds=EDIT_KINDS[turn:] + EDIT_KINDS[:turn])
        if edit is not None:
            num_lines = len(text.splitlines())
            cases.append(
                EditCase(
                    f"{edit.kind}: {label}",
                    text,
                    edit.updated,
                    edit.snippet,
                    num_lines,
                    edit.num_changed_lines,
                    text,
                )
            )
    raise RuntimeError(f"found only {len(cases)} usable files for {num_cases} cases + 1")


# --- the three decoders ------------------------------------------------------------------------------


class PromptLookup:
    """transformers' prompt lookup decoding on the same checkpoint, greedy, eos off."""

    def __init__(self, path: Path, device: str) -> None:
        import transformers

        transformers.logging.set_verbosity_error()
        self.model = (
            transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval().to(device)
        )
        # Like ignore_eos=True: always the full length, and eos stays a token it may pick (min_new_tokens
        # with an eos id would mask it, which our ignore_eos does not).
        self.model.generation_config.eos_token_id = None
        self.model.generation_config.pad_token_id = 0
        self.num_forward_passes = 0
        self.model.register_forward_hook(self._count_pass)

    def _count_pass(self, *_: object) -> None:
        self.num_forward_passes += 1

    def generate(self, prompt: list[int], num_new_tokens: int) -> list[int]:
        input_ids = torch.tensor([prompt], device=self.model.device)
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=num_new_tokens,
                min_new_tokens=num_new_tokens,
                do_sample=False,
                prompt_lookup_num_tokens=PROMPT_LOOKUP_NUM_TOKENS,
            )
        return output[0, len(prompt) :].tolist()


@dataclass
class CaseResult:
    case: EditCase
    num_prompt_tokens: int
    num_new_tokens: int
    exact_match: bool
    expected_copy_share: float
    """Share of the expected output's tokens that align with the original's (what a draft could give)."""
    output_copy_share: float
    """Share of the greedy output's tokens that align with the original's."""
    num_decode_passes: int
    """(b)'s forward passes after the prefill."""
    num_distinct_output_tokens: int
    """Distinct tokens in the greedy output: a handful means a degenerate output, a weak equality check."""
    num_lookup_decode_passes: int
    """transformers' forward passes for (c), less its one prefill pass."""
    seconds: dict[str, float]
    mismatches: dict[str, str]

    @property
    def tokens_per_pass(self) -> float:
        return (self.num_new_tokens - 1) / max(self.num_decode_passes, 1)


def aligned_share(reference: list[int], output: list[int]) -> float:
    """Share of output tokens in the longest matching blocks between reference and output."""
    matcher = difflib.SequenceMatcher(None, reference, output, autojunk=False)
    return sum(block.size for block in matcher.get_matching_blocks()) / max(len(output), 1)


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def describe_mismatch(engine: Engine, prompt: list[int], greedy: list[int], other: list[int]) -> str:
    """Where other first differs from greedy, and our logit margin between the two choices there."""
    if len(other) != len(greedy):
        return f"length {len(other)} != {len(greedy)}"
    i = next(i for i, (g, o) in enumerate(zip(greedy, other, strict=True)) if g != o)
    logits = engine.logits(prompt + greedy[:i])[-1]
    margin = (logits[greedy[i]] - logits[other[i]]).item()
    verdict = "floating-point near-tie" if abs(margin) < NEAR_TIE else "NOT a near-tie: a BUG"
    return f"first differs at token {i}/{len(greedy)} ({greedy[i]} vs {other[i]}), logit margin {margin:.2e}: {verdict}"


def draft_sources(case: EditCase, engine: Engine, layout: PromptLayout) -> tuple[list[int], list[int]]:
    """(b)'s draft (the draft text's tokens) and what its cursor looks up in: the edit prompt of the draft's
    text (the case's own prompt, unless the draft is unrelated). Tokenized once, outside the timing."""
    return engine.tokenizer.encode(case.draft), layout.edit(case.draft, case.snippet).token_ids


def warm_up(case: EditCase, engine: Engine, layout: PromptLayout, lookup: PromptLookup) -> None:
    """Each decoder once over a case's prompt (a full prefill, a few decode steps)."""
    prompt = layout.edit(case.original, case.snippet).token_ids
    engine.generate(prompt, 32, ignore_eos=True)
    draft, lookup_ids = draft_sources(case, engine, layout)
    generate_speculative(engine, prompt, DraftCursor.for_edit(draft, lookup_ids), 32, ignore_eos=True)
    lookup.generate(prompt, 32)


def run_case(
    case: EditCase,
    engine: Engine,
    layout: PromptLayout,
    lookup: PromptLookup,
    num_repeats: int,
) -> CaseResult:
    prompt = layout.edit(case.original, case.snippet)
    expected = engine.tokenizer.encode(case.updated)
    draft, lookup_ids = draft_sources(case, engine, layout)
    n = len(expected) + EXTRA_TOKENS
    runs: dict[str, Callable[[], object]] = {
        "a": lambda: engine.generate(prompt.token_ids, n, ignore_eos=True),
        "b": lambda: generate_speculative(
            engine, prompt.token_ids, DraftCursor.for_edit(draft, lookup_ids), n, ignore_eos=True
        ),
        "c": lambda: lookup.generate(prompt.token_ids, n),
    }
    # Interleaved (a b c a b c ...), so that the shared machine's slow spells hit all three alike.
    times: dict[str, list[float]] = {method: [] for method in runs}
    outputs: dict[str, object] = {}
    passes_before = lookup.num_forward_passes
    for _ in range(num_repeats):
        for method, fn in runs.items():
            seconds, outputs[method] = timed(fn)
            times[method].append(seconds)
    num_lookup_passes = (lookup.num_forward_passes - passes_before) // num_repeats
    greedy, (spec, stats), theirs = outputs["a"], outputs["b"], outputs["c"]  # type: ignore[misc]
    assert isinstance(greedy, list) and isinstance(theirs, list)
    mismatches = {
        method: describe_mismatch(engine, prompt.token_ids, greedy, output)
        for method, output in (("b", spec), ("c", theirs))
        if output != greedy
    }
    num_prefill_passes = -(-len(prompt.token_ids) // engine.engine_config.prefill_chunk_size)
    original_ids = prompt.draft_token_ids
    return CaseResult(
        case=case,
        num_prompt_tokens=len(prompt.token_ids),
        num_new_tokens=n,
        exact_match=greedy[: len(expected)] == expected,
        expected_copy_share=aligned_share(original_ids, expected),
        output_copy_share=aligned_share(original_ids, greedy),
        num_decode_passes=stats.forward_passes - num_prefill_passes,
        num_distinct_output_tokens=len(set(greedy)),
        num_lookup_decode_passes=num_lookup_passes - 1,
        seconds={method: statistics.median(ts) for method, ts in times.items()},
        mismatches=mismatches,
    )


# --- report ------------------------------------------------------------------------------------------


def row(label: str, results: list[CaseResult]) -> str:
    """One table row; several results are pooled (tokens and seconds summed), as one long request."""
    tokens = sum(r.num_new_tokens for r in results)
    secs = {m: sum(r.seconds[m] for r in results) for m in "abc"}
    tps = {m: tokens / secs[m] for m in "abc"}
    num_decoded = sum(r.num_new_tokens - 1 for r in results)
    per_pass = num_decoded / max(sum(r.num_decode_passes for r in results), 1)
    per_lookup_pass = num_decoded / max(sum(r.num_lookup_decode_passes for r in results), 1)
    exact = sum(r.exact_match for r in results)
    changed = sum(r.case.num_changed_lines for r in results) / sum(r.case.num_lines for r in results)
    lines = f"{sum(r.case.num_lines for r in results)} ({changed:.0%})"
    share_expected = sum(r.expected_copy_share * (r.num_new_tokens - EXTRA_TOKENS) for r in results) / max(
        tokens - EXTRA_TOKENS * len(results), 1
    )
    share_output = sum(r.output_copy_share * r.num_new_tokens for r in results) / tokens
    equal = (
        "yes"
        if not any(r.mismatches for r in results)
        else "**NO: " + ", ".join(sorted({m for r in results for m in r.mismatches})) + "**"
    )
    return (
        f"| {label} | {lines} | {sum(r.num_prompt_tokens for r in results):,} | {tokens:,} | "
        f"{exact}/{len(results)} | {share_expected:.0%} / {share_output:.0%} | {per_pass:.2f} | {per_lookup_pass:.2f} | "
        f"{tps['a']:,.0f} | {tps['b']:,.0f} | {tps['c']:,.0f} | "
        f"{tps['b'] / tps['a']:.2f}x | {tps['b'] / tps['c']:.2f}x | {equal} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", type=Path, default=None, help="checkpoint (default: kvmesh's default model)"
    )
    parser.add_argument("--cases", type=int, default=12, help="edit cases, besides the unrelated one")
    parser.add_argument("--quick", action="store_true", help="3 cases, 1 repeat: a smoke run")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1, for comparability)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measure (median)")
    parser.add_argument("--seed", type=int, default=0, help="picks the files and the edits")
    parser.add_argument("--device", default="cpu", help='torch device for all three decoders ("cuda")')
    args = parser.parse_args()
    num_cases = 3 if args.quick else args.cases
    num_repeats = 1 if args.quick else args.repeats
    torch.set_num_threads(args.threads)
    model_path = args.model or default_model_path()

    cases = build_cases(num_cases, args.seed)
    engine = Engine.from_pretrained(
        model_path, "float32", args.device, EngineConfig(enable_prefix_caching=False)
    )
    layout = PromptLayout(engine.tokenizer)
    lookup = PromptLookup(Path(model_path), args.device)

    print("warm-up ...", file=sys.stderr)
    warm_up(cases[0], engine, layout, lookup)

    results = []
    for i, case in enumerate(cases):
        start = time.perf_counter()
        result = run_case(case, engine, layout, lookup, num_repeats)
        results.append(result)
        print(
            f"[{i + 1}/{len(cases)}] {case.name}: {result.num_new_tokens} tokens, "
            f"{result.tokens_per_pass:.2f} tokens/pass, {time.perf_counter() - start:.0f}s",
            file=sys.stderr,
        )
        for method, text in result.mismatches.items():
            print(f"!!! MISMATCH ({method}) vs plain greedy in {case.name}: {text}", file=sys.stderr)

    print("\n".join(report(args, num_cases, num_repeats, model_path, engine, results)))
    if any(r.mismatches for r in results):
        sys.exit(1)


def report(
    args: argparse.Namespace,
    num_cases: int,
    num_repeats: int,
    model_path: Path,
    engine: Engine,
    results: list[CaseResult],
) -> list[str]:
    """The markdown section for bench/RESULTS.md: settings, the table, goals, mismatches, caveats."""
    import transformers

    command = f"python bench/edits.py{' --quick' if args.quick else f' --cases {num_cases}'}"
    command += f" --threads {args.threads} --repeats {num_repeats} --seed {args.seed}"
    command += f" --model {args.model}" if args.model else ""
    command += f" --device {args.device}" if args.device != "cpu" else ""
    machine = f"{cpu_model_name()}, {os.cpu_count()} cores"
    if args.device != "cpu":
        machine = f"{torch.cuda.get_device_name(args.device)} (host: {machine})"
    mc = engine.config
    shipped_default = Path(model_path).resolve() == default_model_path().resolve()
    edits = [r for r in results if not r.case.unrelated]
    out = [
        f"## Speculative edits ({'CPU' if args.device == 'cpu' else 'GPU'}, float32)",
        "",
        f"- Machine: {machine}; torch {torch.__version__} "
        f"({args.threads} threads), transformers {transformers.__version__}, Python {platform.python_version()}",
        f"- Command: `{command}`",
        f"- Model: {model_path}{' (the shipped default model)' if shipped_default else ''}: "
        f"{mc.num_hidden_layers} layers, hidden {mc.hidden_size}, vocab {mc.vocab_size}; prefix caching off, "
        f"prefill chunk {engine.engine_config.prefill_chunk_size}.",
        f"- (a) `Engine.generate`, (b) `generate_speculative` (draft: the original; prompt lookup where the "
        "output leaves it), (c) transformers "
        f"`generate(prompt_lookup_num_tokens={PROMPT_LOOKUP_NUM_TOKENS})`; greedy, eos ignored, n = expected "
        f"output tokens + {EXTRA_TOKENS}. tok/s: end to end, prefill included; median of {num_repeats} "
        "after a warm-up run; the repeats interleave (a b c a b c).",
        "- tokens/pass: (n - 1) / decode passes. (b): SpecStats.forward_passes minus the prefill passes "
        "(ceil(prompt / chunk), which also give the first token); (c): the model's forward calls minus its one "
        "prefill. 1.00 = plain decoding. (c) drafts from the prompt and the text generated so far; (b) from "
        "the original, and from the prompt (its snippet) and the text so far only where the output leaves "
        "the original and no near match in it is found.",
        "- exact: greedy output starts with the updated file's tokens. copy share: tokens aligned with the "
        "original's tokens (difflib), expected output / greedy output.",
        "",
        "| case | lines (changed) | prompt tokens | output tokens | exact | copy share (expected / output) "
        "| tokens/pass (b) | tokens/pass (c) | (a) tok/s | (b) tok/s | (c) tok/s | (b)/(a) | (b)/(c) | outputs equal (a) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    out += [row(r.case.name, [r]) for r in results]
    out.append(row(f"**overall, {len(edits)} edits**", edits))
    out += [
        "",
        "Goals (issue 6, trained default model): tokens/pass >= 8, (b)/(a) >= 5x, (b)/(c) >= 2x overall; "
        "(b)/(a) >= 0.95x with the unrelated draft (whose (b) looks up in the unrelated file's prompt, but (c) in the real one).",
    ]
    mismatches = [(r.case.name, m, text) for r in results for m, text in r.mismatches.items()]
    if mismatches:
        out += ["", f"**MISMATCHES ({len(mismatches)}): outputs differ from plain greedy decoding**", ""]
        out += [f"- ({m}) {name}: {text}" for name, m, text in mismatches]
    else:
        out += ["", "Every output of (b) and (c) equals (a), token for token."]
    degenerate = [r for r in results if r.num_distinct_output_tokens < DEGENERATE_DISTINCT_TOKENS]
    if degenerate:
        distinct = sorted({r.num_distinct_output_tokens for r in degenerate})
        out += [
            "",
            f"NOTE: {len(degenerate)} of {len(results)} greedy outputs are degenerate ({distinct} distinct "
            "tokens: a token repeated): the equality check above is weak for them, and prompt lookup (c), "
            "which drafts from the text generated so far, accepts nearly all of its draft on them.",
        ]
    return out


if __name__ == "__main__":
    main()
