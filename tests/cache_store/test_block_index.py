"""BlockIndex: exact longest prefixes per worker over real chained block hashes."""

from __future__ import annotations

import pytest

from cache_store.index import BlockIndex
from kvmesh.engine.block_hash import hash_blocks, namespace_hash
from kvmesh.engine.kv_event import KVEvent, KVEventKind

BLOCK_SIZE = 4


def make_hashes(num_blocks: int, salt: str = "") -> list[bytes]:
    """Chained hashes of a prompt of num_blocks full blocks."""
    token_ids = list(range(1, num_blocks * BLOCK_SIZE + 1))
    return hash_blocks(namespace_hash("test-model", salt), token_ids, BLOCK_SIZE)


def stored(block_hashes: list[bytes]) -> KVEvent:
    return KVEvent(KVEventKind.STORED, tuple(block_hashes))


def removed(block_hashes: list[bytes]) -> KVEvent:
    return KVEvent(KVEventKind.REMOVED, tuple(block_hashes))


def make_index(**held: list[bytes]) -> BlockIndex:
    index = BlockIndex()
    for worker_id, block_hashes in held.items():
        index.apply(worker_id, stored(block_hashes))
    return index


def test_longest_prefix_per_worker_stops_at_the_first_gap() -> None:
    prompt = make_hashes(6)
    index = make_index(
        w_all=prompt,
        w_three=prompt[:3],
        w_gap=[*prompt[:2], *prompt[3:]],  # holds 4 of 6 blocks, but only 2 lead
        w_tail=prompt[1:],  # no first block: no prefix at all
    )
    assert index.longest_prefixes(prompt) == {"w_all": 6, "w_three": 3, "w_gap": 2}
    assert index.longest_prefixes(prompt[:2]) == {"w_all": 2, "w_three": 2, "w_gap": 2}
    assert (index.num_hashes, index.num_workers) == (6, 4)


def test_a_different_prompt_or_tenant_matches_nothing() -> None:
    index = make_index(w0=make_hashes(4))
    assert index.longest_prefixes(make_hashes(4, salt="other-tenant")) == {}
    assert index.longest_prefixes([]) == {}


def test_removed_hashes_shorten_the_prefix() -> None:
    prompt = make_hashes(5)
    index = make_index(w0=prompt, w1=prompt)
    index.apply("w0", removed([prompt[2], make_hashes(1, salt="never-stored")[0]]))
    assert index.longest_prefixes(prompt) == {"w0": 2, "w1": 5}
    index.apply("w1", removed(prompt))
    assert index.longest_prefixes(prompt) == {"w0": 2}
    assert (index.num_hashes, index.num_workers) == (4, 1)


def test_cleared_takes_all_of_one_workers_hashes() -> None:
    prompt = make_hashes(3)
    index = make_index(w0=prompt, w1=prompt[:1])
    index.apply("w0", KVEvent(KVEventKind.CLEARED))
    assert index.longest_prefixes(prompt) == {"w1": 1}
    assert (index.num_hashes, index.num_workers) == (1, 1)
    with pytest.raises(ValueError, match="CLEARED"):
        KVEvent(KVEventKind.CLEARED, tuple(prompt[:1]))


def test_stored_again_is_idempotent() -> None:
    prompt = make_hashes(3)
    index = make_index(w0=prompt)
    index.apply("w0", stored(prompt[:2]))
    index.apply("w0", stored([]))
    index.apply("w1", stored([]))
    assert index.longest_prefixes(prompt) == {"w0": 3}
    assert (index.num_hashes, index.num_workers) == (3, 1)


def test_drop_worker_leaves_no_trace() -> None:
    prompt = make_hashes(4)
    index = make_index(w0=prompt, w1=prompt[:2])
    index.drop_worker("w0")
    index.drop_worker("never-seen")
    assert index.longest_prefixes(prompt) == {"w1": 2}
    index.drop_worker("w1")
    assert (index.num_hashes, index.num_workers) == (0, 0)
    assert index.longest_prefixes(prompt) == {}


def test_live_filter_hides_workers_without_changing_the_index() -> None:
    prompt = make_hashes(4)
    index = make_index(w0=prompt, w1=prompt[:3], w2=prompt[:1])
    assert index.longest_prefixes(prompt, live={"w1", "w2", "w9"}) == {"w1": 3, "w2": 1}
    assert index.longest_prefixes(prompt, live=set()) == {}
    assert index.longest_prefixes(prompt) == {"w0": 4, "w1": 3, "w2": 1}


def test_many_workers_and_a_long_prompt() -> None:
    prompt = make_hashes(400)
    # Worker i holds the first 10 * i blocks, plus the last block (a hit after its gap).
    index = make_index(**{f"w{i:02d}": [*prompt[: 10 * i], prompt[-1]] for i in range(41)})
    expected = {f"w{i:02d}": 10 * i for i in range(1, 41)}
    assert index.longest_prefixes(prompt) == expected
