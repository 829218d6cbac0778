"""Prompt layout, cache-first: what changes least goes first, so the KV of a prompt's head is reused.

Completion (suffix-prefix-middle, SPM):   [context] <|fim_suffix|> suffix <|fim_prefix|> prefix <|fim_middle|>
Edit:                                     <|edit_original|> original <|edit_snippet|> snippet <|edit_output|>

A keystroke at the cursor changes the end of `prefix`, which is the end of the prompt, so only the last
block's KV is recomputed. Each text segment is encoded on its own and the special tokens' ids are put
between them: a marker is never merged into a neighbouring token, and a segment's ids do not depend on
what comes before it.

A document longer than the model's context is cut to a window around the cursor (plan_window): the
prefix loses tokens from its start, the suffix from its end. The gateway keeps no state between
requests, so the window's edges are a function of the request alone, quantized: each edge sits on a
grid of `step` tokens (whole blocks) counted from the document's start (prefix side) or from the cursor
(suffix side), and moves only when the text no longer fits. Typing at the cursor leaves both edges in
place for about `step` tokens, so every keystroke in between finds the previous one's KV.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from kvmesh.engine.special_tokens import (
    EDIT_ORIGINAL,
    EDIT_OUTPUT,
    EDIT_SNIPPET,
    FIM_MIDDLE,
    FIM_PREFIX,
    FIM_SUFFIX,
)
from kvmesh.engine.tokenizer import Tokenizer


class EditPrompt(NamedTuple):
    token_ids: list[int]
    """The laid-out prompt."""
    draft_token_ids: list[int]
    """The original code's ids, the draft for speculative edits (the same ids as inside the prompt)."""


class CompletionPrompt(NamedTuple):
    token_ids: list[int]
    """The laid-out prompt."""
    num_prefix_tokens_dropped: int
    """Tokens cut from the start of the prefix to fit the window (0: the whole prefix is there)."""
    num_suffix_tokens_dropped: int
    """Tokens cut from the end of the suffix to fit the window."""


class PromptTooLong(ValueError):
    """The prompt cannot fit the context, even cut to a window."""

    def __init__(self, num_tokens: int, limit: int, min_window_tokens: int) -> None:
        super().__init__(f"prompt has {num_tokens} tokens, more than the limit of {limit}")
        self.num_tokens = num_tokens
        self.limit = limit
        self.min_window_tokens = min_window_tokens


@dataclass(frozen=True)
class Window:
    """Which part of a document's tokens a completion prompt keeps."""

    prefix_start: int
    """First kept token of the prefix (tokens before it are dropped)."""
    suffix_end: int
    """Tokens of the suffix kept (tokens from it on are dropped)."""


SUFFIX_SHARE = 0.25
"""Part of the window the suffix keeps when both sides are too long: the model needs more of the code
before the cursor than after it."""
STEP_DIVISOR = 8
"""An edge moves by 1/STEP_DIVISOR of the window (whole blocks): larger steps move less often but keep
less context."""


def plan_window(num_prefix_tokens: int, num_suffix_tokens: int, budget: int, block_size: int) -> Window:
    """The window of prefix and suffix tokens to keep in budget tokens; everything when it all fits.

    Stable while typing: the suffix edge depends on the prefix length only through
    ceil-to-`step` steps, and the prefix edge sits on multiples of `step` counted from the document's
    start, so appending to the prefix moves an edge once per `step` tokens at most. The kept prefix is
    always more than budget - suffix - step tokens: a move never leaves the cursor without context.
    """
    if num_prefix_tokens + num_suffix_tokens <= budget:
        return Window(0, num_suffix_tokens)
    step = max(block_size, budget // STEP_DIVISOR // block_size * block_size)
    suffix_quota = int(budget * SUFFIX_SHARE) // block_size * block_size
    # Room held for the prefix: its length rounded up to a step, plus a step of margin, so that the
    # suffix edge stays put while the prefix grows.
    prefix_room = (num_prefix_tokens // step + 1) * step
    suffix_end = min(num_suffix_tokens, max(suffix_quota, (budget - prefix_room) // block_size * block_size))
    prefix_budget = budget - suffix_end
    excess = num_prefix_tokens - prefix_budget
    prefix_start = -(-excess // step) * step if excess > 0 else 0
    return Window(prefix_start, suffix_end)


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

    def completion_window(
        self,
        prefix: str,
        suffix: str,
        context: str = "",
        *,
        max_prompt_tokens: int,
        block_size: int,
        min_window_tokens: int,
    ) -> CompletionPrompt:
        """A completion prompt of at most max_prompt_tokens, the document cut to a window when needed.

        The context and markers are kept whole; what is left (the window) must hold at least
        min_window_tokens of the document (or all of it), else PromptTooLong: a window that small means
        too much context or too large a max_tokens, not a document to cut.
        """
        return self.completion_window_ids(
            self._encode(context),
            self._encode(prefix),
            self._encode(suffix),
            max_prompt_tokens=max_prompt_tokens,
            block_size=block_size,
            min_window_tokens=min_window_tokens,
        )

    def completion_window_ids(
        self,
        context_ids: list[int],
        prefix_ids: list[int],
        suffix_ids: list[int],
        *,
        max_prompt_tokens: int,
        block_size: int,
        min_window_tokens: int,
    ) -> CompletionPrompt:
        """completion_window from the segments' ids (each encoded on its own), e.g. a session's."""
        markers = [self._markers[m] for m in (FIM_SUFFIX, FIM_PREFIX, FIM_MIDDLE)]
        budget = max_prompt_tokens - len(context_ids) - sum(len(m) for m in markers)
        num_document_tokens = len(prefix_ids) + len(suffix_ids)
        if num_document_tokens > budget and budget < min(min_window_tokens, num_document_tokens):
            num_tokens = len(context_ids) + sum(len(m) for m in markers) + num_document_tokens
            raise PromptTooLong(num_tokens, max_prompt_tokens, min_window_tokens)
        window = plan_window(len(prefix_ids), len(suffix_ids), budget, block_size)
        token_ids = [
            *context_ids,
            *markers[0],
            *suffix_ids[: window.suffix_end],
            *markers[1],
            *prefix_ids[window.prefix_start :],
            *markers[2],
        ]
        return CompletionPrompt(token_ids, window.prefix_start, len(suffix_ids) - window.suffix_end)

    def encode(self, text: str) -> list[int]:
        """A segment's ids as the layout encodes it (no special tokens; empty text: none)."""
        return self._encode(text)

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
