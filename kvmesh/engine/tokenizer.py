"""The checkpoint's tokenizer.json through the `tokenizers` library, plus incremental detokenizing."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from kvmesh.engine.model_config import CheckpointError


class Tokenizer:
    """encode adds no special tokens (the gateway lays out prompts itself); decode keeps them out."""

    def __init__(self, inner: HFTokenizer) -> None:
        self._inner = inner

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (the checkpoint needs a tokenizer.json)")
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as exc:  # the Rust side raises plain Exception subclasses
            raise CheckpointError(f"{path}: cannot be read as a tokenizers tokenizer ({exc})") from exc

    @property
    def vocab_size(self) -> int:
        return self._inner.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self._inner.encode(text, add_special_tokens=False).ids

    def decode(self, token_ids: list[int]) -> str:
        return self._inner.decode(token_ids, skip_special_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._inner.token_to_id(token)


MAX_PENDING_TOKENS = 8
"""Tokens held back waiting for a multi-byte character to complete. A UTF-8 character is at most 4 bytes and
a token at least one, so with this many held the U+FFFD is real (invalid bytes): they are let through."""


class Detokenizer:
    """Turns a growing list of token ids into text deltas, safe to show as they come.

    Held back until the next token: a tail that ends inside a multi-byte character (it decodes to
    U+FFFD), and a tail that could be the start of a stop string. Once a stop string appears, the
    text ends before it.

    NOTE: each call costs O(new tokens + longest stop string), never O(output): it decodes only the
    tokens since the last complete character (at most MAX_PENDING_TOKENS of them besides the new ones),
    and searches for stop strings only in the text not sent yet, which holds at most the longest stop
    string's length of old text. A stop string can start nowhere else: a sent tail that could begin one
    would have been held back.
    """

    def __init__(self, tokenizer: Tokenizer, stop_strings: tuple[str, ...] = ()) -> None:
        self._tokenizer = tokenizer
        self._stop_strings = stop_strings
        self._pending_token_ids: list[int] = []
        """Tokens not yet decoded into text: they end inside a multi-byte character."""
        self._unsent = ""
        """Decoded text not sent yet (a possible start of a stop string)."""
        self._stopped = False
        """A stop string was found: nothing more is sent."""

    def add(self, token_ids: list[int]) -> str:
        """Append tokens; return the new text that is safe to send."""
        pending = self._pending_token_ids
        pending.extend(token_ids)
        tail = self._tokenizer.decode(pending)
        if tail.endswith("\ufffd"):
            # Keep back only the last few tokens, those of the incomplete character (a character is at
            # most 4 bytes, a token at least 1); past MAX_PENDING_TOKENS the bytes are simply invalid.
            for k in range(1, min(4, len(pending)) + 1):
                head = self._tokenizer.decode(pending[:-k])
                if not head.endswith("\ufffd"):
                    self._unsent += head
                    del pending[:-k]
                    return self._take(final=False)
            if len(pending) <= MAX_PENDING_TOKENS:
                return self._take(final=False)
        self._unsent += tail
        pending.clear()
        return self._take(final=False)

    def flush(self) -> str:
        """Everything still held back, at the end of the stream (an incomplete character included)."""
        self._unsent += self._tokenizer.decode(self._pending_token_ids)
        self._pending_token_ids.clear()
        return self._take(final=True)

    def _take(self, final: bool) -> str:
        if self._stopped:
            return ""
        text = self._unsent
        cut = min((i for i in (text.find(s) for s in self._stop_strings) if i >= 0), default=-1)
        held = len(text) - _stop_prefix_len(text, self._stop_strings)
        if cut >= 0 and not final and held < cut:
            # NOTE: a longer stop string that starts before the one found may still complete (stops "a"
            # and " a=", text " a"): the text is cut at the earliest one, so wait for the next tokens.
            visible = held
        elif cut >= 0:
            self._stopped = True
            visible = cut
        elif final:
            visible = len(text)
        else:
            visible = len(text) - _stop_prefix_len(text, self._stop_strings)
        self._unsent = text[visible:]
        return text[:visible]


def _stop_prefix_len(text: str, stop_strings: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is the beginning of a stop string (a proper one).

    Costs O(len(stop)) per stop string and candidate start: only positions where the stop string's first
    character occurs in the last len(stop) - 1 characters are tried.
    """
    longest = 0
    for stop in stop_strings:
        start = max(len(text) - len(stop) + 1, 0)
        first = stop[0] if stop else ""
        i = text.find(first, start) if first else -1
        while i >= 0 and len(text) - i > longest:
            if stop.startswith(text[i:]):
                longest = len(text) - i
                break
            i = text.find(first, i + 1)
    return longest
