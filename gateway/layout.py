"""Prompt layout, cache-first: what changes least goes first, so the KV of a prompt's head is reused.

Completion (suffix-prefix-middle, SPM):   [context] <|fim_suffix|> suffix <|fim_prefix|> prefix <|fim_middle|>
Edit:                                     <|edit_original|> original <|edit_snippet|> snippet <|edit_output|>

A keystroke at the cursor changes the end of `prefix`, which is the end of the prompt, so only the last
block's KV is recomputed. Each text segment is encoded on its own and the special tokens' ids are put
between them: a marker is never merged into a neighbouring token, and a segment's ids do not depend on
what comes before it.
"""

from __future__ import annotations

from typing import NamedTuple

from kvmesh.checkpoint import EDIT_ORIGINAL, EDIT_OUTPUT, EDIT_SNIPPET, FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX
from kvmesh.tokenizer import Tokenizer


class EditPrompt(NamedTuple):
    token_ids: list[int]
    """The laid-out prompt."""
    draft_token_ids: list[int]
    """The original code's ids, the draft for speculative edits (the same ids as inside the prompt)."""


class PromptLayout:
    """Lays out and tokenizes completion and edit prompts for one tokenizer.

    A special token the tokenizer lacks (a checkpoint not trained for FIM or edits) falls back to its
    marker text, e.g. "<|fim_suffix|>", encoded as plain text: the layout keeps its shape and the model
    sees the same marker every time, though it was never trained on it. `uses_special_tokens` says
    whether every marker is a single special token.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._markers: dict[str, list[int]] = {}
        self.uses_special_tokens = True
        for marker in (FIM_SUFFIX, FIM_PREFIX, FIM_MIDDLE, EDIT_ORIGINAL, EDIT_SNIPPET, EDIT_OUTPUT):
            token_id = tokenizer.token_to_id(marker)
            if token_id is None:
                self._markers[marker] = tokenizer.encode(marker)
                self.uses_special_tokens = False
            else:
                self._markers[marker] = [token_id]

    def completion(self, prefix: str, suffix: str, context: str = "") -> list[int]:
        """Token ids of a fill-in-the-middle prompt in SPM order; the model generates the middle."""
        return [
            *self._encode(context),
            *self._markers[FIM_SUFFIX],
            *self._encode(suffix),
            *self._markers[FIM_PREFIX],
            *self._encode(prefix),
            *self._markers[FIM_MIDDLE],
        ]

    def edit(self, original: str, snippet: str) -> EditPrompt:
        """Token ids of an edit prompt; the model generates the rewritten code."""
        original_ids = self._encode(original)
        token_ids = [
            *self._markers[EDIT_ORIGINAL],
            *original_ids,
            *self._markers[EDIT_SNIPPET],
            *self._encode(snippet),
            *self._markers[EDIT_OUTPUT],
        ]
        return EditPrompt(token_ids=token_ids, draft_token_ids=original_ids)

    def _encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text) if text else []


def split_document(text: str, line: int, column: int) -> tuple[str, str]:
    """Splits text at a cursor into (prefix, suffix).

    line is 0-based over "\\n"-separated lines; column is 0-based in Unicode code points (Python str
    indices), and may equal the line's length (cursor at the end of the line). A "\\r" before "\\n" is
    not part of the line. Raises ValueError naming document.line or document.column and the limit when
    the cursor is outside the document.
    """
    num_lines = text.count("\n") + 1
    if not 0 <= line < num_lines:
        raise ValueError(
            f"document.line {line} is outside the document: it has {num_lines} line(s), "
            f"so document.line must be at most {num_lines - 1} (0-based)"
        )
    start = 0
    for _ in range(line):
        start = text.index("\n", start) + 1
    end = text.find("\n", start)
    if end < 0:
        end = len(text)
    elif end > start and text[end - 1] == "\r":
        end -= 1
    line_length = end - start
    if not 0 <= column <= line_length:
        raise ValueError(
            f"document.column {column} is outside line {line}: it has {line_length} character(s), "
            f"so document.column must be at most {line_length} (0-based, in Unicode code points)"
        )
    cursor = start + column
    return text[:cursor], text[cursor:]
