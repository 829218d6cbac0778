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


class Detokenizer:
    """Turns a growing list of token ids into text deltas, safe to show as they come.

    Held back until the next token: a tail that ends inside a multi-byte character (it decodes to
    U+FFFD), and a tail that could be the start of a stop string. Once a stop string appears, the
    text ends before it. Each call decodes only the tokens since the last complete character.
    """

    def __init__(self, tokenizer: Tokenizer, stop_strings: tuple[str, ...] = ()) -> None:
        self._tokenizer = tokenizer
        self._stop_strings = stop_strings
        self._token_ids: list[int] = []
        self._decoded_upto = 0
        """Tokens before this index are decoded into self.text."""
        self.text = ""
        """All complete text so far, stop strings included."""
        self._num_chars_sent = 0

    def add(self, token_ids: list[int]) -> str:
        """Append tokens; return the new text that is safe to send."""
        self._token_ids.extend(token_ids)
        tail = self._tokenizer.decode(self._token_ids[self._decoded_upto :])
        if not tail.endswith("\ufffd"):
            self.text += tail
            self._decoded_upto = len(self._token_ids)
        return self._take(final=False)

    def flush(self) -> str:
        """Everything still held back, at the end of the stream (an incomplete character included)."""
        self.text += self._tokenizer.decode(self._token_ids[self._decoded_upto :])
        self._decoded_upto = len(self._token_ids)
        return self._take(final=True)

    def _take(self, final: bool) -> str:
        visible = len(self.text)
        cut = min((i for i in (self.text.find(s) for s in self._stop_strings) if i >= 0), default=-1)
        if cut >= 0:
            visible = cut
        elif not final:
            visible -= _stop_prefix_len(self.text, self._stop_strings)
        delta = self.text[self._num_chars_sent : max(visible, self._num_chars_sent)]
        self._num_chars_sent += len(delta)
        return delta


def _stop_prefix_len(text: str, stop_strings: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is the beginning of a stop string."""
    longest = 0
    for stop in stop_strings:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest
