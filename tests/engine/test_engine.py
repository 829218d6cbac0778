"""The paged, chunked, batched engine against slow references on random inputs."""

from __future__ import annotations

import resource
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmesh.engine.kv_cache import OutOfBlocks
from kvmesh.engine.model import CausalLM, apply_rope
from kvmesh.engine.sampling import SamplingParams
from tests.factories import make_engine, make_model_config, random_ids


def dense_logits(model: CausalLM, token_ids: list[int]) -> torch.Tensor:
    """The reference: the same weights run over the whole sequence with dense causal attention, no pool."""
    config = model.config
    ids = torch.tensor(token_ids)
    positions = torch.arange(len(token_ids))
    with torch.inference_mode():
        x = model.model.embed_tokens(ids)
        cos, sin = model.rotary(positions, x.dtype)
        causal = positions[None, :] <= positions[:, None]
        if config.sliding_window is not None:
            causal &= positions[None, :] > positions[:, None] - config.sliding_window
        for layer in model.model.layers:
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = apply_rope(attn.q_proj(h).view(len(ids), attn.num_heads, -1), cos, sin)
            k = apply_rope(attn.k_proj(h).view(len(ids), attn.num_kv_heads, -1), cos, sin)
            v = attn.v_proj(h).view(len(ids), attn.num_kv_heads, -1)
            group = attn.num_heads // attn.num_kv_heads
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            out = F.scaled_dot_product_attention(
                q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=causal, scale=attn.scale
            )
            x = x + attn.o_proj(out.transpose(0, 1).reshape(len(ids), -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return model.logits(model.model.norm(x))


SHAPES = {
    "gqa": {},
    "mqa": {"num_key_value_heads": 1},
    "mha": {"num_key_value_heads": 4},
    "odd": {"num_attention_heads": 6, "num_key_value_heads": 2, "head_dim": 24, "hidden_size": 72},
    "window": {"sliding_window": 5},
}


@pytest.mark.parametrize("shape", SHAPES)
@settings(max_examples=6, deadline=None)
@given(
    num_tokens=st.integers(1, 70),
    block_size=st.sampled_from([1, 3, 4, 16]),
    chunk=st.sampled_from([1, 5, 16, 512]),
)
def test_paged_chunked_prefill_equals_dense_attention(shape, num_tokens, block_size, chunk):
    engine = make_engine(make_model_config(**SHAPES[shape]), block_size=block_size, prefill_chunk_size=chunk)
    ids = random_ids(num_tokens, seed=num_tokens)
    torch.testing.assert_close(engine.logits(ids), dense_logits(engine.model, ids), atol=1e-5, rtol=1e-5)
    assert engine.pool_usage().num_blocks_free == engine.pool_usage().num_blocks_total


def test_mixed_batch_of_prefill_chunks_and_decodes_equals_each_sequence_alone():
    engine = make_engine(block_size=4, prefill_chunk_size=6)
    prompts = [random_ids(n, seed=n) for n in (1, 9, 23, 4)]
    seqs = [engine.add_sequence(p) for p in prompts]
    engine.step(seqs[:2])  # the first two are ahead: decoding while the others still prefill
    seqs[0].token_ids.append(17)
    per_seq = {s.seq_id: [] for s in seqs}
    while any(s.num_uncomputed_tokens for s in seqs):
        batch = [s for s in seqs if s.num_uncomputed_tokens]
        before = [s.num_computed_tokens for s in batch]
        for s, logits, n in zip(batch, engine.step(batch, all_logits=True), before, strict=True):
            per_seq[s.seq_id].append((n, logits))
    for seq in seqs:
        dense = dense_logits(engine.model, seq.token_ids)
        for start, logits in per_seq[seq.seq_id]:
            torch.testing.assert_close(logits, dense[start : start + len(logits)], atol=1e-5, rtol=1e-5)
        engine.free(seq)


@settings(max_examples=8, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=2, max_size=6), seed=st.integers(0, 1000))
def test_batched_decode_equals_decoding_each_alone(lengths, seed):
    engine = make_engine(block_size=4, prefill_chunk_size=8)
    prompts = [random_ids(n, seed=seed + i) for i, n in enumerate(lengths)]
    batched = engine.generate_batch(prompts, 12, ignore_eos=True)
    assert batched == [engine.generate(p, 12, ignore_eos=True) for p in prompts]
    assert engine.pool_usage().num_blocks_used == 0


def test_greedy_generation_equals_dense_argmax_loop():
    engine = make_engine(block_size=3)
    ids = random_ids(11)
    expected = []
    for _ in range(15):
        expected.append(int(dense_logits(engine.model, ids + expected)[-1].argmax()))
    assert engine.generate(ids, 15, ignore_eos=True) == expected


@pytest.mark.parametrize("keep", [0, 1, 3, 4, 5])
def test_rollback_then_redecode_equals_never_having_decoded(keep):
    engine = make_engine(block_size=4)
    prompt = random_ids(10)
    seq = engine.add_sequence(prompt)
    engine.prefill(seq)
    for token in random_ids(6, seed=7):  # a rejected draft: 6 tokens written into the KV
        seq.token_ids.append(token)
    engine.step([seq], all_logits=True)
    assert seq.num_computed_tokens == 16 and len(seq.block_table) == 4
    engine.truncate(seq, 10 + keep)
    assert len(seq.block_table) == -(-(10 + keep) // 4)
    assert engine.pool_usage().num_blocks_used == len(seq.block_table)
    followers = random_ids(5, seed=99)
    seq.token_ids.extend(followers)
    got = engine.step([seq], all_logits=True)[0]
    reference = dense_logits(engine.model, seq.token_ids)[-len(got) :]
    torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-5)
    engine.free(seq)
    assert engine.pool_usage().num_blocks_used == 0


def test_verify_step_returns_every_positions_logits():
    engine = make_engine(block_size=4)
    seq = engine.add_sequence(random_ids(9))
    engine.prefill(seq)
    draft = random_ids(7, seed=3)
    seq.token_ids.extend(draft)
    logits = engine.step([seq], all_logits=True)[0]
    assert logits.shape == (7, engine.config.vocab_size)
    torch.testing.assert_close(logits, dense_logits(engine.model, seq.token_ids)[-7:], atol=1e-5, rtol=1e-5)


def test_kv_bytes_per_token_follows_the_shape():
    for dtype, itemsize in ((torch.float32, 4), (torch.bfloat16, 2)):
        engine = make_engine(make_model_config(num_key_value_heads=1))
        engine.model.to(dtype)
        engine = type(engine)(engine.model, engine.tokenizer, engine.engine_config)
        config = engine.config
        assert engine.kv_bytes_per_token == 2 * config.num_hidden_layers * 1 * config.head_dim * itemsize
        assert engine.pool.kv.dtype == dtype


def _max_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def test_memory_does_not_grow_while_generating():
    engine = make_engine(block_size=16, num_blocks=64)
    pool_pointer = engine.pool.kv.data_ptr()
    prompt = random_ids(30)
    engine.generate(prompt, 300, ignore_eos=True)  # warm up allocator caches
    before = _max_rss_kib()
    for _ in range(3):
        engine.generate(prompt, 300, ignore_eos=True)
    assert engine.pool.kv.data_ptr() == pool_pointer
    assert engine.pool_usage().num_blocks_used == 0
    # Peak RSS after warm-up: a leak of even one tensor per token would add well over this.
    assert _max_rss_kib() - before < 8 * 1024


def test_running_out_of_blocks_is_a_catchable_error_that_leaks_nothing():
    engine = make_engine(block_size=4, num_blocks=5)
    with pytest.raises(OutOfBlocks):
        engine.generate(random_ids(10), 30, ignore_eos=True)
    assert engine.pool_usage().num_blocks_free == 5
    seq = engine.add_sequence(random_ids(30, seed=1))
    assert not engine.can_reserve(seq, 30)
    with pytest.raises(OutOfBlocks):
        engine.reserve(seq, 30)
    assert seq.block_table == [] and engine.pool_usage().num_blocks_free == 5


def test_prompt_longer_than_the_context_is_refused():
    engine = make_engine(make_model_config(max_position_embeddings=32))
    with pytest.raises(ValueError, match="context is 32"):
        engine.generate(random_ids(40), 4)


def test_generation_stops_at_the_context_limit():
    engine = make_engine(make_model_config(max_position_embeddings=32))
    assert len(engine.generate(random_ids(28), 50, ignore_eos=True)) == 4


def test_stop_tokens_eos_and_max_new_tokens():
    engine = make_engine()
    prompt = random_ids(8)
    free_run = engine.generate(prompt, 20, ignore_eos=True)
    stop_at = free_run[5]
    first = free_run.index(stop_at)
    assert engine.generate(prompt, 20, ignore_eos=True, stop_token_ids=[stop_at]) == free_run[: first + 1]
    assert engine.generate(prompt, 7, ignore_eos=True) == free_run[:7]
    assert engine.generate(prompt, 0) == []
    # The same token as end-of-sequence stops it unless ignore_eos.
    engine.stop_checker._eos = frozenset({stop_at})
    assert engine.generate(prompt, 20) == free_run[: first + 1]


def test_stop_strings_end_generation_once_the_text_contains_them():
    engine = make_engine()
    prompt = engine.tokenizer.encode("def add(a, b):\n")
    free_run = engine.generate(prompt, 30, ignore_eos=True)
    text = engine.tokenizer.decode(free_run)
    stop = text[10:12]
    out = engine.generate(prompt, 30, ignore_eos=True, stop_strings=[stop])
    assert stop in engine.tokenizer.decode(out)
    assert stop not in engine.tokenizer.decode(out[:-1])
    assert out == free_run[: len(out)]


def test_seeded_sampling_is_reproducible_and_topk1_is_greedy():
    engine = make_engine()
    prompt = random_ids(8)
    a = engine.generate(prompt, 20, temperature=1.5, seed=5, ignore_eos=True)
    b = engine.generate(prompt, 20, temperature=1.5, seed=5, ignore_eos=True)
    c = engine.generate(prompt, 20, temperature=1.5, seed=6, ignore_eos=True)
    assert a == b and a != c
    greedy = engine.generate(prompt, 20, ignore_eos=True)
    assert engine.generate(prompt, 20, temperature=2.0, top_k=1, seed=1, ignore_eos=True) == greedy
    assert engine.generate(prompt, 20, temperature=2.0, top_p=1e-6, seed=1, ignore_eos=True) == greedy


def test_top_p_keeps_only_the_nucleus():
    from kvmesh.engine.sampling import filter_logits

    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = filter_logits(logits, replace(SamplingParams(), temperature=1.0, top_p=0.8)).isfinite()
    assert kept.tolist() == [True, True, False, False]
    kept = filter_logits(logits, replace(SamplingParams(), temperature=1.0, top_k=3)).isfinite()
    assert kept.tolist() == [True, True, True, False]


def test_bad_sampling_parameters_name_the_field():
    for field, value in (("temperature", -1.0), ("top_p", 0.0), ("top_k", -2), ("max_new_tokens", -1)):
        with pytest.raises(ValueError, match=field):
            SamplingParams(**{field: value})
