"""Prompt layout: exact SPM and edit ids, keystroke locality, plain-text fallback, document splitting."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.layout import PromptLayout, split_document
from kvmesh.checkpoint import EDIT_ORIGINAL, EDIT_OUTPUT, EDIT_SNIPPET, FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX
from kvmesh.tokenizer import Tokenizer
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
