"""Offline generation: the scheduler run to completion, on the caller's thread.

    generate_batch(engine, prompts, 64)                        # [(tokens, stats), ...], plain decoding
    generate_speculative(engine, prompt, original_ids, 64)     # (tokens, stats), an edit's draft verified

The same scheduler serves the workers, so what this returns is what a worker streams for the same
requests (up to the floating-point caveat in `kvmesh.engine.speculative`).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

from kvmesh.engine.engine import Engine
from kvmesh.engine.kv_cache import OutOfBlocks, num_blocks_for_tokens
from kvmesh.engine.sampling import SamplingParams
from kvmesh.engine.scheduler import Scheduler
from kvmesh.engine.sequence import Sequence
from kvmesh.engine.speculative import DraftCursor, SpecStats


def run_to_completion(engine: Engine, seqs: Seq[Sequence]) -> None:
    """Schedule seqs until every one has finished; their blocks are freed on every exit. Raises
    OutOfBlocks when one of them can never fit the pool."""
    scheduler = Scheduler(engine)
    try:
        for seq in seqs:
            scheduler.add(seq)
        while scheduler.has_work():
            batch = scheduler.schedule()
            if batch.failed or not batch.items:
                # Nothing else will free blocks here: a sequence that cannot run now never will.
                [seq, *_] = batch.failed or scheduler.waiting
                needed = num_blocks_for_tokens(len(seq) + 1, engine.block_size) - len(seq.block_table)
                raise OutOfBlocks(needed, engine.pool.allocator.num_free)
            scheduler.postprocess(batch, engine.run(batch))
    finally:
        for seq in seqs:
            scheduler.abort(seq)


def generate_batch(
    engine: Engine,
    prompts: Seq[Seq[int]],
    max_new_tokens: int,
    drafts: Seq[Seq[int] | DraftCursor | None] | None = None,
    **options: object,
) -> list[tuple[list[int], SpecStats]]:
    """Generate after each prompt (greedy unless options say otherwise); returns each output's new token ids
    and its speculation counters. A draft per prompt (an edit's original token ids, or a ready cursor)
    is verified as the output goes; None decodes plainly.

    options are SamplingParams fields: ignore_eos, temperature, top_p, top_k, seed, stop_token_ids,
    stop_strings. A stop or end-of-sequence token ends the output and is included in it.
    """
    params = SamplingParams.from_options(max_new_tokens, **options)
    seqs = [engine.add_sequence(prompt, params) for prompt in prompts]
    stats = [SpecStats() for _ in seqs]
    for i, (seq, prompt) in enumerate(zip(seqs, prompts, strict=True)):
        draft = drafts[i] if drafts is not None else None
        if draft is not None:
            seq.cursor = draft if isinstance(draft, DraftCursor) else DraftCursor.for_edit(draft, prompt)
            stats[i] = seq.cursor.stats
    if max_new_tokens == 0:
        for seq in seqs:
            engine.free(seq)
        return [([], s) for s in stats]
    run_to_completion(engine, seqs)
    for seq, s in zip(seqs, stats, strict=True):
        if seq.cursor is None:
            s.forward_passes = seq.num_forward_passes
    return [(seq.output_token_ids, s) for seq, s in zip(seqs, stats, strict=True)]


def generate_speculative(
    engine: Engine,
    prompt_ids: Seq[int],
    draft: Seq[int] | DraftCursor,
    max_new_tokens: int,
    **options: object,
) -> tuple[list[int], SpecStats]:
    """`Engine.generate` with a draft (token ids of an edit's original, or a ready cursor): the same
    tokens, in fewer forward passes wherever the output copies the draft."""
    [result] = generate_batch(engine, [prompt_ids], max_new_tokens, [draft], **options)
    return result


def generate_speculative_batch(
    engine: Engine,
    prompts: Seq[Seq[int]],
    drafts: Seq[Seq[int] | DraftCursor],
    max_new_tokens: int,
    **options: object,
) -> list[tuple[list[int], SpecStats]]:
    """`generate_batch` with a draft for every prompt."""
    return generate_batch(engine, prompts, max_new_tokens, list(drafts), **options)
