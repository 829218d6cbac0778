"""Reference-counted KV block ids, with a prefix cache: full blocks stay findable by hash after use.

A block is in one of three states:
- free: on the free stack, holding nothing anyone wants;
- in use: reference count >= 1 (owned by sequences; a shared prefix has several owners);
- cached: reference count 0 but still holding a hashed, full block of KV, findable by `match`, and
  evicted least-recently-used first when `allocate` runs out of free blocks.

Every change to what is findable is recorded as a KV event (STORED, REMOVED), which workers
publish to the cache store.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

from kvmesh.engine.kv_event import KVEvent, KVEventKind


class OutOfBlocks(RuntimeError):
    """The pool has fewer free blocks than a request needs. Nothing was allocated."""

    def __init__(self, num_needed: int, num_free: int) -> None:
        super().__init__(f"KV pool exhausted: {num_needed} blocks needed, {num_free} free")
        self.num_needed = num_needed
        self.num_free = num_free


class BlockAllocator:
    """`can_allocate` / `allocate` / `free` hand out blocks; `match` / `cache_block` are the prefix cache.

    `allocate` is all-or-nothing. Not thread-safe, except `take_events` and `inventory`, which a
    publisher may call from another thread while the engine runs.
    """

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        # NOTE: a stack of free ids; the lowest ids are handed out first, which keeps tests' block ids exact.
        self._free_stack: list[int] = list(range(num_blocks - 1, -1, -1))
        self._ref_counts: list[int] = [0] * num_blocks
        self._hash_of_block: list[bytes | None] = [None] * num_blocks
        self._block_of_hash: dict[bytes, int] = {}
        self._evictable: OrderedDict[int, None] = OrderedDict()
        """Cached blocks nobody uses, least recently used first."""
        self._events: list[KVEvent] = []
        self._events_lock = threading.Lock()
        self.num_queried_tokens = 0
        """Prompt tokens looked up in the prefix cache (prometheus-style counter)."""
        self.num_hit_tokens = 0
        """Of those, tokens found cached."""

    # ---- allocation ---------------------------------------------------------------------------

    @property
    def num_free(self) -> int:
        """Blocks `allocate` can hand out: free ones plus cached ones nobody uses."""
        return len(self._free_stack) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        """Blocks findable by hash (in use or not)."""
        return len(self._block_of_hash)

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.num_free

    def allocate(self, num_blocks: int) -> list[int]:
        """Take `num_blocks` blocks with a reference count of one, evicting cached blocks (LRU) when no free
        block is left. Raises OutOfBlocks, taking none."""
        if num_blocks > self.num_free:
            raise OutOfBlocks(num_blocks, self.num_free)
        block_ids = []
        for _ in range(num_blocks):
            if self._free_stack:
                block_id = self._free_stack.pop()
            else:
                block_id, _ = self._evictable.popitem(last=False)
                self._forget(block_id)
            self._ref_counts[block_id] = 1
            block_ids.append(block_id)
        return block_ids

    def incref(self, block_id: int) -> None:
        """Share an allocated block with another owner."""
        if self._ref_counts[block_id] <= 0:
            raise ValueError(f"block {block_id} is not allocated")
        self._ref_counts[block_id] += 1

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference to each block. At zero, a cached block stays findable (most recently used
        last in the eviction order); any other block returns to the free stack."""
        for block_id in block_ids:
            count = self._ref_counts[block_id]
            if count <= 0:
                raise ValueError(f"block {block_id} freed more often than allocated")
            self._ref_counts[block_id] = count - 1
            if count == 1:
                if self._hash_of_block[block_id] is not None:
                    self._evictable[block_id] = None
                else:
                    self._free_stack.append(block_id)

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    # ---- the prefix cache -----------------------------------------------------------------------

    def match(self, block_hashes: Sequence[bytes], block_size: int) -> list[int]:
        """The blocks holding the longest cached prefix of `block_hashes`, each now referenced once more
        by the caller (who frees them like allocated blocks). Counts the query in the hit counters."""
        self.num_queried_tokens += len(block_hashes) * block_size
        if not self.enable_caching:
            return []
        block_ids = []
        for block_hash in block_hashes:
            block_id = self._block_of_hash.get(block_hash)
            if block_id is None:
                break
            if self._ref_counts[block_id] == 0:
                del self._evictable[block_id]
            self._ref_counts[block_id] += 1
            block_ids.append(block_id)
        self.num_hit_tokens += len(block_ids) * block_size
        return block_ids

    def cache_block(self, block_id: int, block_hash: bytes) -> None:
        """Make an in-use, full block findable by its hash. A hash already held by another block keeps
        that block (two requests computed the same prefix at once); this one is then not cached."""
        if not self.enable_caching or block_hash in self._block_of_hash:
            return
        if self._hash_of_block[block_id] is not None:
            raise ValueError(f"block {block_id} is already cached")
        self._hash_of_block[block_id] = block_hash
        with self._events_lock:
            self._block_of_hash[block_hash] = block_id
            self._events.append(KVEvent(KVEventKind.STORED, (block_hash,)))

    def uncache_block(self, block_id: int) -> None:
        """Stop finding an in-use block by hash (its KV is about to change, as when a rollback rewrites it)."""
        if self._hash_of_block[block_id] is not None:
            self._forget(block_id)

    def is_cached(self, block_id: int) -> bool:
        return self._hash_of_block[block_id] is not None

    def eviction_order(self) -> list[int]:
        """Cached, unused blocks, the next to be evicted first."""
        return list(self._evictable)

    def _forget(self, block_id: int) -> None:
        block_hash = self._hash_of_block[block_id]
        assert block_hash is not None
        self._hash_of_block[block_id] = None
        with self._events_lock:
            del self._block_of_hash[block_hash]
            self._events.append(KVEvent(KVEventKind.REMOVED, (block_hash,)))

    # ---- events for the cache store -------------------------------------------------------------

    def take_events(self) -> list[KVEvent]:
        """Events since the last call, oldest first (and forgets them)."""
        with self._events_lock:
            events, self._events = self._events, []
        return events

    def inventory(self) -> list[bytes]:
        """Every block hash findable now."""
        with self._events_lock:
            return list(self._block_of_hash)
