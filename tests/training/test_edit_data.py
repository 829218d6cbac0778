"""Synthetic edits: each changes what it says, stays valid Python, and its snippet holds exactly the change."""

from __future__ import annotations

import ast
import difflib
import random

import pytest

from training.edit_data import (
    CONTEXT_LINES,
    EDIT_KINDS,
    MARKER,
    EditStyle,
    code_windows,
    count_changed_lines,
    make_edit,
    make_snippet,
)

SOURCE = '''import os


class Store:
    """Keeps values by key."""

    def __init__(self, root):
        self.root = root
        self.values = {}

    def put(self, key, value):
        path = os.path.join(self.root, key)
        self.values[key] = value
        count = len(self.values)
        return path, count

    def get(self, key, default=None):
        found = self.values.get(key, default)
        return found


def describe(store):
    size = 10
    name = "store"
    total = size * 2
    print(name, total)
    return total
'''
STYLE = EditStyle(names=("alpha", "beta_value"), statements=("x = compute(1)", "log.debug('here')"))


def apply_snippet(original: str, snippet: str) -> str:
    """The reference merge of a one-region snippet: its first and last CONTEXT_LINES lines are found in
    the original (when a marker says lines are left out there) and the region replaces what lies between."""
    old, lines = original.splitlines(), snippet.splitlines()
    head_marker, tail_marker = lines[0].strip() == MARKER, lines[-1].strip() == MARKER
    region = lines[int(head_marker) : len(lines) - int(tail_marker)]
    head, tail = region[:CONTEXT_LINES], region[-CONTEXT_LINES:]
    start = next(i for i in range(len(old)) if old[i : i + len(head)] == head) if head_marker else 0
    end = len(old)
    if tail_marker:
        end = next(i for i in range(len(old), -1, -1) if old[i : i + len(tail)] == tail) + len(tail)
    return "\n".join(old[:start] + region + old[end:]) + "\n"


@pytest.mark.parametrize("style", [EditStyle(), STYLE], ids=["templates", "drawn"])
@pytest.mark.parametrize("kind", EDIT_KINDS)
@pytest.mark.parametrize("seed", range(4))
def test_each_kind_changes_lines_within_budget_and_stays_python(
    kind: str, style: EditStyle, seed: int
) -> None:
    edit = make_edit(SOURCE, ast.parse(SOURCE), random.Random(seed), kinds=[kind], budget=(1, 3), style=style)
    assert edit is not None, kind
    assert edit.kind == kind and edit.updated != SOURCE
    assert 1 <= edit.num_changed_lines == count_changed_lines(SOURCE, edit.updated) <= 3
    ast.parse(edit.updated)
    # The snippet is the changed region of the updated file with its context, markers for the rest:
    # merged back into the original, it gives the updated file.
    assert apply_snippet(SOURCE, edit.snippet) == edit.updated
    assert len(edit.snippet.splitlines()) < len(edit.updated.splitlines())


def test_snippet_has_markers_only_where_lines_are_left_out() -> None:
    updated = SOURCE.replace("    size = 10\n", "    size = 20\n")
    snippet = make_snippet(SOURCE, updated)
    lines = snippet.splitlines()
    assert lines[0].strip() == MARKER and lines[-1].strip() == MARKER
    assert "    size = 20" in lines
    first_line = make_snippet(
        "a = 1\nb = 2\nc = 3\nd = 4\ne = 5\nf = 6\n", "a = 9\nb = 2\nc = 3\nd = 4\ne = 5\nf = 6\n"
    )
    assert first_line.splitlines()[0] == "a = 9" and first_line.splitlines()[-1].strip() == MARKER


def test_edits_are_reproducible_from_the_seed() -> None:
    tree = ast.parse(SOURCE)
    first = make_edit(SOURCE, tree, random.Random(7), style=STYLE)
    again = make_edit(SOURCE, ast.parse(SOURCE), random.Random(7), style=STYLE)
    assert first == again


def test_windows_are_whole_dedented_statements_that_parse() -> None:
    windows = list(code_windows(SOURCE, ast.parse(SOURCE), min_lines=3, max_lines=8))
    assert windows
    for text, tree in windows:
        assert 3 <= len(text.splitlines()) <= 8
        assert ast.unparse(tree)  # parsed on its own
        assert not text.startswith(" ")
    # Methods come out of the class body, dedented, each a run of whole statements of the source.
    texts = [text for text, _ in windows]
    assert any(text.startswith("def put(self, key, value):") for text in texts)
    for text in texts:
        body = [line.strip() for line in text.splitlines() if line.strip()]
        source_lines = [line.strip() for line in SOURCE.splitlines() if line.strip()]
        matcher = difflib.SequenceMatcher(None, source_lines, body, autojunk=False)
        assert matcher.find_longest_match().size == len(body)
