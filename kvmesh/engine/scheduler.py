"""The one scheduler: which sequences the next forward pass computes, and how many tokens each.

Every caller drives it the same way (the decode and prefill workers through `EngineLoop`, offline
generation through `kvmesh.engine.generate`):

    batch = scheduler.schedule()                      # reserves the blocks the pass needs
    logits = engine.run(batch)                        # one forward pass
    outputs = scheduler.postprocess(batch, logits)    # tokens, finish reasons; finished seqs freed

A pass spends a token budget (`max_num_batched_tokens`) in this order: one token for every running
decode, then draft tokens for the decodes that speculate (edits, prompt lookup), then a chunk of each
running prompt still prefilling, then the prompts waiting to start. So a prompt prefilled here shares
its pass with the running streams instead of stalling them for a whole chunk.

Sequences with a lower `priority` value come first: a waiting real request is admitted before a waiting
prediction, and a prediction is preempted before any real request.

When the pool cannot hold a running sequence's next tokens, the newest running sequence of the least
urgent priority is preempted:
its blocks are freed (full ones stay findable by hash) and it goes back to the front of the waiting
queue, to be recomputed from its prompt and output so far. Its output is unchanged: the recomputed
logits are those of the same prefix, and its sampling generator is not reset.
"""

from __future__ import annotations

from collections import deque

from kvmesh.engine.batch import Batch, ScheduledSeq, SeqOutput
from kvmesh.engine.engine import Engine
from kvmesh.engine.kv_cache import OutOfBlocks, num_blocks_for_tokens
from kvmesh.engine.sequence import Sequence
from kvmesh.engine.speculative import verify


class Scheduler:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        config = engine.engine_config
        # NOTE: no more running sequences than the budget has tokens, so that every pass decodes them all.
        self.max_num_seqs = min(config.max_num_seqs, config.max_num_batched_tokens)
        self.max_num_batched_tokens = config.max_num_batched_tokens
        self.prefill_chunk_size = config.prefill_chunk_size
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        """Admitted sequences, oldest first; the newest is preempted first."""

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        """Queue a sequence (from `Engine.add_sequence`, maybe holding blocks already: a cached prefix, or a
        prompt whose KV a prefill worker wrote). Raises OutOfBlocks when the pool could never hold its
        tokens and one more, however empty: a request to refuse, not to queue."""
        needed = num_blocks_for_tokens(len(seq) + (0 if seq.prefill_only else 1), self.engine.block_size)
        total = self.engine.pool.layout.num_blocks
        if needed > total:
            raise OutOfBlocks(needed, total)
        # NOTE: FIFO within a priority: the new sequence goes after every one at least as urgent.
        at = next((i for i, s in enumerate(self.waiting) if s.priority > seq.priority), len(self.waiting))
        self.waiting.insert(at, seq)

    def remove(self, seq: Sequence) -> None:
        """Stop scheduling a sequence, wherever it is; its blocks stay its own."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def abort(self, seq: Sequence) -> None:
        """Stop scheduling a sequence and free its blocks now. Safe to call twice."""
        self.remove(seq)
        self.engine.free(seq)

    # ---- schedule -----------------------------------------------------------------------------

    def schedule(self) -> Batch:
        """The next pass. Blocks for every item are reserved; drafts are appended to their sequences.
        An empty batch means nothing can run until blocks are freed (or nothing is queued)."""
        batch = Batch()
        budget = self.max_num_batched_tokens
        decoding = [s for s in self.running if s.num_uncomputed_tokens == 1 and not s.prefill_only]
        prefilling = [s for s in self.running if s not in decoding]
        for seq in decoding:
            if len(batch.items) == self.max_num_seqs or budget < 1:
                break
            if seq in self.running and self._make_room(seq, 1, batch):
                batch.items.append(ScheduledSeq(seq, 1, num_logits=1))
                budget -= 1
        for item in batch.items:
            if item.seq.cursor is not None and budget > 0 and item.seq in self.running:
                item.draft = self._append_draft(item.seq, budget)
                item.num_tokens = item.num_logits = 1 + len(item.draft)
                budget -= len(item.draft)
        batch.items = [item for item in batch.items if item.seq in self.running]
        for seq in prefilling:
            if len(batch.items) == self.max_num_seqs or budget < 1:
                break
            num_tokens = min(seq.num_uncomputed_tokens, self.prefill_chunk_size, budget)
            if seq in self.running and self._make_room(seq, num_tokens, batch):
                batch.items.append(self._chunk(seq, num_tokens))
                budget -= num_tokens
        while self.waiting and len(self.running) < self.max_num_seqs and budget > 0:
            seq = self.waiting[0]
            rematched = seq.num_preemptions > 0 and not seq.block_table
            if rematched:
                self.engine.match_prefix(seq)  # a preempted sequence finds what is still cached
            num_tokens = min(seq.num_uncomputed_tokens, self.prefill_chunk_size, budget)
            if not self.engine.can_reserve(seq, seq.num_computed_tokens + num_tokens):
                if rematched:  # it waits holding nothing: its cached blocks stay evictable
                    self.engine.free(seq)
                break  # NOTE: a waiting sequence never preempts a running one
            self.waiting.popleft()
            self.running.append(seq)
            self.engine.reserve(seq, seq.num_computed_tokens + num_tokens)
            batch.items.append(self._chunk(seq, num_tokens))
            budget -= num_tokens
        return batch

    def _chunk(self, seq: Sequence, num_tokens: int) -> ScheduledSeq:
        finishes_prompt = num_tokens == seq.num_uncomputed_tokens
        return ScheduledSeq(seq, num_tokens, num_logits=int(finishes_prompt and not seq.prefill_only))

    def _make_room(self, seq: Sequence, num_tokens: int, batch: Batch) -> bool:
        """Reserve blocks for seq's next num_tokens, preempting the newest running sequences (seq itself
        last) until they fit. False when seq was preempted or failed instead."""
        target = seq.num_computed_tokens + num_tokens
        while not self.engine.can_reserve(seq, target):
            victim = self._victim()
            if victim is seq and len(self.running) == 1 and self._can_never_fit(seq, target):
                self.running.remove(seq)
                self.engine.free(seq)
                batch.failed.append(seq)
                return False
            self._preempt(victim, batch)
            if victim is seq:
                return False
        self.engine.reserve(seq, target)
        return True

    def _victim(self) -> Sequence:
        """The running sequence to preempt: the newest of the least urgent priority."""
        least_urgent = max(s.priority for s in self.running)
        return next(s for s in reversed(self.running) if s.priority == least_urgent)

    def _can_never_fit(self, seq: Sequence, num_tokens: int) -> bool:
        """Even alone, with every other block free or evictable, seq's tokens would not fit."""
        return num_blocks_for_tokens(num_tokens, self.engine.block_size) > self.engine.pool.layout.num_blocks

    def _preempt(self, seq: Sequence, batch: Batch) -> None:
        self.running.remove(seq)
        for item in batch.items:
            if item.seq is seq:  # already scheduled in this pass: its draft and its slot go too
                self.engine.truncate(seq, len(seq) - len(item.draft))
        batch.items = [item for item in batch.items if item.seq is not seq]
        self.engine.free(seq)
        seq.num_preemptions += 1
        # Back at the front of its priority: it was admitted before everything else waiting there.
        at = next((i for i, s in enumerate(self.waiting) if s.priority >= seq.priority), len(self.waiting))
        self.waiting.insert(at, seq)
        batch.preempted.append(seq)

    def _append_draft(self, seq: Sequence, budget: int) -> list[int]:
        """Append the cursor's proposal (what fits the budget, one pass's chunk and the pool, cut just after
        the first token that would finish seq); never preempts for a draft."""
        assert seq.cursor is not None
        room = min(seq.cursor.num_draft_tokens, budget, self.prefill_chunk_size - 1)
        while room > 0 and not self.engine.can_reserve(seq, len(seq) + room):
            room //= 2
        draft = []
        for token in seq.cursor.propose(room):
            draft.append(token)
            if self.engine.append_token(seq, token) is not None:
                break
        self.engine.reserve(seq, len(seq))
        return draft

    # ---- postprocess --------------------------------------------------------------------------

    def postprocess(self, batch: Batch, logits: list) -> list[SeqOutput]:
        """Turn the pass's logits into tokens: sample (or verify drafts) for each sequence whose tokens are
        all computed, report prefill-only sequences done, and free every sequence that finished."""
        outputs = []
        sampled = [(item, rows) for item, rows in zip(batch.items, logits, strict=True) if item.num_logits]
        plain = [(item, rows) for item, rows in sampled if not item.draft]
        tokens = (
            self.engine.sample([item.seq for item, _ in plain], [rows[-1] for _, rows in plain])
            if plain
            else []
        )
        for (item, _), token in zip(plain, tokens, strict=True):
            seq = item.seq
            reason = self.engine.append_token(seq, token)
            if seq.cursor is not None:
                seq.cursor.stats.forward_passes += 1
                if reason is None:
                    seq.cursor.record([], token, seq.token_ids)
            outputs.append(SeqOutput(seq, [token], reason))
        for item, rows in sampled:
            if item.draft:
                outputs.append(self._verify(item, rows))
        for item in batch.items:
            if item.num_logits == 0 and item.seq.cursor is not None:
                item.seq.cursor.stats.forward_passes += 1
            if item.seq.prefill_only and item.seq.num_uncomputed_tokens == 0:
                self.running.remove(item.seq)
                outputs.append(SeqOutput(item.seq, [], prefilled=True))
        for output in outputs:
            if output.finish_reason is not None:
                self.running.remove(output.seq)
                self.engine.free(output.seq)
        return outputs

    def _verify(self, item: ScheduledSeq, rows) -> SeqOutput:  # noqa: ANN001 (a [1 + K, V] tensor)
        seq, draft = item.seq, item.draft
        assert seq.cursor is not None
        base = len(seq) - len(draft)
        num_accepted, bonus = verify(seq, draft, rows)
        if num_accepted < len(draft):
            # Only the draft's last token can have finished seq, so the kept ones leave it unfinished.
            self.engine.truncate(seq, base + num_accepted)
        if bonus is not None:
            self.engine.append_token(seq, bonus)
        stats = seq.cursor.stats
        stats.accepted_prediction_tokens += num_accepted
        stats.rejected_prediction_tokens += len(draft) - num_accepted
        stats.forward_passes += 1
        if bonus is not None:
            seq.cursor.record(draft[:num_accepted], bonus, seq.token_ids)
        return SeqOutput(seq, seq.token_ids[base:], seq.finish_reason)
