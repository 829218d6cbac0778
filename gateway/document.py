"""A session's document at the gateway: its text, token ids and block hashes, kept up to date per change.

Incremental tokenization rests on safe points: a position just after a "\\n" that has no whitespace on
either side (x\\n|y). A byte-level BPE pre-tokenizer (GPT-2, Qwen and the like) never lets a token span
one, so the tokens of a text are the tokens of its pieces between safe points, concatenated. A text is
held as such pieces (merged to at least MIN_PIECE_CHARS); a change re-encodes only the pieces it touches,
and their neighbours when it unmade the safe point between them. A tokenizer for
which the probe in `splits_at_safe_points` fails is encoded whole every time: slower, never wrong.

Block hashes chain (kvmesh.engine.block_hash), so a change re-hashes only the blocks from the first
token that differs.
"""

from __future__ import annotations

from collections.abc import Sequence

from kvmesh.engine.block_hash import hash_blocks
from kvmesh.engine.tokenizer import Tokenizer

MIN_PIECE_CHARS = 256
"""Pieces are at least this long (but the last): fewer pieces to walk, little more to re-encode."""
_PROBES = (
    "a\nb",
    "x = 1\n\ndef f():\n    return x\n",
    "}\n)\n  \n.\n'a'\n#b\n",
    "class A:\n    def f(self):\n        return 1\n\n    x = (2,\n      3)\n  # c\n   .d\n    'e'\n",
)


def splits_at_safe_points(tokenizer: Tokenizer) -> bool:
    """Whether tokenizer's ids of the probe texts are their pieces' ids, concatenated."""
    for text in _PROBES:
        joined = [token_id for piece in split_pieces(text, 1) for token_id in tokenizer.encode(piece)]
        if joined != tokenizer.encode(text):
            return False
    return True


def split_pieces(text: str, min_chars: int = MIN_PIECE_CHARS) -> list[str]:
    """text cut at safe points into pieces of at least min_chars (the last may be shorter)."""
    pieces = []
    start = 0
    search = min_chars
    while True:
        cut = _next_safe_point(text, max(search, start + 1))
        if cut < 0:
            break
        pieces.append(text[start:cut])
        start = cut
        search = cut + min_chars
    if start < len(text) or not pieces:
        pieces.append(text[start:])
    return pieces


def _is_safe_point(text: str, at: int) -> bool:
    """Whether a cut at `at` (0 < at < len(text)) is a safe point (see _next_safe_point)."""
    if text[at - 1] == "\n":
        return not text[at].isspace() and (at == 1 or not text[at - 2].isspace())
    return text[at] == " " and text[at - 1] == " " and at + 1 < len(text) and not text[at + 1].isspace()


def _next_safe_point(text: str, at: int) -> int:
    """The first safe point at or after `at`, -1 when none. Safe points: after a "\\n" with no whitespace
    on either side (x\\n|y), and before the last space of an indentation that has at least two (\\n   | y).

    NOTE: whitespace before a "\\n" would join it in one pre-token at a piece's end ("\\n\\n", " \\n",
    "\\r\\n"), where the whole text splits it ("\\n" "\\n" before a word); and the space right before a
    word is that word's (" y"): the cuts avoid both."""
    newline = text.find("\n", at - 1)
    while 0 <= newline < len(text) - 1:
        cut = newline + 1
        if _is_safe_point(text, cut) and cut >= at:
            return cut
        word = cut
        while word < len(text) and text[word] == " ":
            word += 1
        if word - cut >= 2 and word < len(text) and not text[word].isspace() and word - 1 >= at:
            return word - 1
        newline = text.find("\n", newline + 1)
    return -1


class TokenizedText:
    """A text and its token ids, equal to tokenizer.encode(text) after every update."""

    def __init__(self, tokenizer: Tokenizer, incremental: bool) -> None:
        """incremental: the tokenizer passed splits_at_safe_points (else every update encodes it all)."""
        self._tokenizer = tokenizer
        self._incremental = incremental
        self._pieces: list[str] = []
        self._piece_ids: list[list[int]] = []
        self.token_ids: list[int] = []
        """tokenizer.encode(text): the pieces' ids, concatenated (spliced in place on each update)."""
        self.text = ""
        self.num_chars_encoded = 0
        """Characters encoded by the last update (for tests and the bench)."""

    def update(self, text: str) -> None:
        """Sets the text, re-encoding only the pieces that changed (and their neighbours)."""
        if text == self.text:
            self.num_chars_encoded = 0
            return
        pieces = self._pieces
        if not self._incremental or not pieces:
            self._replace(0, len(pieces), text)
            self.text = text
            return
        # Unchanged pieces at the front and the back (compared in place, without slicing text).
        first, start = 0, 0
        while first < len(pieces) and text.startswith(pieces[first], start):
            start += len(pieces[first])
            first += 1
        last, end = len(pieces), len(text)
        while (
            last > first and end - len(pieces[last - 1]) >= start and text.endswith(pieces[last - 1], 0, end)
        ):
            last -= 1
            end -= len(pieces[last])
        # A change next to an edge may have unmade its safe point: then the neighbour is re-encoded too.
        while first > 0 and not _is_safe_point(text, start):
            first -= 1
            start -= len(pieces[first])
        while last < len(pieces) and not _is_safe_point(text, end):
            end += len(pieces[last])
            last += 1
        self._replace(first, last, text[start:end])
        self.text = text

    def _replace(self, first: int, last: int, region: str) -> None:
        new_pieces = split_pieces(region) if self._incremental else [region]
        new_pieces = [piece for piece in new_pieces if piece]
        new_ids = [self._tokenizer.encode(piece) for piece in new_pieces]
        begin = sum(len(ids) for ids in self._piece_ids[:first])
        end = begin + sum(len(ids) for ids in self._piece_ids[first:last])
        self.token_ids[begin:end] = [token_id for ids in new_ids for token_id in ids]
        self._pieces[first:last] = new_pieces
        self._piece_ids[first:last] = new_ids
        self.num_chars_encoded = len(region)


class HashChain:
    """The chained block hashes of a token list in one namespace, re-hashed from the first change."""

    def __init__(self, namespace: bytes, block_size: int) -> None:
        self.namespace = namespace
        self.block_size = block_size
        self._token_ids: list[int] = []
        self.hashes: list[bytes] = []
        self.num_blocks_hashed = 0
        """Blocks hashed by the last update."""

    def update(self, token_ids: Sequence[int]) -> list[bytes]:
        """The hashes of token_ids' full blocks; equal to hash_blocks(namespace, token_ids, block_size)."""
        token_ids = list(token_ids)
        num_same_blocks = _common_prefix_len(self._token_ids, token_ids) // self.block_size
        num_same_blocks = min(num_same_blocks, len(self.hashes))
        parent = self.hashes[num_same_blocks - 1] if num_same_blocks else self.namespace
        fresh = hash_blocks(parent, token_ids, self.block_size, start=num_same_blocks)
        self.hashes = self.hashes[:num_same_blocks] + fresh
        self.num_blocks_hashed = len(fresh)
        self._token_ids = token_ids
        return self.hashes


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix of two lists, by bisection over slice comparisons (C-speed)."""
    low, high = 0, min(len(a), len(b))
    if a[:high] == b[:high]:
        return high
    # NOTE: invariant a[:low] == b[:low] and a[:high] != b[:high].
    while high - low > 1:
        middle = (low + high) // 2
        if a[low:middle] == b[low:middle]:
            low = middle
        else:
            high = middle
    return low
