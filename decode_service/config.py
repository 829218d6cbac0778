"""Decode worker settings, read once at the process edge."""

from __future__ import annotations

from dataclasses import dataclass

from kvmesh.mesh.convert import DEFAULT_MAX_STOP_STRING_CHARS, DEFAULT_MAX_STOP_STRINGS
from kvmesh.mesh.server import ServerConfig
from kvmesh.mesh.worker_config import ModelSettings, RegistrationSettings


@dataclass(frozen=True)
class DecodeConfig:
    server: ServerConfig
    model: ModelSettings
    registration: RegistrationSettings
    max_tokens_limit: int = 4096
    """Largest max_tokens a request may ask for."""
    max_stop_strings: int = DEFAULT_MAX_STOP_STRINGS
    """Most sampling.stop_strings a request may send."""
    max_stop_string_chars: int = DEFAULT_MAX_STOP_STRING_CHARS
    """Longest stop string a request may send, in characters (the per-token stop check costs this much)."""
    require_cache_salt: bool = False
    """Refuse requests without a tenant cache salt (set when the gateway runs with multi-tenancy)."""
    metrics_port: int | None = None
    """Prometheus metrics port; None: no metrics server."""
    kv_quarantine_s: float = 2.0
    """Seconds at most that the blocks of a cancelled shared-memory transfer stay out of the pool, so a prefill
    worker's late write can never land in blocks that another request already owns. They go back as soon as
    the prefill worker confirms that its writer stopped (CancelPrefill); this bound is for when it cannot."""
    layerwise_transfer: bool = True
    """Ask prefill workers to ship each layer's blocks as soon as the prompt's last chunk computed that layer
    (the transfer overlaps the compute); False: the blocks leave after the whole prompt is computed."""

    def __post_init__(self) -> None:
        if self.max_stop_strings < 0 or self.max_stop_string_chars <= 0:
            raise ValueError(
                f"need max_stop_strings >= 0 ({self.max_stop_strings}) and max_stop_string_chars > 0 "
                f"({self.max_stop_string_chars})"
            )
        # NOTE: the shm transport writes into a pool in host shared memory; a GPU pool would be a CPU copy.
        if "shm" in self.registration.transports and self.model.device != "cpu":
            raise ValueError(
                f"transport 'shm' needs the KV pool in host memory, but the device is {self.model.device!r}: "
                "offer only 'grpc' (--transports grpc) on a GPU decode worker"
            )
