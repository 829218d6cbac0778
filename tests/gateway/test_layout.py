"""Prompt layout: exact SPM and edit ids, keystroke locality, plain-text fallback, document splitting, and
the window around the cursor for long documents (its edges stay put while typing)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from gateway.layout import STEP_DIVISOR, PromptLayout, PromptTooLong, Window, plan_window, split_document
from kvmesh.engine.special_tokens import (
    EDIT_ORIGINAL,
    EDIT_OUTPUT,
    EDIT_SNIPPET,
    FIM_MIDDLE,
    FIM_PREFIX,
    FIM_SUFFIX,
)
from kvmesh.engine.tokenizer import Tokenizer
from tests.factories import make_tokenizer


@pytest.fixture(scope="module")
def tokenizer(code_tokenizer_json: Path) -> Tokenizer:
    return Tokenizer.from_file(code_tokenizer_json)


def test_completion_is_context_suffix_prefix_middle(tokenizer: Tokenizer) -> None:
    layout = PromptLayout(tokenizer)
    ids = layout.completion(
        prefix="def add(a, b):\n    ", suffix="\nprint(add(1, 2))\n", context="import os\n"
    )
    fim_suffix, fim_prefix, fim_middle = (
        tokenizer.token_to_id(t) for t in (FIM_SUFFIX, FIM_PREFIX, FIM_MIDDLE)
    )
    assert layout.uses_special_tokens
    assert ids == [
        *tokenizer.encode("import os\n"),
        fim_suffix,
        *tokenizer.encode("\nprint(add(1, 2))\n"),
        fim_prefix,
        *tokenizer.encode("def add(a, b):\n    "),
        fim_middle,
    ]


def test_completion_without_context_or_suffix_keeps_the_markers(tokenizer: Tokenizer) -> None:
    ids = PromptLayout(tokenizer).completion(prefix="x = ", suffix="")
    assert ids == [
        tokenizer.token_to_id(FIM_SUFFIX),
        tokenizer.token_to_id(FIM_PREFIX),
        *tokenizer.encode("x = "),
        tokenizer.token_to_id(FIM_MIDDLE),
    ]


def test_edit_layout_and_draft(tokenizer: Tokenizer) -> None:
    original = "def f(x):\n    return x\n"
    snippet = "def f(x):\n    return x * 2\n"
    prompt = PromptLayout(tokenizer).edit(original, snippet)
    assert prompt.draft_token_ids == tokenizer.encode(original)
    assert prompt.token_ids == [
        tokenizer.token_to_id(EDIT_ORIGINAL),
        *tokenizer.encode(original),
        tokenizer.token_to_id(EDIT_SNIPPET),
        *tokenizer.encode(snippet),
        tokenizer.token_to_id(EDIT_OUTPUT),
    ]


def test_a_keystroke_at_the_cursor_changes_only_the_tail(tokenizer: Tokenizer) -> None:
    layout = PromptLayout(tokenizer)
    context = "import math\n\n\ndef area(r):\n    return math.pi * r * r\n" * 5
    suffix = "\n\nprint(total)\n" * 5
    prefix = "def total(values):\n    result = 0\n    for value in values:\n        result += val"
    before = layout.completion(prefix, suffix, context)
    after = layout.completion(prefix + "u", suffix, context)
    num_common = next(i for i, (a, b) in enumerate(zip(before, after, strict=False)) if a != b)
    head = len(tokenizer.encode(context)) + 1 + len(tokenizer.encode(suffix)) + 1
    assert num_common > head  # context, suffix and most of the prefix are untouched
    assert len(before) - num_common <= 3  # only the last word's tokens (and the middle marker) moved


def test_missing_special_tokens_fall_back_to_plain_text_markers() -> None:
    tokenizer = make_tokenizer()  # knows <|endoftext|> only
    layout = PromptLayout(tokenizer)
    assert not layout.uses_special_tokens
    ids = layout.completion(prefix="a", suffix="b")
    assert ids == [
        *tokenizer.encode(FIM_SUFFIX),
        *tokenizer.encode("b"),
        *tokenizer.encode(FIM_PREFIX),
        *tokenizer.encode("a"),
        *tokenizer.encode(FIM_MIDDLE),
    ]


@pytest.mark.parametrize(
    ("text", "line", "column", "expected"),
    [
        ("abc\ndef\n", 0, 0, ("", "abc\ndef\n")),
        ("abc\ndef\n", 1, 2, ("abc\nde", "f\n")),
        ("abc\ndef\n", 1, 3, ("abc\ndef", "\n")),  # end of the line
        ("abc\ndef\n", 2, 0, ("abc\ndef\n", "")),  # the empty last line
        ("", 0, 0, ("", "")),
        ("héllo wörld\n🐍 = 1\n", 0, 7, ("héllo w", "örld\n🐍 = 1\n")),  # code points, not bytes
        ("héllo wörld\n🐍 = 1\n", 1, 1, ("héllo wörld\n🐍", " = 1\n")),  # one astral character
        ("ab\r\ncd\r\n", 0, 2, ("ab", "\r\ncd\r\n")),  # "\r" is not part of the line
    ],
)
def test_split_document(text: str, line: int, column: int, expected: tuple[str, str]) -> None:
    assert split_document(text, line, column) == expected


def test_split_document_line_outside() -> None:
    with pytest.raises(ValueError, match=r"document\.line 3 .*3 line.*at most 2"):
        split_document("a\nb\nc", 3, 0)


def test_split_document_column_outside() -> None:
    with pytest.raises(ValueError, match=r"document\.column 4 .*line 1.*at most 3"):
        split_document("a\n🐍🐍🐍\nc", 1, 4)
    with pytest.raises(ValueError, match=r"document\.column 3 .*at most 2"):
        split_document("ab\r\ncd", 0, 3)


# --- long documents: a window around the cursor ---------------------------------------------------------


def common_prefix_length(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("budget", [64, 200, 1000])
def test_window_fits_the_budget_and_moves_in_whole_steps(block_size: int, budget: int) -> None:
    step = max(block_size, budget // STEP_DIVISOR // block_size * block_size)
    for num_suffix in (0, 5, budget // 3, budget * 3):
        previous: Window | None = None
        num_moves = 0
        for num_prefix in range(0, budget * 3):  # typing at the cursor: the prefix grows a token at a time
            window = plan_window(num_prefix, num_suffix, budget, block_size)
            kept = num_prefix - window.prefix_start + window.suffix_end
            if num_prefix + num_suffix <= budget:
                assert window == Window(0, num_suffix)
            else:
                assert kept <= budget
                # The whole prefix, or all but less than a step of its share: a cut never starves it.
                kept_prefix = num_prefix - window.prefix_start
                assert kept_prefix == num_prefix or kept_prefix > budget - window.suffix_end - step
            assert window.prefix_start % step == 0 and 0 <= window.suffix_end <= num_suffix
            if previous is not None and window != previous:
                num_moves += 1
                assert window.prefix_start >= previous.prefix_start  # edges only move forward
                was_cut = previous.prefix_start > 0 or previous.suffix_end < num_suffix
                if was_cut and window.suffix_end != previous.suffix_end:
                    assert (previous.suffix_end - window.suffix_end) % block_size == 0
            previous = window
        # One move per step of typing at most (plus the first cut once the document stops fitting).
        assert num_moves <= budget * 3 // step + 1


def test_window_keeps_a_quarter_for_the_suffix_when_both_sides_are_long() -> None:
    window = plan_window(num_prefix_tokens=5000, num_suffix_tokens=5000, budget=1000, block_size=16)
    assert window.suffix_end == 240  # 1000 / 4, down to whole blocks
    assert window.prefix_start % 112 == 0  # step: 1000 / 8 down to whole blocks
    assert 1000 - 240 - 112 < 5000 - window.prefix_start <= 1000 - 240
    # A short prefix leaves the rest to the suffix.
    short = plan_window(num_prefix_tokens=100, num_suffix_tokens=5000, budget=1000, block_size=16)
    # The prefix holds 112 tokens of room (100 rounded up to a step): 888, down to whole blocks.
    assert short.prefix_start == 0 and short.suffix_end == 880


@pytest.fixture(scope="module")
def long_source() -> str:
    return Path(argparse.__file__).read_text(encoding="utf-8")[:30_000]  # ~10k tokens of real code


def test_a_document_that_fits_is_not_cut(tokenizer: Tokenizer) -> None:
    layout = PromptLayout(tokenizer)
    prompt = layout.completion_window(
        "def f(x):\n    ", "\n", "import os\n", max_prompt_tokens=100, block_size=16, min_window_tokens=50
    )
    assert prompt.token_ids == layout.completion("def f(x):\n    ", "\n", "import os\n")
    assert prompt.num_prefix_tokens_dropped == prompt.num_suffix_tokens_dropped == 0


def test_keystrokes_in_a_long_file_keep_the_leading_blocks(tokenizer: Tokenizer, long_source: str) -> None:
    layout = PromptLayout(tokenizer)
    block_size, limit = 16, 1024
    cursor = len(long_source) // 2
    typed = "        result = self._parse_known_args(arg_strings, namespace)\n" * 2
    prompts = []
    for i in range(len(typed) + 1):
        prefix, suffix = long_source[:cursor] + typed[:i], long_source[cursor:]
        prompt = layout.completion_window(
            prefix, suffix, max_prompt_tokens=limit, block_size=block_size, min_window_tokens=256
        )
        assert len(prompt.token_ids) <= limit
        assert prompt.num_prefix_tokens_dropped > 0 and prompt.num_suffix_tokens_dropped > 0
        prompts.append(prompt.token_ids)
    num_misses = 0
    for before, after in zip(prompts, prompts[1:], strict=False):
        # Every full block before the cursor's block is the same as a keystroke earlier.
        if common_prefix_length(before, after) // block_size < len(before) // block_size - 1:
            num_misses += 1
    # The window moves once per step of typing (1024 / 8 = 128 tokens) at most: the ~130 characters
    # typed here are fewer tokens than 2 steps.
    assert num_misses <= 2, num_misses
    assert sum(len(p) for p in prompts) > 0


def test_a_window_too_small_is_refused(tokenizer: Tokenizer, long_source: str) -> None:
    layout = PromptLayout(tokenizer)
    with pytest.raises(PromptTooLong) as raised:
        layout.completion_window(
            long_source[:5000], "", max_prompt_tokens=100, block_size=16, min_window_tokens=256
        )
    assert raised.value.limit == 100 and raised.value.num_tokens > 100
    # Context is never cut: too much of it leaves no room for a window.
    with pytest.raises(PromptTooLong):
        layout.completion_window(
            "x = 1\n", "", long_source[:5000], max_prompt_tokens=1000, block_size=16, min_window_tokens=256
        )
