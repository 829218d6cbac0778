"""The checkpoint's tokenizer.json through the `tokenizers` library, plus incremental detokenizing."""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from kvmesh.loader import CheckpointError


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


class Detokenizer:
    """Turns a growing list of token ids into text deltas.

    A token can end inside a multi-byte character; such a tail decodes to U+FFFD and is held back
    until the next token completes it, so a client never sees a broken character.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._token_ids: list[int] = []
        self._num_chars_sent = 0

    @property
    def text(self) -> str:
        return self._tokenizer.decode(self._token_ids)

    def add(self, token_ids: list[int]) -> str:
        """Append tokens; return the new, complete text since the last call."""
        self._token_ids.extend(token_ids)
        text = self._tokenizer.decode(self._token_ids)
        if text.endswith("\ufffd"):
            return ""
        delta = text[self._num_chars_sent :]
        self._num_chars_sent = len(text)
        return delta

    def flush(self) -> str:
        """Whatever is held back, at the end of the stream."""
        text = self._tokenizer.decode(self._token_ids)
        delta = text[self._num_chars_sent :]
        self._num_chars_sent = len(text)
        return delta
