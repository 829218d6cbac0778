"""The default model's data: the standard-library corpus, split by file, and the training examples cut
from it (apply-edit, copies, fill-in-the-middle, random-token and repetitive copies), laid out exactly as
the gateway lays out requests. Used by scripts/train_default_model.py and scripts/eval_default_model.py."""

from __future__ import annotations

import ast
import hashlib
import os
import random
import textwrap
from dataclasses import dataclass
from pathlib import Path

from gateway.layout import PromptLayout
from kvmesh.engine.special_tokens import EDIT_ORIGINAL, EDIT_OUTPUT, EDIT_SNIPPET, END_OF_TEXT, SPECIAL_TOKENS
from kvmesh.engine.tokenizer import Tokenizer
from training.checkpoint import stdlib_corpus_files
from training.edit_data import MARKER, EditStyle, make_edit, plain_source

HELD_OUT_MODULUS = 10


# --- corpus ------------------------------------------------------------------------------------------


def is_held_out(relative_path: str) -> bool:
    """Whole files are held out for evaluation: those whose path hashes to 0 mod HELD_OUT_MODULUS."""
    digest = hashlib.sha256(relative_path.encode()).digest()
    return int.from_bytes(digest[:8], "big") % HELD_OUT_MODULUS == 0


def corpus_files(held_out: bool, stdlib: Path | None = None) -> list[Path]:
    """The standard library's Python files (tests left out) on one side of the split, sorted: the running
    interpreter's, or those of the copy of one at `stdlib`."""
    files = stdlib_corpus_files(limit=1_000_000, stdlib=stdlib)
    root = Path(os.path.commonpath([str(f) for f in files]))
    return [f for f in files if is_held_out(f.relative_to(root).as_posix()) == held_out]


@dataclass
class SourceFile:
    lines: list[str]
    blocks: list[list[tuple[int, int]]]
    """Per statement block (module, class bodies): each statement's (first line index, end line)."""


class Corpus:
    """Source files as statement spans, to cut windows from, plus material for edits' new text."""

    def __init__(self, files: list[Path]) -> None:
        self.files: list[SourceFile] = []
        self.starts: list[tuple[int, int, int]] = []
        names: set[str] = set()
        statements: list[str] = []
        for path in files:
            try:
                text = path.read_text(encoding="utf-8")
                tree = ast.parse(text)
            except (UnicodeDecodeError, SyntaxError, ValueError):
                continue
            if not plain_source(text):
                continue
            lines = text.splitlines()
            blocks = [tree.body] + [n.body for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]
            spans = [
                [
                    (
                        min([s.lineno, *(d.lineno for d in getattr(s, "decorator_list", []))]) - 1,
                        s.end_lineno or s.lineno,
                    )
                    for s in block
                ]
                for block in blocks
            ]
            index = len(self.files)
            self.files.append(SourceFile(lines, spans))
            self.starts += [(index, b, s) for b, block in enumerate(spans) for s in range(len(block))]
            for node in ast.walk(tree):
                if isinstance(node, ast.Name) and len(node.id) > 1:
                    names.add(node.id)
                elif (
                    isinstance(node, ast.Expr | ast.Assign | ast.AugAssign | ast.Return)
                    and node.lineno == node.end_lineno
                ):
                    line = lines[node.lineno - 1]
                    # Only statements alone on their line (ASCII, so ast's byte columns are characters).
                    if (
                        line.isascii()
                        and len(line) <= 80
                        and line[node.col_offset : node.end_col_offset] == line.strip()
                    ):
                        statements.append(line.strip())
        self.style = EditStyle(names=sorted(names), statements=sorted(set(statements)))

    def window(self, rng: random.Random, min_lines: int, max_lines: int) -> tuple[str, ast.Module]:
        """A random window of min_lines-max_lines lines (whole statements of one block, dedented)."""
        while True:
            file_index, block_index, start = rng.choice(self.starts)
            source = self.files[file_index]
            block = source.blocks[block_index]
            target = rng.randint(min_lines, max_lines)
            first, end = block[start][0], None
            for _, stmt_end in block[start:]:
                if stmt_end - first > target:
                    break
                end = stmt_end
            if end is None or end - first < min_lines:
                continue
            text = textwrap.dedent("\n".join(source.lines[first:end])) + "\n"
            try:
                return text, ast.parse(text)
            except SyntaxError:
                continue


# --- examples ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    token_ids: list[int]
    answer_start: int
    """Index of the first answer token: the loss is on token_ids[answer_start:]."""


class ExampleMaker:
    def __init__(self, corpus: Corpus, tokenizer: Tokenizer) -> None:
        self.corpus = corpus
        self.tokenizer = tokenizer
        self.layout = PromptLayout(tokenizer)
        self.eos = tokenizer.token_to_id(END_OF_TEXT)

    def _answer(self, prompt: list[int], answer: str) -> Example:
        return Example([*prompt, *self.tokenizer.encode(answer), self.eos], len(prompt))

    def edit(
        self, rng: random.Random, min_lines: int, max_lines: int, style: EditStyle | None = None
    ) -> Example:
        while True:
            text, tree = self.corpus.window(rng, min_lines, max_lines)
            num_lines = len(text.splitlines())
            low = rng.randint(1, max(1, num_lines // 10))
            kinds = rng.sample(["rename", "literal", "insert", "delete", "new_body"], 5)
            edit = make_edit(
                text,
                tree,
                rng,
                kinds=kinds,
                budget=(low, max(low, num_lines // 6)),
                style=style or self.corpus.style,
            )
            if edit is not None:
                return self._answer(self.layout.edit(edit.original, edit.snippet).token_ids, edit.updated)

    def copy(self, rng: random.Random, min_lines: int, max_lines: int) -> Example:
        text, _ = self.corpus.window(rng, min_lines, max_lines)
        return self._answer(self.layout.edit(text, MARKER + "\n").token_ids, text)

    def copy_random_tokens(self, rng: random.Random, min_tokens: int, max_tokens: int) -> Example:
        """Copy uniformly random tokens: nothing to guess from code statistics, so the model must learn to
        look the next token up in the original (induction), which it then reuses on code."""
        ids = [
            rng.randrange(len(SPECIAL_TOKENS), self.tokenizer.vocab_size)
            for _ in range(rng.randint(min_tokens, max_tokens))
        ]
        return self._edit_ids(ids, self.tokenizer.encode(MARKER + "\n"), ids)

    def _edit_ids(self, original: list[int], snippet: list[int], updated: list[int]) -> Example:
        ids = [self.tokenizer.token_to_id(t) for t in (EDIT_ORIGINAL, EDIT_SNIPPET, EDIT_OUTPUT)]
        prompt = [ids[0], *original, ids[1], *snippet, ids[2]]
        return Example([*prompt, *updated, self.eos], len(prompt))

    def repetitive(self, rng: random.Random, min_lines: int, max_lines: int) -> Example:
        """Copy, or apply a one-line edit to, "lines" of random tokens built from a few phrases, many
        lines repeated whole or nearly: the last few tokens say little about where the output stands in
        the original, so only a longer context (or the snippet's context lines) finds the place. Real
        code repeats this way (doctests, similar calls), and that is where a model that matches only a
        token or two loses its place and loops."""
        words = [
            rng.randrange(len(SPECIAL_TOKENS), self.tokenizer.vocab_size) for _ in range(rng.randint(4, 12))
        ]
        phrases = [[rng.choice(words) for _ in range(rng.randint(1, 3))] for _ in range(rng.randint(3, 8))]
        newline = self.tokenizer.encode("\n")

        def new_line() -> list[int]:
            return [t for _ in range(rng.randint(2, 5)) for t in rng.choice(phrases)]

        lines: list[list[int]] = []
        for _ in range(rng.randint(min_lines, max_lines)):
            roll = rng.random()
            if lines and roll < 0.35:
                lines.append(list(rng.choice(lines)))
            elif lines and roll < 0.7:
                line = list(rng.choice(lines))
                line[rng.randrange(len(line))] = rng.choice(words)
                lines.append(line)
            else:
                lines.append(new_line())
        original = [t for line in lines for t in (*line, *newline)]
        marker = self.tokenizer.encode(MARKER + "\n")
        if rng.random() < 0.5:
            return self._edit_ids(original, marker, original)
        changed = rng.randrange(len(lines))
        updated_lines = [*lines[:changed], new_line(), *lines[changed + 1 :]]
        shown = updated_lines[max(0, changed - 2) : changed + 3]
        snippet = [
            *(marker if changed > 2 else []),
            *(t for line in shown for t in (*line, *newline)),
            *(marker if changed + 3 < len(lines) else []),
        ]
        updated = [t for line in updated_lines for t in (*line, *newline)]
        return self._edit_ids(original, snippet, updated)

    def copy_chunk(self, rng: random.Random, min_tokens: int, max_tokens: int) -> Example:
        """Copy a run of tokens cut anywhere from a file: the pure copying task, learned first."""
        while True:
            text, _ = self.corpus.window(rng, 8, 40)
            ids = self.tokenizer.encode(text)
            size = rng.randint(min_tokens, max_tokens)
            if len(ids) < size:
                continue
            start = rng.randrange(len(ids) - size + 1)
            chunk = self.tokenizer.decode(ids[start : start + size])
            return self._answer(self.layout.edit(chunk, MARKER + "\n").token_ids, chunk)

    def fill_in_the_middle(self, rng: random.Random, min_lines: int, max_lines: int) -> Example:
        text, _ = self.corpus.window(rng, min_lines, max_lines)
        lines = text.splitlines(keepends=True)
        first = rng.randrange(len(lines))
        if rng.random() < 0.5:
            # The cursor inside a line: the middle is the rest of it.
            column = rng.randrange(len(lines[first]))
            middle_start = sum(len(line) for line in lines[:first]) + column
            middle_end = sum(len(line) for line in lines[: first + 1])
        else:
            middle_start = sum(len(line) for line in lines[:first])
            middle_end = sum(len(line) for line in lines[: first + rng.randint(1, 3)])
        prompt = self.layout.completion(text[:middle_start], text[middle_end:])
        return self._answer(prompt, text[middle_start:middle_end])
