"""Registry of live workers: register, heartbeat, expire, list by role.

Soft state: losing it is harmless, because a worker whose heartbeat comes back `known=False`
registers again.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

from kvmesh.mesh.workers import WorkerInfo, WorkerLoad, WorkerRole


class IncompatibleWorker(ValueError):
    """A worker cannot join the mesh its live workers form (the message says why); nothing changed."""


@dataclass
class _Record:
    worker: WorkerInfo
    last_seen_s: float
    """Clock time of the last register or heartbeat, in seconds."""


class WorkerRegistry:
    """Live workers by id.

    A worker is live for expiry_ms after its last register or heartbeat. list_workers never returns an
    expired worker even between sweeps; expire() only frees the memory and reports who went away.
    """

    def __init__(self, expiry_ms: int, clock: Callable[[], float] = time.monotonic) -> None:
        """clock returns seconds (monotonic); tests pass a fake one."""
        if expiry_ms <= 0:
            raise ValueError(f"expiry_ms must be positive, got {expiry_ms}")
        self._expiry_s = expiry_ms / 1000.0
        self._clock = clock
        self._records: dict[str, _Record] = {}

    def register(self, worker: WorkerInfo) -> None:
        """Adds the worker, or replaces the record with the same worker_id (a restarted worker).

        Replacing is not going away: expire() will not report the old record. Raises IncompatibleWorker
        when the other live workers have another block size: the gateway hashes every prompt in one.
        """
        # The live workers share one block size: this check admitted each of them.
        others = [w for w in self.list_workers() if w.worker_id != worker.worker_id]
        if others and others[0].block_size != worker.block_size:
            raise IncompatibleWorker(
                f"worker {worker.worker_id} has block_size {worker.block_size}, the mesh's workers have "
                f"{others[0].block_size}: give every worker the same --block-size"
            )
        self._records[worker.worker_id] = _Record(worker, self._clock())

    def heartbeat(self, worker_id: str, load: WorkerLoad) -> bool:
        """Renews a live worker and updates its load; False when the worker is unknown or expired."""
        record = self._records.get(worker_id)
        now = self._clock()
        if record is None or self._is_expired(record, now):
            # NOTE: an expired worker must re-register rather than come back silently: the store may
            # have dropped what it knew about it, and re-registering makes it re-send its inventory.
            # The record stays for expire() to remove, so that whoever follows expire() (the block
            # index) hears of every worker that goes away.
            return False
        record.worker = dataclasses.replace(record.worker, load=load)
        record.last_seen_s = now
        return True

    def expire(self) -> list[str]:
        """Drops the workers whose heartbeat is overdue; returns their ids.

        The only way a worker leaves the registry, so the caller learns of every departure here.
        """
        now = self._clock()
        expired = [worker_id for worker_id, r in self._records.items() if self._is_expired(r, now)]
        for worker_id in expired:
            del self._records[worker_id]
        return expired

    def is_live(self, worker_id: str) -> bool:
        """True when worker_id is registered and not expired."""
        record = self._records.get(worker_id)
        return record is not None and not self._is_expired(record, self._clock())

    def live_worker_ids(self) -> set[str]:
        """Ids of the registered, unexpired workers."""
        now = self._clock()
        return {worker_id for worker_id, r in self._records.items() if not self._is_expired(r, now)}

    def list_workers(self, role: WorkerRole | None = None) -> list[WorkerInfo]:
        """Live workers of one role (None: all), ordered by worker_id."""
        now = self._clock()
        return [
            r.worker
            for _, r in sorted(self._records.items())
            if not self._is_expired(r, now) and (role is None or r.worker.role == role)
        ]

    def _is_expired(self, record: _Record, now: float) -> bool:
        return now - record.last_seen_s > self._expiry_s
