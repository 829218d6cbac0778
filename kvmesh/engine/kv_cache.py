"""The paged KV cache: one preallocated pool of fixed-size blocks, and a reference-counted allocator.

Pool layout (one tensor; `pool.layer(i)` is layer i's view):

    kv[layer, 0 = key | 1 = value, block, slot in block, kv head, head dim]

A block id indexes the same block in every layer, so a sequence needs one block table, and a
transfer ships `kv[:, :, block_ids]` as one gather.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvmesh.engine.block_manager import BlockAllocator, OutOfBlocks

__all__ = ["BlockAllocator", "KVLayout", "KVPool", "OutOfBlocks", "PoolUsage"]


@dataclass(frozen=True)
class KVLayout:
    """The shape and dtype of a KV pool; two pools can exchange blocks when their layouts match."""

    num_layers: int
    num_blocks: int
    block_size: int
    """Tokens per block."""
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, int, int, int, int, int]:
        return (self.num_layers, 2, self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    @property
    def bytes_per_token(self) -> int:
        """2 (K and V) x layers x kv heads x head dim x dtype bytes."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size

    @property
    def num_bytes(self) -> int:
        return self.bytes_per_block * self.num_blocks

    def with_blocks(self, num_blocks: int) -> KVLayout:
        return KVLayout(
            self.num_layers, num_blocks, self.block_size, self.num_kv_heads, self.head_dim, self.dtype
        )


class KVPool:
    """The preallocated KV tensor of a worker plus its allocator.

    `storage`, when given, is a tensor of `layout.shape` that someone else allocated (shared memory, a
    CUDA IPC mapping); otherwise the pool allocates it. The tensor is never reallocated.
    """

    def __init__(
        self,
        layout: KVLayout,
        device: torch.device | str = "cpu",
        storage: torch.Tensor | None = None,
        enable_caching: bool = True,
    ):
        if storage is None:
            storage = torch.zeros(layout.shape, dtype=layout.dtype, device=device)
        elif tuple(storage.shape) != layout.shape or storage.dtype != layout.dtype:
            raise ValueError(
                f"storage is {tuple(storage.shape)} {storage.dtype}, layout wants {layout.shape} {layout.dtype}"
            )
        self.layout = layout
        self.kv = storage
        self.allocator = BlockAllocator(layout.num_blocks, enable_caching)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(key, value) views of one layer, each [num_blocks, block_size, num_kv_heads, head_dim]."""
        return self.kv[index, 0], self.kv[index, 1]

    def gather(self, block_ids: list[int]) -> torch.Tensor:
        """A copy of the given blocks of every layer: [num_layers, 2, len(block_ids), block_size, kv_heads, head_dim]."""
        return self.kv[:, :, block_ids]

    def scatter(self, block_ids: list[int], blocks: torch.Tensor) -> None:
        """Write blocks shaped like `gather`'s result into the given block ids."""
        self.kv[:, :, block_ids] = blocks.to(device=self.kv.device, dtype=self.kv.dtype)

    def usage(self) -> PoolUsage:
        return PoolUsage(self.layout.num_blocks, self.allocator.num_used, self.allocator.num_free)


@dataclass(frozen=True)
class PoolUsage:
    num_blocks_total: int
    num_blocks_used: int
    num_blocks_free: int


def num_blocks_for_bytes(layout: KVLayout, num_bytes: int) -> int:
    """How many blocks of `layout` fit in a byte budget."""
    return max(0, num_bytes // layout.bytes_per_block)


def num_blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    return (num_tokens + block_size - 1) // block_size
