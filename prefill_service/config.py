"""Prefill worker settings, read once at the process edge."""

from __future__ import annotations

from dataclasses import dataclass

from kvmesh.mesh.server import ServerConfig
from kvmesh.mesh.worker_config import ModelSettings, RegistrationSettings


@dataclass(frozen=True)
class PrefillConfig:
    server: ServerConfig
    model: ModelSettings
    registration: RegistrationSettings
    require_cache_salt: bool = False
    """Refuse requests without a tenant cache salt (set when the gateway runs with multi-tenancy)."""
    metrics_port: int | None = None
    """Prometheus metrics port; None: no metrics server."""
