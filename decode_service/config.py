"""Decode worker settings, read once at the process edge."""

from __future__ import annotations

from dataclasses import dataclass

from kvmesh.mesh.server import ServerConfig
from kvmesh.mesh.worker_config import ModelSettings, RegistrationSettings


@dataclass(frozen=True)
class DecodeConfig:
    server: ServerConfig
    model: ModelSettings
    registration: RegistrationSettings
    max_tokens_limit: int = 4096
    """Largest max_tokens a request may ask for."""
    require_cache_salt: bool = False
    """Refuse requests without a tenant cache salt (set when the gateway runs with multi-tenancy)."""
    metrics_port: int | None = None
    """Prometheus metrics port; None: no metrics server."""
    kv_quarantine_s: float = 2.0
    """Seconds the blocks of a cancelled shared-memory transfer stay out of the pool, so a prefill worker's
    late write can never land in blocks that another request already owns."""

    def __post_init__(self) -> None:
        # NOTE: the shm transport writes into a pool in host shared memory; a GPU pool would be a CPU copy.
        if "shm" in self.registration.transports and self.model.device != "cpu":
            raise ValueError(
                f"transport 'shm' needs the KV pool in host memory, but the device is {self.model.device!r}: "
                "offer only 'grpc' (--transports grpc) on a GPU decode worker"
            )
