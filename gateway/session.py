"""An editor session's state at the gateway: the document (versions, LSP-style changes), its tokens and
block hashes kept incrementally (gateway.document), and the suggestions it has asked for.

A change is checked before anything moves: a stale or skipped version or a range outside the document
raises INVALID_ARGUMENT naming the field, and leaves the document as it was.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

from gateway.document import HashChain, TokenizedText, splits_at_safe_points
from gateway.prefix_lookup import BlockHashes
from kvmesh.engine.block_hash import namespace_hash
from kvmesh.engine.tokenizer import Tokenizer
from kvmesh.mesh.errors import invalid
from kvmesh.v1 import common_pb2, gateway_pb2


def offset_of(text: str, line: int, column: int, name: str) -> int:
    """The character offset of (line, column) in text; column may be the line's length (its end, before
    any "\\r\\n"). Raises INVALID_ARGUMENT naming the field (`name`line or `name`column) and the limit."""
    start = 0
    for number in range(line):
        newline = text.find("\n", start)
        if newline < 0:
            raise invalid(
                f"{name}line {line} is outside the document: it has {number + 1} line(s), so {name}line "
                f"must be at most {number} (0-based)"
            )
        start = newline + 1
    end = text.find("\n", start)
    if end < 0:
        end = len(text)
    elif end > start and text[end - 1] == "\r":
        end -= 1
    if column > end - start:
        raise invalid(
            f"{name}column {column} is outside line {line}: it has {end - start} character(s), so "
            f"{name}column must be at most {end - start} (0-based, in Unicode code points)"
        )
    return start + column


class SessionDocument:
    """The document at its current version, and the token ids of its prefix and suffix at the last cursor.

    NOTE: prefix and suffix are tokenized apart (the layout encodes each segment on its own), so each
    keeps its own TokenizedText: typing at the cursor changes the end of one and the start of the other.
    """

    def __init__(self, tokenizer: Tokenizer, text: str, context_ids: list[int], max_chars: int) -> None:
        self.text = text
        self.version = 1
        self.context_ids = context_ids
        self._max_chars = max_chars
        incremental = splits_at_safe_points(tokenizer)
        self.prefix = TokenizedText(tokenizer, incremental)
        self.suffix = TokenizedText(tokenizer, incremental)
        self._chains: dict[tuple[bytes, int], HashChain] = {}

    def apply(self, change: gateway_pb2.DocumentChange) -> None:
        """Applies one change; its version must be the current one plus 1."""
        self.check_next(change.version, "change.version")
        if not change.HasField("range"):
            raise invalid("change.range is missing: send the range the text replaces (empty: an insertion)")
        r = change.range
        start = offset_of(self.text, r.start_line, r.start_column, "change.range.start_")
        end = offset_of(self.text, r.end_line, r.end_column, "change.range.end_")
        if end < start:
            raise invalid(
                f"change.range ends (line {r.end_line}, column {r.end_column}) before it starts (line "
                f"{r.start_line}, column {r.start_column}): send start <= end"
            )
        self.insert(start, end, change.text, "change.text")

    def insert(self, start: int, end: int, text: str, name: str) -> None:
        """Replaces text[start:end] with text as the next version (limits checked first)."""
        num_chars = len(self.text) - (end - start) + len(text)
        if num_chars > self._max_chars:
            raise invalid(
                f"{name} makes the document {num_chars} characters, more than the limit of "
                f"{self._max_chars} (max_document_chars): open a smaller document"
            )
        self.text = self.text[:start] + text + self.text[end:]
        self.version += 1

    def check_current(self, version: int, name: str) -> None:
        if version != self.version:
            raise invalid(
                f"{name} is {version}, but the document is at version {self.version}: send the current "
                "version (changes first, then requests that refer to them)"
            )

    def check_next(self, version: int, name: str) -> None:
        if version != self.version + 1:
            raise invalid(
                f"{name} is {version}, but the document is at version {self.version}: a change must "
                f"carry the next version, {self.version + 1}"
            )

    def tokens_of(self, prefix: str, suffix: str) -> tuple[list[int], list[int]]:
        """(prefix ids, suffix ids) of a document split at a cursor (this one, or one predicted from it),
        updated incrementally from the last call's."""
        self.prefix.update(prefix)
        self.suffix.update(suffix)
        return self.prefix.token_ids, self.suffix.token_ids

    def block_hashes(self, prompt_ids: Sequence[int], cache_salt: str) -> BlockHashes:
        """The prompt's block hashes for PrefixLookup, from this session's chains (one per namespace)."""

        def hashes(fingerprint: str, block_size: int) -> Sequence[bytes]:
            namespace = namespace_hash(fingerprint, cache_salt)
            chain = self._chains.get((namespace, block_size))
            if chain is None:
                chain = self._chains[(namespace, block_size)] = HashChain(namespace, block_size)
            return chain.update(prompt_ids)

        return hashes


@dataclass
class Suggestion:
    """One completion the session asked for: what the model has written so far, shared by the request that
    started it and by later ones that reuse it (the user typed into it) or take it over (predict-ahead)."""

    prefix: str
    """The document before the cursor it was asked at."""
    suffix: str
    """The document after that cursor."""
    text: str = ""
    chunks: list[gateway_pb2.CompletionChunk] = field(default_factory=list)
    done: bool = False
    finish_reason: int = common_pb2.FINISH_REASON_UNSPECIFIED
    usage: common_pb2.Usage | None = None
    error: BaseException | None = None
    num_tokens: int = 0
    """Tokens generated so far (what the model computed for it, past its prompt)."""
    wasted: str = ""
    """Why it was dropped unused ("superseded", "prediction"); "" while it is or was used."""
    task: asyncio.Task[None] | None = None
    """Pumps the generation's chunks into this suggestion; cancelling it cancels the downstream call."""
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    """Set (then replaced) whenever text grows or the suggestion ends."""

    def add(self, chunk: gateway_pb2.CompletionChunk) -> None:
        self.text += chunk.text
        self.num_tokens += len(chunk.token_ids)
        self.chunks.append(chunk)
        if chunk.HasField("usage"):
            self.usage = chunk.usage
            self.finish_reason = chunk.finish_reason
        self._notify()

    def end(self, error: BaseException | None = None) -> None:
        self.done = True
        self.error = error
        self._notify()

    def _notify(self) -> None:
        changed, self.changed = self.changed, asyncio.Event()
        changed.set()

    def typed_into(self, prefix: str, suffix: str) -> int | None:
        """How many of its characters the user has typed, when the document at a cursor is this one's with
        a prefix of the suggestion typed at its cursor; None otherwise (it no longer applies)."""
        if suffix != self.suffix or not prefix.startswith(self.prefix):
            return None
        typed = len(prefix) - len(self.prefix)
        if typed > len(self.text) or prefix[len(self.prefix) :] != self.text[:typed]:
            return None
        return typed

    def cancel(self) -> None:
        if self.task is not None and not self.task.done():
            self.task.cancel()
