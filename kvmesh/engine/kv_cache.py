"""The paged KV cache: one preallocated pool of fixed-size blocks, and a reference-counted allocator.

Pool layout (one tensor; `pool.layer(i)` is layer i's view):

    kv[layer, 0 = key | 1 = value, block, slot in block, kv head, head dim]

or, for multi-latent attention (`KVLayout.latent`), one vector per token and layer (`pool.latent(i)`):

    kv[layer, 0, block, slot in block, 0, kv_lora_rank + qk_rope_head_dim]

A block id indexes the same block in every layer, so a sequence needs one block table, and a
transfer ships `kv[:, :, block_ids]` as one gather.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from kvmesh.engine.block_manager import BlockAllocator, OutOfBlocks
from kvmesh.engine.model_config import ModelConfig

__all__ = ["BlockAllocator", "KVLayout", "KVPool", "OutOfBlocks", "PoolUsage", "kv_layout_for"]


@dataclass(frozen=True)
class KVLayout:
    """What a KV pool's blocks hold, and how many: two pools can exchange blocks when all but num_blocks match."""

    num_layers: int
    num_blocks: int
    block_size: int
    """Tokens per block."""
    num_kv_heads: int
    head_dim: int
    """Size of one head; for a latent layout, of the latent vector (kv_lora_rank + qk_rope_head_dim)."""
    dtype: torch.dtype
    latent: bool = False
    """Multi-latent attention: a token holds one vector per layer (num_kv_heads 1), not a K and a V."""

    @property
    def num_parts(self) -> int:
        """Vectors per token, layer and head: 2 (K and V), or 1 (a latent)."""
        return 1 if self.latent else 2

    @property
    def shape(self) -> tuple[int, int, int, int, int, int]:
        return (
            self.num_layers,
            self.num_parts,
            self.num_blocks,
            self.block_size,
            self.num_kv_heads,
            self.head_dim,
        )

    @property
    def bytes_per_token(self) -> int:
        """parts (2: K and V; 1: a latent) x layers x kv heads x head dim x dtype bytes."""
        return self.num_parts * self.num_layers * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size

    @property
    def num_bytes(self) -> int:
        return self.bytes_per_block * self.num_blocks

    def with_blocks(self, num_blocks: int) -> KVLayout:
        return replace(self, num_blocks=num_blocks)

    def describe(self) -> str:
        """One line for messages: what a block holds, e.g. 'K/V 2 heads x 64, 4 layers, 16 tokens, bfloat16'."""
        holds = (
            f"latent {self.head_dim}" if self.latent else f"K/V {self.num_kv_heads} heads x {self.head_dim}"
        )
        dtype = str(self.dtype).removeprefix("torch.")
        return f"{holds}, {self.num_layers} layers, {self.block_size} tokens per block, {dtype}"


def kv_layout_for(config: ModelConfig, block_size: int, dtype: torch.dtype, num_blocks: int = 1) -> KVLayout:
    """The KV description of a model: what each of its blocks holds (every pool and transport works from it)."""
    if config.mla is not None:
        return KVLayout(
            config.num_hidden_layers, num_blocks, block_size, 1, config.mla.latent_dim, dtype, latent=True
        )
    return KVLayout(
        config.num_hidden_layers, num_blocks, block_size, config.num_key_value_heads, config.head_dim, dtype
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
        if self.layout.latent:
            raise ValueError(f"a latent pool ({self.layout.describe()}) holds no K and V: use latent()")
        return self.kv[index, 0], self.kv[index, 1]

    def latent(self, index: int) -> torch.Tensor:
        """A latent pool's view of one layer: [num_blocks, block_size, latent dim]."""
        if not self.layout.latent:
            raise ValueError(f"a K/V pool ({self.layout.describe()}) holds no latent: use layer()")
        return self.kv[index, 0, :, :, 0]

    def gather(self, block_ids: list[int]) -> torch.Tensor:
        """A copy of the given blocks of every layer: [num_layers, parts, len(block_ids), block_size, kv_heads, head_dim]."""
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
