"""Synthetic code edits on real source: the apply-edit cases the default model trains on, is evaluated on,
and the speculative-edit bench runs.

An edit takes a Python file's lines and syntax tree and returns the updated lines: a local name renamed
throughout its function, changed literals, inserted lines, deleted lines, or a new function body. Its
update snippet is fast-apply style (`make_snippet`): the changed region of the updated file with
CONTEXT_LINES lines around it and a "# ... existing code ..." marker line for each part left out.

An `EditStyle` says where new text comes from: fixed templates (the bench's cases, recognisable in
output), or material drawn from other code (training data, so the model learns to copy the snippet, not
to recite templates).

`code_windows` cuts a file into "files" of a given size: runs of consecutive statements of one block
(module or class body), dedented, so each parses on its own.
"""

from __future__ import annotations

import ast
import difflib
import random
import textwrap
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

CONTEXT_LINES = 2
MARKER = "# ... existing code ..."


@dataclass(frozen=True)
class EditStyle:
    """Where an edit's new text comes from; empty fields mean the fixed templates."""

    names: Sequence[str] = ()
    """Replacement identifiers for renames (else `name + "_renamed"`)."""
    statements: Sequence[str] = ()
    """One-line statements (no indentation) to insert and to build new bodies from."""


TEMPLATES = EditStyle()


def line_budget(num_lines: int) -> tuple[int, int]:
    """Fewest and most changed lines for an edit touching 1-10% of num_lines lines."""
    return max(1, -(-num_lines // 100)), max(1, num_lines // 10)


def count_changed_lines(original: str, updated: str) -> int:
    matcher = difflib.SequenceMatcher(None, original.splitlines(), updated.splitlines(), autojunk=False)
    return sum(max(i2 - i1, j2 - j1) for tag, i1, i2, j1, j2 in matcher.get_opcodes() if tag != "equal")


def functions(tree: ast.Module) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]


def body_statements(func: ast.FunctionDef | ast.AsyncFunctionDef) -> list[ast.stmt]:
    """The body without its docstring; empty for a one-line `def f(): ...`."""
    body = func.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return [s for s in body if s.lineno > func.lineno]


def indent_of(lines: list[str], stmt: ast.stmt) -> str | None:
    """The indentation of stmt's first line, or None when stmt shares its line with something before it."""
    line = lines[stmt.lineno - 1]
    prefix = line.encode()[: stmt.col_offset].decode(errors="replace")
    return prefix if prefix.strip() == "" else None


def replace_spans(lines: list[str], spans: list[tuple[int, int, int, str]]) -> list[str]:
    """Replace (line index, start byte, end byte, text) spans; ast columns are UTF-8 byte offsets."""
    out = list(lines)
    for index, start, end, text in sorted(spans, reverse=True):
        raw = out[index].encode()
        out[index] = (raw[:start] + text.encode() + raw[end:]).decode()
    return out


def _new_name(name: str, rng: random.Random, style: EditStyle) -> str:
    if not style.names:
        return f"{name}_renamed"
    for _ in range(8):
        candidate = rng.choice(style.names)
        if candidate != name:
            return candidate
    return f"{name}_{rng.randrange(10)}"


def edit_rename(
    lines: list[str], tree: ast.Module, rng: random.Random, low: int, high: int, style: EditStyle = TEMPLATES
) -> list[str] | None:
    """A local name (argument or assigned) renamed at every use inside its function."""
    funcs = functions(tree)
    rng.shuffle(funcs)
    for func in funcs:
        names = sorted(
            {a.arg for a in ast.walk(func.args) if isinstance(a, ast.arg)} - {"self", "cls"}
            | {n.id for n in ast.walk(func) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        )
        rng.shuffle(names)
        for name in names:
            new_name = _new_name(name, rng, style)
            spans = [
                (n.lineno - 1, n.col_offset, n.col_offset + len(name.encode()), new_name)
                for n in ast.walk(func)
                if (isinstance(n, ast.Name) and n.id == name) or (isinstance(n, ast.arg) and n.arg == name)
            ]
            if low <= len({span[0] for span in spans}) <= high:
                return replace_spans(lines, spans)
    return None


def _new_literal(value: object, segment: str, rng: random.Random, style: EditStyle) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool) and segment.isdigit():
        if not style.statements:
            return str(value * 2 if value > 1 else value + 2)
        return str(rng.choice([value + 1, value * 2, value * 10, rng.randrange(1000)]))
    if (
        isinstance(value, str)
        and len(segment) >= 3
        and segment[0] in "'\""
        and segment[-1] == segment[0]
        and segment[:3] != segment[0] * 3
        and "\\" not in segment
    ):
        if not style.statements:
            return segment[:-1] + " (updated)" + segment[-1]
        word = rng.choice(style.names) if style.names else "updated"
        return rng.choice([segment[:-1] + f" {word}" + segment[-1], segment[0] + word + segment[-1]])
    return None


def edit_literal(
    lines: list[str], tree: ast.Module, rng: random.Random, low: int, high: int, style: EditStyle = TEMPLATES
) -> list[str] | None:
    """Numbers and simple quoted strings changed, on `low` distinct lines."""
    by_line: dict[int, tuple[int, int, str]] = {}
    for node in ast.walk(tree):
        if (
            not isinstance(node, ast.Constant)
            or node.lineno != node.end_lineno
            or node.end_col_offset is None
        ):
            continue
        segment = (
            lines[node.lineno - 1].encode()[node.col_offset : node.end_col_offset].decode(errors="replace")
        )
        new = _new_literal(node.value, segment, rng, style)
        if new is not None and new != segment:
            by_line.setdefault(node.lineno - 1, (node.col_offset, node.end_col_offset, new))
    if len(by_line) < low:
        return None
    chosen = rng.sample(sorted(by_line), low)
    return replace_spans(lines, [(i, *by_line[i]) for i in chosen])


def _new_statements(
    count: int, indent: str, rng: random.Random, style: EditStyle, template: list[str]
) -> list[str]:
    if not style.statements:
        return [indent + line for line in template[:count]]
    return [indent + rng.choice(style.statements) for _ in range(count)]


def edit_insert(
    lines: list[str], tree: ast.Module, rng: random.Random, low: int, high: int, style: EditStyle = TEMPLATES
) -> list[str] | None:
    """New lines inserted into a function body: at its top with the templates (an argument check, one
    line or two when low > 1), anywhere in it with drawn statements."""
    funcs = functions(tree)
    rng.shuffle(funcs)
    for func in funcs:
        args = [a.arg for a in func.args.args + func.args.kwonlyargs if a.arg not in ("self", "cls")]
        body = body_statements(func)
        if not args or not body or (indent := indent_of(lines, body[0])) is None:
            continue
        arg = rng.choice(args)
        template = (
            [f"assert {arg} is not None, {arg!r}"]
            if low == 1
            else [f"if {arg} is None:", f'    raise ValueError("{func.name}: {arg} is required")']
        )
        at = body[0].lineno - 1
        if style.statements:
            stmt = rng.choice(body)
            if (stmt_indent := indent_of(lines, stmt)) is not None:
                at, indent = stmt.lineno - 1, stmt_indent
        new = _new_statements(low if style.statements else len(template), indent, rng, style, template)
        return lines[:at] + new + lines[at:]
    return None


def edit_delete(
    lines: list[str], tree: ast.Module, rng: random.Random, low: int, high: int, style: EditStyle = TEMPLATES
) -> list[str] | None:
    """`low` one-line statements deleted from function bodies that keep at least one statement."""
    deletable = []
    for func in functions(tree):
        body = body_statements(func)
        if len(body) > 1:
            deletable += [
                s.lineno - 1
                for s in body[:-1]
                if isinstance(s, ast.Expr | ast.Assign | ast.AugAssign) and s.lineno == s.end_lineno
            ]
    if len(deletable) < low:
        return None
    gone = set(rng.sample(sorted(deletable), low))
    return [line for i, line in enumerate(lines) if i not in gone]


def edit_new_body(
    lines: list[str], tree: ast.Module, rng: random.Random, low: int, high: int, style: EditStyle = TEMPLATES
) -> list[str] | None:
    """A short function's body (after its docstring) replaced by a new one."""
    funcs = functions(tree)
    rng.shuffle(funcs)
    for func in funcs:
        body = body_statements(func)
        if not body or (indent := indent_of(lines, body[0])) is None:
            continue
        start, end = body[0].lineno - 1, body[-1].end_lineno or body[-1].lineno
        template = [
            f'warnings.warn("{func.name} is deprecated", DeprecationWarning, stacklevel=2)',
            f'raise NotImplementedError("{func.name} was removed; use the new API")',
        ]
        count = 2 if end - start > 1 or low > 1 else 1
        if style.statements:
            count = rng.randint(1, max(1, min(high, 6)))
        new = _new_statements(count, indent, rng, style, template)
        if low <= max(end - start, len(new)) <= high:
            return lines[:start] + new + lines[end:]
    return None


EDITS: dict[str, Callable[..., list[str] | None]] = {
    "rename": edit_rename,
    "literal": edit_literal,
    "insert": edit_insert,
    "delete": edit_delete,
    "new_body": edit_new_body,
}
EDIT_KINDS = tuple(EDITS)


def make_snippet(original: str, updated: str) -> str:
    """The changed region of updated with CONTEXT_LINES around it, and markers for the rest."""
    old, new = original.splitlines(), updated.splitlines()
    opcodes = difflib.SequenceMatcher(None, old, new, autojunk=False).get_opcodes()
    changed = [(j1, j2) for tag, _, _, j1, j2 in opcodes if tag != "equal"]
    start = max(0, min(j1 for j1, _ in changed) - CONTEXT_LINES)
    end = min(len(new), max(j2 for _, j2 in changed) + CONTEXT_LINES)
    region = new[start:end]

    def marker(line: str) -> str:
        return line[: len(line) - len(line.lstrip())] + MARKER

    head = [marker(region[0])] if start > 0 else []
    tail = [marker(region[-1])] if end < len(new) else []
    return "\n".join(head + region + tail) + "\n"


@dataclass(frozen=True)
class Edit:
    original: str
    updated: str
    snippet: str
    kind: str
    num_changed_lines: int


def make_edit(
    text: str,
    tree: ast.Module,
    rng: random.Random,
    *,
    kinds: Sequence[str] = EDIT_KINDS,
    budget: tuple[int, int] | None = None,
    style: EditStyle = TEMPLATES,
) -> Edit | None:
    """One edit of `text`, trying `kinds` in order, changing a number of lines within `budget`
    (default: 1-10% of the file); None when no kind fits."""
    lines = text.splitlines()
    low, high = budget or line_budget(len(lines))
    for kind in kinds:
        new_lines = EDITS[kind](lines, tree, rng, low, high, style)
        if new_lines is None:
            continue
        updated = "\n".join(new_lines) + "\n"
        num_changed = count_changed_lines(text, updated)
        if low <= num_changed <= high:
            return Edit(text, updated, make_snippet(text, updated), kind, num_changed)
    return None


def plain_source(text: str) -> bool:
    """Text the edits and the tokenizer handle as is: no tabs or carriage returns, ends with a newline."""
    return "\r" not in text and "\t" not in text and text.endswith("\n")


def statement_blocks(tree: ast.Module) -> Iterator[list[ast.stmt]]:
    """The module body and every class body, recursively: the blocks windows are cut from."""
    yield tree.body
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            yield node.body


def _first_line(stmt: ast.stmt) -> int:
    decorators = getattr(stmt, "decorator_list", [])
    return min([stmt.lineno, *(d.lineno for d in decorators)])


def code_window(
    lines: list[str], block: list[ast.stmt], start: int, max_lines: int
) -> tuple[str, ast.Module] | None:
    """Statements block[start:] while they fit max_lines, dedented; None when that does not parse."""
    first = _first_line(block[start]) - 1
    end = None
    for stmt in block[start:]:
        stmt_end = stmt.end_lineno or stmt.lineno
        if stmt_end - first > max_lines:
            break
        end = stmt_end
    if end is None:
        return None
    text = textwrap.dedent("\n".join(lines[first:end])) + "\n"
    try:
        return text, ast.parse(text)
    except SyntaxError:
        return None


def code_windows(
    text: str, tree: ast.Module, min_lines: int, max_lines: int
) -> Iterator[tuple[str, ast.Module]]:
    """Non-overlapping windows of min_lines-max_lines lines, in file order, from every statement block."""
    lines = text.splitlines()
    for block in statement_blocks(tree):
        index = 0
        while index < len(block):
            window = code_window(lines, block, index, max_lines)
            if window is None:
                index += 1
                continue
            window_text, window_tree = window
            num_lines = len(window_text.splitlines())
            index += len(window_tree.body)
            if num_lines >= min_lines and plain_source(window_text):
                yield window_text, window_tree
