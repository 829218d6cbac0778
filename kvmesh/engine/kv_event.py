"""KV events: changes to the set of block hashes a worker holds.

The engine's prefix cache records them, workers publish them (kvmesh.mesh.kv_events) and the cache
store applies them to its block index: one type all the way. NOTE: no torch here; the cache store
imports this module.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class KVEventKind(enum.Enum):
    """What happened to a worker's cached blocks."""

    STORED = "stored"
    """The worker now holds these hashes."""
    REMOVED = "removed"
    """The worker evicted these hashes."""
    CLEARED = "cleared"
    """The worker holds no block any more; carries no hashes."""


@dataclass(frozen=True)
class KVEvent:
    """One change to a worker's cached blocks."""

    kind: KVEventKind
    """What happened."""
    block_hashes: tuple[bytes, ...] = ()
    """Chained block hashes (kvmesh.engine.block_hash), 32 bytes each, in prompt order; empty for CLEARED."""

    def __post_init__(self) -> None:
        # Checked where the event is made, rather than on the wire or in the index much later.
        if self.kind is KVEventKind.CLEARED and self.block_hashes:
            raise ValueError("a CLEARED event carries no block hashes")
