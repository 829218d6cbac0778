"""What one forward pass computes (the scheduler's answer) and what it produced (postprocess's answer)."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvmesh.engine.sequence import FinishReason, Sequence


@dataclass
class ScheduledSeq:
    """One sequence's share of a forward pass."""

    seq: Sequence
    num_tokens: int
    """Tokens this pass computes for seq: a prompt chunk, 1 for a decode, 1 + len(draft) for a verify."""
    draft: list[int] = field(default_factory=list)
    """Draft tokens appended to seq before the pass, to be verified (kept or rolled back) by postprocess."""
    num_logits: int = 0
    """Trailing rows of logits the pass must return: 0 (a chunk that does not finish the prompt, or a
    prefill-only sequence), 1 (sample the next token) or 1 + len(draft) (verify)."""


@dataclass
class Batch:
    """One forward pass: the sequences in it and the ones the scheduler preempted or failed to make room."""

    items: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    """Sequences moved back to the waiting queue, their blocks freed; they recompute later."""
    failed: list[Sequence] = field(default_factory=list)
    """Sequences that can never fit the pool (it is smaller than they grew); their blocks are freed."""

    @property
    def num_tokens(self) -> int:
        return sum(item.num_tokens for item in self.items)

    @property
    def seqs(self) -> list[Sequence]:
        return [item.seq for item in self.items]


@dataclass
class SeqOutput:
    """What one pass did for one sequence."""

    seq: Sequence
    new_token_ids: list[int]
    """Tokens appended to the output (a verified draft chunk and the model's own); empty for a chunk."""
    finish_reason: FinishReason | None = None
    prefilled: bool = False
    """A prefill-only sequence whose whole prompt is now computed; its blocks are the caller's to ship."""
