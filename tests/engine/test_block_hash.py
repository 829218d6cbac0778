"""Fixed test vectors: any role, in any language, must compute exactly these."""

from kvmesh.engine.block_hash import hash_block, hash_blocks, namespace_hash


def test_namespace_vectors():
    assert namespace_hash("m").hex() == NAMESPACE_M
    assert namespace_hash("m", "tenant-a").hex() == NAMESPACE_M_TENANT_A


def test_block_vectors():
    parent = namespace_hash("m")
    assert hash_block(parent, [1, 2, 3, 4]).hex() == BLOCK_1234
    assert [h.hex() for h in hash_blocks(parent, [1, 2, 3, 4, 5, 6, 7, 8, 9], 4)] == [BLOCK_1234, BLOCK_5678]


def test_length_prefixed_namespace_fields_cannot_meet():
    assert namespace_hash("m", "org_1", "2345") != namespace_hash("m", "org_12345", "")
    assert namespace_hash("m", "", "x") != namespace_hash("m", "x", "")


def test_only_full_blocks_are_hashed_and_chains_continue():
    ns = namespace_hash("m")
    ids = list(range(1, 12))
    full = hash_blocks(ns, ids, 4)
    assert len(full) == 2
    assert hash_blocks(full[0], ids, 4, start=1) == full[1:]
    assert hash_blocks(ns, ids[:3], 4) == []


def test_a_changed_token_changes_its_block_and_every_later_block():
    ns = namespace_hash("m")
    a = hash_blocks(ns, list(range(16)), 4)
    b = hash_blocks(ns, [*range(5), 99, *range(6, 16)], 4)
    assert a[0] == b[0] and all(x != y for x, y in zip(a[1:], b[1:], strict=True))


NAMESPACE_M = "64254b6c4d194b384f0c13194cd0f4b368f03b9630808da86535e853c8b2d5aa"
NAMESPACE_M_TENANT_A = "fe7e5641b4cc99b4ca6b15adcad26704bb007ede486d76fd7846f1ecf478b5cb"
BLOCK_1234 = "c2f4e1bdcfbd36b396d724be5c423ee44ee0e2dd7505668f32c7ee21a870081f"
BLOCK_5678 = "9264107be0c9d8ed401cd93bd66502f138695855f4644213bb6ef66fdc598c50"
