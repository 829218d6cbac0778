"""The block index: which worker holds which KV block hash, fed by the workers' KV events.

Soft state, like the registry: a worker re-sends its whole inventory (CLEARED, then STORED) whenever its
event stream (re)connects, so a lost index is rebuilt without asking anyone. The index holds hashes only,
never tokens or text; it trusts its caller to have checked them (the service edge does).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from kvmesh.engine.kv_event import KVEvent, KVEventKind

_NO_WORKERS: frozenset[str] = frozenset()


class BlockIndex:
    """Block hash -> workers holding it, and worker -> its hashes.

    The two maps always mirror each other, and neither keeps an empty set: a hash no worker holds, or a
    worker holding no hash, has no key. Not thread-safe: the cache store calls it from its event loop.
    """

    def __init__(self) -> None:
        self._workers_by_hash: dict[bytes, set[str]] = {}
        self._hashes_by_worker: dict[str, set[bytes]] = {}

    @property
    def num_hashes(self) -> int:
        """Distinct hashes held by at least one worker."""
        return len(self._workers_by_hash)

    @property
    def num_workers(self) -> int:
        """Workers holding at least one hash."""
        return len(self._hashes_by_worker)

    def apply(self, worker_id: str, event: KVEvent) -> None:
        """Applies one KV event of worker_id to the index.

        STORED adds the hashes to the worker (already held ones stay); REMOVED takes them away (ones it
        does not hold are ignored: the index is soft state and may never have seen them stored);
        CLEARED takes all of the worker's hashes.
        """
        if event.kind is KVEventKind.STORED:
            self._store(worker_id, event.block_hashes)
        elif event.kind is KVEventKind.REMOVED:
            self._remove(worker_id, event.block_hashes)
        else:
            self.drop_worker(worker_id)

    def drop_worker(self, worker_id: str) -> None:
        """Takes every hash of worker_id out of the index (it cleared its cache, died or expired)."""
        for block_hash in self._hashes_by_worker.pop(worker_id, ()):
            holders = self._workers_by_hash[block_hash]
            holders.discard(worker_id)
            if not holders:
                del self._workers_by_hash[block_hash]

    def longest_prefixes(self, block_hashes: Sequence[bytes], live: set[str] | None = None) -> dict[str, int]:
        """For each worker, how many leading hashes of block_hashes it holds; does not change the index.

        A worker's prefix ends at its first miss, even if it holds later hashes (chained hashes make a
        later hit without the blocks before it useless). Only workers holding the first hash appear.
        live: only these workers count (None: every worker in the index).
        """
        if not block_hashes:
            return {}
        first = self._workers_by_hash.get(block_hashes[0])
        if not first:
            return {}
        matching = first & live if live is not None else set(first)
        num_blocks: dict[str, int] = {}
        # NOTE: the candidates only shrink, so the walk ends at the first hash none of them holds: a
        # miss costs one dict lookup, and the whole walk at most len(block_hashes) set differences.
        for position in range(1, len(block_hashes)):
            if not matching:
                return num_blocks
            missed = matching - self._workers_by_hash.get(block_hashes[position], _NO_WORKERS)
            for worker_id in missed:
                num_blocks[worker_id] = position
            matching -= missed
        for worker_id in matching:
            num_blocks[worker_id] = len(block_hashes)
        return num_blocks

    def _store(self, worker_id: str, block_hashes: Iterable[bytes]) -> None:
        held = self._hashes_by_worker.setdefault(worker_id, set())
        for block_hash in block_hashes:
            held.add(block_hash)
            self._workers_by_hash.setdefault(block_hash, set()).add(worker_id)
        if not held:  # a STORED event with no hashes must not leave an empty entry behind
            del self._hashes_by_worker[worker_id]

    def _remove(self, worker_id: str, block_hashes: Iterable[bytes]) -> None:
        held = self._hashes_by_worker.get(worker_id)
        if held is None:
            return
        for block_hash in block_hashes:
            if block_hash not in held:
                continue
            held.discard(block_hash)
            holders = self._workers_by_hash[block_hash]
            holders.discard(worker_id)
            if not holders:
                del self._workers_by_hash[block_hash]
        if not held:
            del self._hashes_by_worker[worker_id]
