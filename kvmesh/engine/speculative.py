"""Speculative decoding with a given draft: the original file for edits (and, where the output leaves it,
the prompt's snippet and the output so far), the prompt for prompt lookup.

The draft is not a model's guess but a token sequence the output is likely to copy. Each step feeds a
chunk of it after the last generated token, verifies the whole chunk in one forward pass, keeps the
longest prefix the model agrees with plus one token of the model's own, and rolls back the rest:

    seq.cursor = DraftCursor.for_edit(original_ids)          # or DraftCursor.for_prompt_lookup(prompt_ids)
    scheduler.add(seq)                                       # each decode step of seq now verifies a draft

The scheduler (`kvmesh.engine.scheduler`) appends `cursor.propose(k)` to the sequence, the pass computes
its logits beside plain decodes and prompt chunks, and `verify` decides what is kept.

Why the output is exactly plain decoding's: draft token i is kept only when the token the model picks at
that position (from the same logits plain decoding would see, given the same prefix) equals it, so every
kept token is the token plain decoding would have produced there. Draft tokens are appended with
`Engine.append_token` before the pass and the draft is cut at the first token that would finish the
sequence, so a stop token, stop string, max_new_tokens or the context limit inside an accepted chunk ends
the output where plain decoding ends it. Equality is up to floating point: a pass over 1 + K tokens
computes the same logits as K + 1 single-token passes only to ~1e-6, which can flip a near-tie.

Temperature > 0: verification draws from the sequence's own generator once per position, in order, and
stops drawing at the first disagreement (or when the sequence finishes). Those are exactly the positions
plain decoding samples, with the same prefixes, so a seeded request samples the same tokens as plain
decoding with that seed (up to the same floating-point caveat). The kept tokens are therefore exact
samples of the model; accepting "while the sampled token equals the draft" is speculative sampling with a
one-hot draft distribution.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from kvmesh.engine.sampling import sample_token
from kvmesh.engine.sequence import Sequence

MAX_CONTEXT = 32
"""How far back DraftCursor compares the output with its two sources' matches to choose one."""


@dataclass
class SpecStats:
    """One request's speculation counters (names as in OpenAI's predicted outputs)."""

    accepted_prediction_tokens: int = 0
    """Draft tokens the model agreed with: they became output without a forward pass of their own."""
    rejected_prediction_tokens: int = 0
    """Draft tokens verified, disagreed with and rolled back (their KV included)."""
    forward_passes: int = 0
    """Model forward passes this request took part in, prefill passes included."""


class DraftCursor:
    """Where a sequence's output stands in its draft, and how many draft tokens to verify next.

    Invariants: while `aligned`, the output so far ends with the draft tokens just before `position`, and
    `draft[position]` is the token expected next (`position == len(draft)`: the draft is used up). While
    not aligned, `position` is the anchor where alignment was lost; re-alignment searches near it first.
    `num_draft_tokens` stays in [1, max_draft_tokens].

    With `lookup_ids` (an edit's whole prompt) the cursor has a second source for where the output leaves
    the draft: the text an edit adds is in its snippet, not in the original. When the last match_len
    tokens occur nowhere near the anchor, or their latest occurrence in lookup_ids + the output so far
    agrees with more of the output before them (see `observe`), it proposes what followed that occurrence
    (prompt lookup), while `lookup_position` is set; the draft's anchor is kept, and the next miss goes
    back to looking near it first.
    """

    def __init__(
        self,
        draft_ids: Seq[int],
        *,
        position: int = 0,
        aligned: bool = True,
        match_len: int = 3,
        window: int = 64,
        lookback: int = 16,
        num_draft_tokens: int = 8,
        max_draft_tokens: int = 32,
        lookup_ids: Seq[int] | None = None,
    ) -> None:
        """match_len: generated tokens that must match the draft to re-align. window / lookback: how far
        forward / backward of the anchor a match counts as near (further matches are taken only when no
        near one exists, to follow moved blocks). lookup_ids: the second source (see the class)."""
        if match_len < 1 or not 1 <= num_draft_tokens <= max_draft_tokens:
            raise ValueError("need match_len >= 1 and 1 <= num_draft_tokens <= max_draft_tokens")
        if not 0 <= position <= len(draft_ids):
            raise ValueError(f"position {position} is outside a {len(draft_ids)}-token draft")
        self.draft = list(draft_ids)
        self.position = position
        self.aligned = aligned
        self.match_len = match_len
        self.window = window
        self.lookback = lookback
        self.num_draft_tokens = num_draft_tokens
        self.max_draft_tokens = max_draft_tokens
        self.stats = SpecStats()
        self._num_proposed = 0
        # Where each match_len-gram starts, ascending, so re-alignment costs a dict lookup and a bisect
        # per token rather than a scan. Grams ending on the last draft token are left out: aligning
        # there would leave nothing to propose.
        self._starts: dict[tuple[int, ...], list[int]] = {}
        _index_grams(self.draft, match_len, 0, self._starts)
        self.lookup_position: int | None = None
        self._lookup: list[int] | None = None if lookup_ids is None else list(lookup_ids)
        self._lookup_starts: dict[tuple[int, ...], list[int]] = {}
        self._lookup_indexed = 0
        if self._lookup is not None:
            self._lookup_indexed = _index_grams(self._lookup, match_len, 0, self._lookup_starts)

    @classmethod
    def for_edit(
        cls, original_ids: Seq[int], prompt_ids: Seq[int] | None = None, **options: int
    ) -> DraftCursor:
        """An edit's output starts where the original starts. With prompt_ids (the whole prompt, which
        holds the snippet) the cursor also drafts new code from the snippet and the output so far."""
        return cls(original_ids, position=0, aligned=True, lookup_ids=prompt_ids, **options)

    @classmethod
    def for_prompt_lookup(cls, prompt_ids: Seq[int], **options: int) -> DraftCursor:
        """A completion drafts from its prompt wherever the text so far repeats part of it; it starts
        aligned only if the prompt's own tail occurs earlier in the prompt."""
        cursor = cls(prompt_ids, position=len(prompt_ids), aligned=False, **options)
        cursor.observe(prompt_ids)
        return cursor

    def propose(self, k: int) -> list[int]:
        """The next k draft tokens, or lookup tokens while `lookup_position` is set (fewer at the source's
        end; none while neither). The caller then reports what was kept with `advance`."""
        if self.aligned:
            proposal = self.draft[self.position : self.position + k]
        elif self.lookup_position is not None and self._lookup is not None:
            proposal = self._lookup[self.lookup_position : self.lookup_position + k]
        else:
            proposal = []
        self._num_proposed = len(proposal)
        return proposal

    def advance(self, accepted: Seq[int], bonus: int) -> None:
        """Record one verification: `accepted` is the kept prefix of the last proposal, `bonus` the
        model's own token after it. A fully kept proposal doubles the next one; a miss halves it."""
        proposed, self._num_proposed = self._num_proposed, 0
        if proposed:
            if len(accepted) == proposed:
                self.num_draft_tokens = min(2 * self.num_draft_tokens, self.max_draft_tokens)
            else:
                self.num_draft_tokens = max(1, self.num_draft_tokens // 2)
        if self.aligned:
            self.position += len(accepted)
            if self.position < len(self.draft) and self.draft[self.position] == bonus:
                self.position += 1
            else:
                self.aligned = False
        elif self.lookup_position is not None and self._lookup is not None:
            at = self.lookup_position + len(accepted)
            # At the lookup's end (the output so far) there is nothing left to follow.
            self.lookup_position = at + 1 if at < len(self._lookup) and self._lookup[at] == bonus else None
        if self._lookup is not None:
            self._lookup += [*accepted, bonus]
            self._lookup_indexed = _index_grams(
                self._lookup, self.match_len, self._lookup_indexed, self._lookup_starts
            )

    def record(self, accepted: Seq[int], bonus: int, token_ids: Seq[int]) -> None:
        """What a forward pass tells the cursor: `advance`, then `observe` the tail of the sequence's
        tokens (`token_ids`, prompt and output, `bonus` last). After a plain step (a prefill that gave the
        first token) `accepted` is empty."""
        self.advance(accepted, bonus)
        self.observe(token_ids[-self.tail_len :])

    @property
    def tail_len(self) -> int:
        """How many of the latest tokens `observe` wants to see."""
        return self.match_len + MAX_CONTEXT

    def observe(self, generated_tail: Seq[int]) -> bool:
        """While not aligned: re-align just after an occurrence of the last match_len generated tokens.
        In the draft the nearest one ahead of the anchor within `window` is preferred, then the nearest
        behind it within `lookback`, then the nearest anywhere (ahead first). With a lookup, the latest
        occurrence there comes after a near draft match and before a far one, unless more of the tokens
        before it agree with the output (up to MAX_CONTEXT): an output that repeats its own last lines,
        or goes on with a snippet's changed line, is followed there. Returns whether a source is set."""
        m = self.match_len
        if self.aligned or self.lookup_position is not None or len(generated_tail) < m:
            return self.aligned or self.lookup_position is not None
        gram = tuple(generated_tail[-m:])
        starts = self._starts.get(gram, [])
        # Candidates are re-alignment points start + m; `i` splits them at the anchor.
        i = bisect_left(starts, self.position - m)
        ahead = starts[i] + m if i < len(starts) else None
        behind = starts[i - 1] + m if i > 0 else None
        near = None
        if ahead is not None and ahead - self.position <= self.window:
            near = ahead
        elif behind is not None and self.position - behind <= self.lookback:
            near = behind
        lookup_starts = self._lookup_starts.get(gram)
        if self._lookup is not None and lookup_starts:
            looked_up = lookup_starts[-1] + m
            if near is None or _context(self._lookup, looked_up, generated_tail, m) > _context(
                self.draft, near, generated_tail, m
            ):
                self.lookup_position = looked_up
                return True
        if near is not None:
            self.position = near
        elif starts:
            self.position = ahead if ahead is not None else starts[-1] + m
        else:
            return False
        self.aligned = True
        return True


def _context(source: list[int], at: int, tail: Seq[int], m: int) -> int:
    """How many tokens before the match_len-gram that ends at source[at - 1] also agree with the tokens
    before tail's last m, up to MAX_CONTEXT."""
    n = 0
    limit = min(MAX_CONTEXT, at - m, len(tail) - m)
    while n < limit and source[at - m - 1 - n] == tail[len(tail) - m - 1 - n]:
        n += 1
    return n


def _index_grams(ids: list[int], m: int, first: int, starts: dict[tuple[int, ...], list[int]]) -> int:
    """Add to `starts` where each m-gram of ids begins, from position `first` on, in ascending order;
    returns the position to go on from once ids grows. A gram ending on the last token is left out:
    aligning there would leave nothing to propose."""
    for start in range(first, len(ids) - m):
        starts.setdefault(tuple(ids[start : start + m]), []).append(start)
    return max(first, len(ids) - m)


def verify(seq: Sequence, draft: list[int], rows: torch.Tensor) -> tuple[int, int | None]:
    """[1 + len(draft), V] logits -> (draft tokens kept, the model's token after them). The token is None
    when every draft token is kept and the last one finished seq: plain decoding would sample no more."""
    if seq.params.greedy:
        predicted = rows.argmax(-1).tolist()
        n = 0
        while n < len(draft) and predicted[n] == draft[n]:
            n += 1
        return n, None if n == len(draft) and seq.finished else predicted[n]
    # NOTE: one draw per position, in order, none past the first disagreement: the generator is consumed
    # exactly as plain decoding consumes it, so seeded sampling reproduces plain sampling.
    n = 0
    while not (n == len(draft) and seq.finished):
        token = sample_token(rows[n], seq.params, seq.generator)
        if n == len(draft) or token != draft[n]:
            return n, token
        n += 1
    return n, None
