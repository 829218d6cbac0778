"""Speculative decoding with a given draft against plain decoding, on tiny random models.

A random model rarely agrees with a random draft, so drafts here are built from the model's own output
(greedy, or sampled with the seed under test) and then edited: long runs of the draft agree with the
model, and the edits force misses, rollbacks and re-alignment.
"""

from __future__ import annotations

import functools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmesh.engine.engine import Engine
from kvmesh.engine.generate import generate_speculative, generate_speculative_batch
from kvmesh.engine.sampling import SamplingParams
from kvmesh.engine.scheduler import Scheduler
from kvmesh.engine.speculative import DraftCursor, SpecStats
from tests.factories import make_engine, make_model_config, random_ids

SHAPES = {
    "gqa": {},
    "mqa": {"num_key_value_heads": 1},
    "window": {"sliding_window": 5},
}
NUM_FREE_RUN = 24
"""Tokens of the model's own output that drafts are edited from."""


@functools.cache
def engine_for(shape: str, block_size: int = 4, chunk: int = 512) -> Engine:
    # Shared across examples on purpose: the prefix cache then holds blocks of earlier runs, rejected
    # drafts included, and every run must still match plain decoding.
    return make_engine(make_model_config(**SHAPES[shape]), block_size=block_size, prefill_chunk_size=chunk)


EDIT_KINDS = ("insert", "delete", "substitute", "move", "unrelated", "stub")
Edit = tuple[str, float, float, int, int]
edit_lists = st.lists(
    st.tuples(
        st.sampled_from(EDIT_KINDS), st.floats(0, 1), st.floats(0, 1), st.integers(1, 8), st.integers(0, 999)
    ),
    max_size=3,
)
"""(kind, where, where to, size, seed): positions are fractions of the length, so shrinking stays valid."""


def apply_edit(tokens: list[int], edit: Edit) -> list[int]:
    kind, at, to, size, seed = edit
    i = int(at * len(tokens))
    new = random_ids(size, seed=seed)
    if kind == "insert":
        return tokens[:i] + new + tokens[i:]
    if kind == "delete":
        return tokens[:i] + tokens[i + size :]
    if kind == "substitute":
        return tokens[:i] + new + tokens[i + size :]
    if kind == "move":
        block, rest = tokens[i : i + size], tokens[:i] + tokens[i + size :]
        j = int(to * len(rest))
        return rest[:j] + block + rest[j:]
    if kind == "unrelated":
        return random_ids(max(len(tokens), 1), seed=seed)
    return tokens[: min(i, size - 1)]  # "stub": an empty or nearly empty original


def edited(tokens: list[int], edits: list[Edit]) -> list[int]:
    for edit in edits:
        tokens = apply_edit(tokens, edit)
    return tokens


def assert_pool_empty(engine: Engine) -> None:
    assert engine.pool_usage().num_blocks_used == 0


# ---- exactness against plain decoding --------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@settings(max_examples=8, deadline=None)
@given(
    prompt_len=st.integers(1, 20),
    seed=st.integers(0, 999),
    edits=edit_lists,
    max_new_tokens=st.integers(1, NUM_FREE_RUN + 4),
    stop_at=st.none() | st.floats(0, 1),
    ignore_eos=st.booleans(),
    block_size=st.sampled_from([1, 4, 16]),
    chunk=st.sampled_from([4, 512]),
)
def test_greedy_output_equals_plain_decoding(
    shape, prompt_len, seed, edits, max_new_tokens, stop_at, ignore_eos, block_size, chunk
):
    engine = engine_for(shape, block_size, chunk)
    prompt = random_ids(prompt_len, seed=seed)
    free_run = engine.generate(prompt, NUM_FREE_RUN, ignore_eos=True)
    options: dict[str, object] = {"ignore_eos": ignore_eos}
    if stop_at is not None:  # a stop token the model really produces, likely inside an accepted chunk
        options["stop_token_ids"] = [free_run[int(stop_at * (len(free_run) - 1))]]
    expected = engine.generate(prompt, max_new_tokens, **options)
    out, stats = generate_speculative(engine, prompt, edited(free_run, edits), max_new_tokens, **options)
    assert out == expected
    # Never more passes than plain decoding: every pass yields at least one token.
    assert stats.forward_passes <= -(-prompt_len // chunk) + len(out) - 1
    assert_pool_empty(engine)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 999), start=st.integers(0, 20), length=st.integers(1, 4), edits=edit_lists)
def test_stop_strings_cut_where_plain_decoding_cuts(seed, start, length, edits):
    engine = engine_for("gqa")
    prompt = random_ids(8, seed=seed)
    free_run = engine.generate(prompt, NUM_FREE_RUN, ignore_eos=True)
    stop = engine.tokenizer.decode(free_run)[start : start + length]
    if not stop:
        return
    expected = engine.generate(prompt, NUM_FREE_RUN, ignore_eos=True, stop_strings=[stop])
    out, _ = generate_speculative(
        engine, prompt, edited(free_run, edits), NUM_FREE_RUN, ignore_eos=True, stop_strings=[stop]
    )
    assert out == expected
    assert_pool_empty(engine)


@settings(max_examples=15, deadline=None)
@given(
    seed=st.integers(0, 999),
    temperature=st.sampled_from([0.5, 1.0, 1.5]),
    top_k=st.sampled_from([0, 20]),
    edits=edit_lists,
    max_new_tokens=st.integers(1, NUM_FREE_RUN),
)
def test_seeded_sampling_equals_plain_sampling_with_the_same_seed(
    seed, temperature, top_k, edits, max_new_tokens
):
    """Verification draws once per position plain decoding reaches, in order, and never past the first
    disagreement, so it consumes the generator exactly as plain sampling does: equality is exact, which
    also makes every kept draft token a true sample of the model."""
    engine = engine_for("mqa")
    prompt = random_ids(6, seed=seed)
    options = {"temperature": temperature, "top_k": top_k, "seed": seed, "ignore_eos": True}
    sampled = engine.generate(prompt, NUM_FREE_RUN, **options)
    out, stats = generate_speculative(engine, prompt, edited(sampled, edits), max_new_tokens, **options)
    assert out == sampled[:max_new_tokens]
    if not edits and max_new_tokens > 2:
        assert stats.accepted_prediction_tokens > 0
    assert_pool_empty(engine)


def test_a_rejected_sample_draws_nothing_past_the_disagreement():
    """Drawing at every verified position would run the generator ahead of plain sampling after a miss."""
    engine = engine_for("gqa")
    prompt = random_ids(6, seed=1)
    options = {"temperature": 1.0, "seed": 3, "ignore_eos": True}
    sampled = engine.generate(prompt, NUM_FREE_RUN, **options)
    original = sampled[:8] + random_ids(3, seed=2) + sampled[8:]
    out, stats = generate_speculative(engine, prompt, original, NUM_FREE_RUN, **options)
    assert out == sampled
    assert stats.rejected_prediction_tokens > 0 and stats.accepted_prediction_tokens > 8


def test_stops_at_the_context_limit_inside_a_draft():
    engine = make_engine(make_model_config(max_position_embeddings=40))
    prompt = random_ids(30)
    free_run = engine.generate(prompt, 50, ignore_eos=True)
    assert len(free_run) == 10
    out, stats = generate_speculative(engine, prompt, free_run + random_ids(20, seed=1), 50, ignore_eos=True)
    assert out == free_run and stats.rejected_prediction_tokens == 0
    assert generate_speculative(engine, prompt, free_run, 0) == ([], SpecStats())


# ---- speed and rollback ------------------------------------------------------------------------------


def test_an_unedited_original_is_accepted_many_tokens_per_forward_pass():
    engine = engine_for("gqa")
    prompt = random_ids(10, seed=3)
    free_run = engine.generate(prompt, 64, ignore_eos=True)
    out, stats = generate_speculative(engine, prompt, free_run, 64, ignore_eos=True)
    assert out == free_run
    assert stats.rejected_prediction_tokens == 0
    # The prefill pass gives the first token; drafts of 8, 16 and 32 (+1 of the model's own each) and the
    # last 4 draft tokens, cut by max_new_tokens, give the other 63.
    assert stats.accepted_prediction_tokens == 60
    assert stats.forward_passes == 5
    # A draft running past max_new_tokens is cut inside an accepted chunk.
    out, stats = generate_speculative(engine, prompt, free_run, 13, ignore_eos=True)
    assert out == free_run[:13] and stats.forward_passes == 3


def test_rejected_drafts_are_rolled_back_and_a_second_run_is_identical():
    engine = engine_for("mqa")
    prompt = random_ids(10, seed=4)
    free_run = engine.generate(prompt, 48, ignore_eos=True)
    original = free_run[:10] + random_ids(3, seed=5) + free_run[10:25] + free_run[33:]
    first = generate_speculative(engine, prompt, original, 48, ignore_eos=True)
    assert first[0] == free_run
    assert first[1].rejected_prediction_tokens > 0 and first[1].accepted_prediction_tokens > 20
    assert first[1].forward_passes < len(free_run) // 2
    assert_pool_empty(engine)
    assert generate_speculative(engine, prompt, original, 48, ignore_eos=True) == first


def test_every_step_leaves_exactly_the_kept_tokens_computed_and_their_blocks_held():
    """Sequences with and without drafts, scheduled together: after every pass each unfinished one has one
    uncomputed token, blocks for its computed tokens only, and the pool holds nothing else."""
    engine = make_engine(block_size=4)
    prompts = [random_ids(n, seed=n) for n in (5, 9, 14)]
    free_runs = [engine.generate(p, 30, ignore_eos=True) for p in prompts]
    cursors = [
        DraftCursor.for_edit(free_runs[0]),
        None,
        DraftCursor.for_edit(free_runs[2][:7] + random_ids(4, seed=8) + free_runs[2][7:]),
    ]
    scheduler = Scheduler(engine)
    seqs = [engine.add_sequence(p, engine_params(30)) for p in prompts]
    for seq, cursor in zip(seqs, cursors, strict=True):
        seq.cursor = cursor
        scheduler.add(seq)
    while scheduler.has_work():
        batch = scheduler.schedule()
        scheduler.postprocess(batch, engine.run(batch))
        for seq in scheduler.running:
            assert seq.num_computed_tokens == len(seq) - 1
            assert len(seq.block_table) == -(-seq.num_computed_tokens // 4)
        assert engine.pool_usage().num_blocks_used == sum(len(s.block_table) for s in scheduler.running)
    assert [s.output_token_ids for s in seqs] == free_runs
    assert (
        cursors[0].stats.accepted_prediction_tokens > 20 and cursors[2].stats.rejected_prediction_tokens > 0
    )
    assert_pool_empty(engine)


def engine_params(max_new_tokens: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 999), edits=st.lists(edit_lists, min_size=2, max_size=4))
def test_a_batch_of_mixed_drafts_equals_each_sequence_alone(seed, edits):
    engine = engine_for("gqa")
    prompts = [random_ids(3 + 4 * i, seed=seed + i) for i in range(len(edits))]
    free_runs = [engine.generate(p, NUM_FREE_RUN, ignore_eos=True) for p in prompts]
    drafts: list[list[int] | DraftCursor] = [edited(r, e) for r, e in zip(free_runs, edits, strict=True)]
    drafts[-1] = DraftCursor.for_prompt_lookup(prompts[-1])  # a completion with prompt lookup
    results = generate_speculative_batch(engine, prompts, drafts, NUM_FREE_RUN, ignore_eos=True)
    assert [out for out, _ in results] == free_runs
    assert_pool_empty(engine)


def test_a_full_pool_verifies_without_the_draft_then_waits_for_blocks():
    engine = make_engine(block_size=4, num_blocks=4)
    prompt = random_ids(6)
    free_run = engine.generate(prompt, 8, ignore_eos=True)
    scheduler = Scheduler(engine)
    seq = engine.add_sequence(prompt, engine_params(8))
    seq.cursor = cursor = DraftCursor.for_edit(free_run, num_draft_tokens=8)
    scheduler.add(seq)
    batch = scheduler.schedule()  # the prompt
    scheduler.postprocess(batch, engine.run(batch))
    hog = engine.add_sequence(random_ids(8, seed=2), use_prefix_cache=False)
    engine.reserve(hog, 8)  # the pool is now full: seq's two blocks hold 8 tokens, a draft needs more
    # Drafts shrink to the room left in seq's two blocks; then its next token needs a third block, and
    # seq is preempted (its blocks freed) to wait, its output unchanged.
    while (batch := scheduler.schedule()).items:
        assert len(seq.block_table) == 2
        scheduler.postprocess(batch, engine.run(batch))
    assert cursor.stats.accepted_prediction_tokens > 0 and cursor.stats.rejected_prediction_tokens == 0
    assert batch.preempted == [seq] and scheduler.waiting[0] is seq and seq.block_table == []
    assert seq.output_token_ids == free_run[:3]
    engine.free(hog)
    while scheduler.has_work():
        batch = scheduler.schedule()
        scheduler.postprocess(batch, engine.run(batch))
    assert seq.output_token_ids == free_run
    assert_pool_empty(engine)


# ---- the cursor alone -------------------------------------------------------------------------------

DRAFT = list(range(100, 160))


def test_cursor_proposes_the_continuation_and_follows_its_bonus_token():
    cursor = DraftCursor.for_edit(DRAFT)
    assert cursor.propose(4) == DRAFT[:4]
    cursor.advance(DRAFT[:4], DRAFT[4])  # all kept, and the model's own token is the next draft token
    assert cursor.aligned and cursor.position == 5
    assert cursor.propose(3) == DRAFT[5:8]
    cursor.advance(DRAFT[5:6], 7)  # a miss: the model wrote 7 where the draft has DRAFT[6]
    assert not cursor.aligned and cursor.position == 6 and cursor.propose(4) == []


def test_num_draft_tokens_doubles_after_full_acceptance_and_halves_after_a_miss():
    cursor = DraftCursor.for_edit(DRAFT * 3, num_draft_tokens=2, max_draft_tokens=8)
    sizes = []
    for _ in range(4):
        proposal = cursor.propose(cursor.num_draft_tokens)
        cursor.advance(proposal, cursor.draft[cursor.position + len(proposal)])
        sizes.append(cursor.num_draft_tokens)
    assert sizes == [4, 8, 8, 8]
    for _ in range(5):
        cursor.aligned = True  # misses only shrink; alignment is not the point here
        proposal = cursor.propose(cursor.num_draft_tokens)
        cursor.advance(proposal[:-1], -1)
        sizes.append(cursor.num_draft_tokens)
    assert sizes[4:] == [4, 2, 1, 1, 1]
    cursor.advance([], -1)  # nothing proposed (plain step while misaligned): K stays
    assert cursor.num_draft_tokens == 1


@pytest.mark.parametrize(
    ("output", "expected_position"),
    [
        (DRAFT[:10] + [1] + DRAFT[11:14], 14),  # substitution: re-align just after the match
        (DRAFT[:10] + [1, 2, 3, 4] + DRAFT[10:13], 13),  # insertion
        (DRAFT[:10] + DRAFT[30:33], 33),  # deletion of 20 tokens: within the forward window
        (DRAFT[:10] + DRAFT[2:5], 5),  # a repeated line: a little behind
        (DRAFT[:10] + DRAFT[57:60], None),  # ends on the draft's last token: nothing to draft from
    ],
)
def test_cursor_re_aligns_after_insertions_deletions_and_substitutions(output, expected_position):
    cursor = DraftCursor.for_edit(DRAFT, window=32, lookback=16)
    cursor.advance(DRAFT[:0], DRAFT[0])
    cursor.propose(9)
    cursor.advance(DRAFT[1:10], output[10])
    assert cursor.aligned == (output[10] == DRAFT[10])
    for n in range(11, len(output) + 1):
        cursor.observe(output[:n])
    assert cursor.aligned == (expected_position is not None)
    if expected_position is not None:
        assert cursor.position == expected_position


def test_near_matches_win_over_far_ones_and_far_ones_are_still_found():
    block = [7, 8, 9]
    draft = [1] * 5 + block + [2] * 30 + block + [3] * 100 + block + [4] * 30
    cursor = DraftCursor(draft, position=20, aligned=False, window=32, lookback=16)
    assert cursor.observe(block) and cursor.position == 41  # ahead within the window, not 8 behind
    cursor = DraftCursor(draft, position=60, aligned=False, window=32, lookback=16)
    assert cursor.observe(block) and cursor.position == 144  # a moved block far ahead
    cursor = DraftCursor(draft, position=len(draft), aligned=False, window=32, lookback=16)
    assert cursor.observe(block) and cursor.position == 144  # behind, beyond lookback: still found
    assert not DraftCursor(draft, aligned=False).observe([7, 8])  # too short a tail to trust


def test_prompt_lookup_aligns_where_the_prompt_repeats_its_tail():
    prompt = [5, 6, 7, 8, 1, 2, 5, 6, 7]
    cursor = DraftCursor.for_prompt_lookup(prompt)
    assert cursor.aligned and cursor.propose(2) == [8, 1]
    assert not DraftCursor.for_prompt_lookup([1, 2, 3, 4]).aligned


def _follow(cursor: DraftCursor, output: list[int]):
    """Drive cursor without an engine: the "model" writes `output`; a step keeps the proposal's agreeing
    prefix plus the next output token. Yields how many output tokens are done after each step."""
    done = 0
    while done < len(output):
        proposal = cursor.propose(cursor.num_draft_tokens)
        kept = 0
        while kept < len(proposal) and done + kept < len(output) and proposal[kept] == output[done + kept]:
            kept += 1
        if done + kept == len(output):
            return
        cursor.advance(proposal[:kept], output[done + kept])
        done += kept + 1
        cursor.observe(output[:done])
        yield done


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 999), edits=edit_lists, snippet_edits=edit_lists, with_lookup=st.booleans())
def test_cursor_stays_consistent_with_an_oracle_model(seed, edits, snippet_edits, with_lookup):
    """Without an engine: the "model" writes `output`; a step keeps the proposal's agreeing prefix plus the
    next output token. Invariants: aligned means the output so far ends just before `position`; with a
    prompt to look up in (the original, then a snippet), a lookup proposal continues text that ends the
    way the output so far ends."""
    draft = random_ids(60, vocab_size=30, seed=seed)
    output = edited(draft, edits)
    prompt = [*draft, *edited(output, snippet_edits)] if with_lookup else None
    cursor = DraftCursor.for_edit(draft, prompt)
    for done in _follow(cursor, output):
        if cursor.aligned and cursor.position:
            assert output[done - 1] == draft[cursor.position - 1]
        elif cursor.lookup_position is not None:
            assert prompt is not None
            m, at = cursor.match_len, cursor.lookup_position
            assert (prompt + output[:done])[at - m : at] == output[done - m : done]
        assert 1 <= cursor.num_draft_tokens <= cursor.max_draft_tokens


def test_where_the_output_leaves_the_original_the_cursor_drafts_from_the_snippet():
    original = list(range(100, 160))
    new_code = [7, 8, 9, 10, 11, 12, 13, 14]
    updated = original[:20] + new_code + original[20:]
    snippet = original[16:20] + new_code + original[20:24]
    prompt = [1, *original, 2, *snippet, 3]
    cursor = DraftCursor.for_edit(original, prompt, window=32, lookback=16)
    cursor.advance([], updated[0])
    cursor.propose(19)
    cursor.advance(updated[1:20], updated[20])  # the model starts the new code
    assert not cursor.aligned and cursor.lookup_position is None and cursor.propose(4) == []
    # [118, 119, 7] is nowhere in the original: the rest of the new code comes from the snippet.
    assert cursor.observe(updated[:21]) and not cursor.aligned
    assert cursor.propose(4) == [8, 9, 10, 11]
    cursor.advance([8, 9, 10, 11], 12)
    assert cursor.propose(7) == [13, 14, *original[20:24], 3]  # the snippet goes on, to its end
    cursor.advance([13, 14, *original[20:24]], original[24])  # the model goes on past the snippet
    assert cursor.lookup_position is None
    cursor.observe(updated[: 20 + len(new_code) + 5])
    assert cursor.aligned and cursor.propose(3) == original[25:28]  # back in the original, near the anchor


def test_near_original_matches_win_over_lookup_and_lookup_over_far_ones():
    block = [7, 8, 9]
    draft = [1] * 5 + block + [2] * 100 + block + [4] * 30
    prompt = [*draft, 5, *block, 6, 6]
    cursor = DraftCursor(draft, position=100, aligned=False, window=32, lookback=16, lookup_ids=prompt)
    assert cursor.observe(block) and cursor.position == 111 and cursor.aligned  # 8 ahead: near
    cursor = DraftCursor(draft, position=40, aligned=False, window=32, lookback=16, lookup_ids=prompt)
    assert cursor.observe(block) and not cursor.aligned and cursor.position == 40
    assert cursor.propose(3) == [6, 6]  # the latest occurrence, in the prompt's last part


def test_the_output_so_far_is_a_source_too():
    original = list(range(100, 140))
    cursor = DraftCursor.for_edit(original, [1, *original, 2])
    cursor.advance([], 100)
    loop = [5, 6, 7, 8, 9]
    output = [100]
    for token in loop * 2:  # the model leaves the original and repeats itself
        cursor.propose(cursor.num_draft_tokens)
        cursor.advance([], token)
        output.append(token)
        cursor.observe(output)
    assert cursor.propose(3) == loop[:3]


@pytest.mark.parametrize("looping", [True, False])
def test_an_output_that_repeats_itself_is_followed_there_rather_than_in_the_original(looping):
    original = list(range(100, 140))
    own_line = [7, 8] if looping else [9, 9]
    # The output left the original at 110 and wrote 7 8 105 106 107, then `own_line` 105 106 107.
    output = [*original[:10], 7, 8, *original[5:8], *own_line, *original[5:8]]
    cursor = DraftCursor(
        original, position=10, aligned=False, window=32, lookback=16, lookup_ids=[1, *original, 2, *output]
    )
    assert cursor.observe(output)
    # 105 106 107 is also just behind where the output left the original. Looping, the output's own
    # earlier 105 106 107 agrees with more of what came before it (7 8), so the loop is what gets
    # proposed; otherwise the original, near its anchor, wins.
    if looping:
        assert not cursor.aligned and cursor.propose(2) == [7, 8]
    else:
        assert cursor.aligned and cursor.position == 8 and cursor.propose(2) == [108, 109]
