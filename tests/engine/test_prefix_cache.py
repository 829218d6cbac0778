"""The prefix cache: full blocks reused by hash, LRU eviction, events, and exact outputs either way."""

from __future__ import annotations

import torch

from kvmesh.engine.block_hash import hash_blocks, namespace_hash
from kvmesh.engine.block_manager import BlockAllocator
from kvmesh.engine.config import EngineConfig
from kvmesh.engine.engine import Engine
from kvmesh.engine.kv_event import KVEventKind
from tests.factories import make_engine, make_model, make_tokenizer, random_ids


def hit_tokens(engine: Engine) -> int:
    return engine.pool.allocator.num_hit_tokens


def test_same_salt_hits_and_another_salt_misses():
    engine = make_engine(block_size=4)
    prompt = random_ids(30)
    engine.generate(prompt, 3, ignore_eos=True)
    before = hit_tokens(engine)
    seq = engine.add_sequence(prompt)
    assert hit_tokens(engine) - before == 28 == seq.num_cached_tokens  # 7 full blocks, not the last token's
    engine.free(seq)
    before = hit_tokens(engine)
    other = engine.add_sequence(prompt, cache_salt="tenant-b")
    assert hit_tokens(engine) - before == 0 and other.num_cached_tokens == 0
    engine.free(other)


def test_a_cached_prefix_gives_exactly_the_uncached_output():
    cached = make_engine(block_size=4)
    uncached = Engine(
        make_model(),
        make_tokenizer(),
        EngineConfig(block_size=4, num_blocks=256, enable_prefix_caching=False),
    )
    shared = random_ids(21)
    for tail in ([5, 6, 7], [8], random_ids(9, seed=3)):
        before = hit_tokens(cached)
        got = cached.generate(shared + tail, 12, ignore_eos=True)
        assert got == uncached.generate(shared + tail, 12, ignore_eos=True)
    assert hit_tokens(cached) - before >= 20
    assert hit_tokens(uncached) == 0


def test_whole_prompt_cached_still_computes_its_last_token():
    engine = make_engine(block_size=4)
    prompt = random_ids(16)  # exactly four blocks
    first = engine.generate(prompt, 5, ignore_eos=True)
    seq = engine.add_sequence(prompt)
    assert seq.num_cached_tokens == 12 and seq.num_uncomputed_tokens == 4
    engine.free(seq)
    assert engine.generate(prompt, 5, ignore_eos=True) == first


def test_eviction_is_least_recently_used_first_and_recorded():
    allocator = BlockAllocator(4)
    hashes = hash_blocks(namespace_hash("m"), list(range(16)), 4)
    blocks = allocator.allocate(4)
    for block, block_hash in zip(blocks, hashes, strict=True):
        allocator.cache_block(block, block_hash)
    assert [e.kind for e in allocator.take_events()] == [KVEventKind.STORED] * 4
    allocator.free([blocks[2]])
    allocator.free([blocks[0]])
    allocator.free([blocks[3], blocks[1]])
    assert allocator.eviction_order() == [blocks[2], blocks[0], blocks[3], blocks[1]]
    # Touching a block (a prefix hit) makes it the most recently used.
    assert allocator.match([hashes[0]], 4) == [blocks[0]]
    allocator.free([blocks[0]])
    assert allocator.eviction_order() == [blocks[2], blocks[3], blocks[1], blocks[0]]
    assert allocator.allocate(2) == [blocks[2], blocks[3]]
    assert sorted(allocator.inventory()) == sorted([hashes[1], hashes[0]])


def test_eviction_events_name_the_evicted_hashes_in_order():
    allocator = BlockAllocator(2)
    hashes = hash_blocks(namespace_hash("m"), list(range(8)), 4)
    blocks = allocator.allocate(2)
    for block, block_hash in zip(blocks, hashes, strict=True):
        allocator.cache_block(block, block_hash)
    allocator.free(blocks[::-1])
    allocator.take_events()
    allocator.allocate(2)
    events = allocator.take_events()
    assert [(e.kind, e.block_hashes) for e in events] == [
        (KVEventKind.REMOVED, (hashes[1],)),
        (KVEventKind.REMOVED, (hashes[0],)),
    ]
    assert allocator.inventory() == []


def test_a_prefix_evicted_before_use_is_recomputed_not_read_stale():
    engine = make_engine(block_size=4, num_blocks=12)
    prompt = random_ids(20)
    expected = engine.generate(prompt, 6, ignore_eos=True)
    # Another long request takes every block, evicting the cached prefix.
    engine.generate(random_ids(40, seed=9), 4, ignore_eos=True)
    before = hit_tokens(engine)
    assert engine.generate(prompt, 6, ignore_eos=True) == expected
    assert hit_tokens(engine) - before < 16


def test_rolling_back_into_a_shared_cached_block_copies_it_first():
    engine = make_engine(block_size=4)
    prompt = random_ids(10)
    owner = engine.add_sequence(prompt)
    engine.prefill(owner)
    owner.token_ids.extend(random_ids(6, seed=5))
    engine.step([owner], all_logits=True)  # 16 tokens: four full, cached blocks
    reader = engine.add_sequence(owner.token_ids + [3])
    assert reader.block_table == owner.block_table  # all four shared
    shared_block = owner.block_table[3]
    snapshot = engine.pool.kv[:, :, shared_block].clone()
    engine.truncate(owner, 14)  # the cut falls inside the shared fourth block
    assert owner.block_table[3] != shared_block
    owner.token_ids.extend([7, 7])
    engine.step([owner], all_logits=True)
    assert torch.equal(engine.pool.kv[:, :, shared_block], snapshot)
    engine.free(owner)
    engine.free(reader)
    assert engine.pool_usage().num_blocks_used == 0
