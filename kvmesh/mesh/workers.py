"""What every role knows about a worker: its role, where it is, what it offers, how loaded it is."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class WorkerRole(enum.Enum):
    """What a worker does."""

    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(frozen=True)
class WorkerLoad:
    """A worker's load at its last heartbeat."""

    num_running: int = 0
    num_waiting: int = 0
    num_blocks_free: int = 0
    num_blocks_total: int = 0


@dataclass(frozen=True)
class WorkerInfo:
    """A worker as the registry knows it."""

    worker_id: str
    role: WorkerRole
    address: str
    """gRPC address, `host:port`."""
    block_size: int
    """Tokens per KV block of the worker's engine; every worker of a mesh has the same (the cache store
    refuses a worker that differs), and the gateway hashes prompts in it."""
    host_id: str = ""
    """Workers with the same host_id can use shared memory between them."""
    transports: tuple[str, ...] = ()
    load: WorkerLoad = WorkerLoad()
    model_fingerprint: str = ""
    """Identity of the model and weights the worker serves (kvmesh.engine.block_hash.model_fingerprint)."""
