import pytest
import torch

from kvmesh.engine.kv_cache import BlockAllocator, KVLayout, KVPool, OutOfBlocks, num_blocks_for_bytes


def test_allocator_hands_out_lowest_ids_and_reuses_freed_ones_last_in_first_out():
    allocator = BlockAllocator(4)
    assert allocator.allocate(2) == [0, 1]
    assert allocator.allocate(1) == [2]
    allocator.free([0])
    assert allocator.allocate(2) == [0, 3]
    assert allocator.num_free == 0


def test_allocation_is_all_or_nothing():
    allocator = BlockAllocator(3)
    allocator.allocate(2)
    with pytest.raises(OutOfBlocks) as info:
        allocator.allocate(2)
    assert (info.value.num_needed, info.value.num_free) == (2, 1)
    assert allocator.num_free == 1
    assert not allocator.can_allocate(2) and allocator.can_allocate(1)


def test_shared_block_is_freed_only_by_its_last_owner():
    allocator = BlockAllocator(2)
    [block] = allocator.allocate(1)
    allocator.incref(block)
    allocator.free([block])
    assert allocator.num_free == 1 and allocator.ref_count(block) == 1
    allocator.free([block])
    assert allocator.num_free == 2
    with pytest.raises(ValueError, match="freed more often"):
        allocator.free([block])


def test_layout_bytes_per_token_is_two_layers_heads_dim_itemsize():
    layout = KVLayout(
        num_layers=32, num_blocks=1, block_size=16, num_kv_heads=8, head_dim=128, dtype=torch.float16
    )
    assert layout.bytes_per_token == 2 * 32 * 8 * 128 * 2
    assert layout.bytes_per_block == layout.bytes_per_token * 16
    assert num_blocks_for_bytes(layout, layout.bytes_per_block * 10 + 5) == 10


def test_pool_gather_scatter_round_trip_is_bit_exact():
    layout = KVLayout(3, 10, 4, 2, 8, torch.bfloat16)
    pool, other = KVPool(layout), KVPool(layout)
    pool.kv.copy_(torch.randn(layout.shape))
    other.scatter([7, 1, 4], pool.gather([2, 5, 9]))
    assert torch.equal(other.gather([7, 1, 4]), pool.gather([2, 5, 9]))
    assert pool.kv.untyped_storage().nbytes() == layout.num_bytes


def test_pool_refuses_foreign_storage_of_the_wrong_shape():
    layout = KVLayout(1, 2, 4, 1, 8, torch.float32)
    with pytest.raises(ValueError, match="layout wants"):
        KVPool(layout, storage=torch.zeros(5))
