"""The one place that reads command-line flags and `KVMESH_*` environment variables.

Every flag has an environment twin: `--cache-store` is `KVMESH_CACHE_STORE`. A flag wins over its
variable, the variable over the default. The values become the roles' frozen config dataclasses here and
are passed down from there; nothing else in kvmesh reads the environment.

NOTE: role modules are imported inside the functions that need them: importing torch takes seconds, and
the cache store and the client commands never touch it.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvmesh.cli.options import (
    CACHE_STORE,
    ENV_PREFIX,
    PER_PROCESS_VARIABLES,
    ROLE_OPTIONS,
    ROLES,
    Option,
    SettingsError,
    resolve,
)
from kvmesh.mesh.server import ServerConfig
from kvmesh.mesh.tls import PublicTLSConfig, TLSConfig

if TYPE_CHECKING:
    from cache_store.server import CacheStoreConfig
    from decode_service.config import DecodeConfig
    from gateway.config import GatewayConfig
    from kvmesh.mesh.worker_config import ModelSettings, RegistrationSettings
    from prefill_service.config import PrefillConfig

    RoleConfig = GatewayConfig | PrefillConfig | DecodeConfig | CacheStoreConfig


@dataclass(frozen=True)
class RoleSettings:
    """What `kvmesh serve ROLE` runs."""

    role: str
    config: RoleConfig
    log_level: str
    metrics_port: int | None
    """Also inside the worker and gateway configs (their serve() starts the server); the cache store's
    config has none, so the CLI serves its metrics."""
    num_threads: int | None
    """torch threads for a worker; None for roles that run no model."""
    metrics_host: str = "127.0.0.1"
    """Interface of the metrics server (--metrics-host, else --host)."""


def role_settings(
    role: str,
    args: argparse.Namespace,
    environ: Mapping[str, str] = os.environ,
    default_model: Callable[[], str] | None = None,
) -> RoleSettings:
    """The config of one role from flags and variables. default_model gives the checkpoint when --model
    is not set (default: kvmesh.default_model_path(), which may build it). Raises SettingsError."""
    if role not in ROLE_OPTIONS:
        raise SettingsError(f"unknown role {role!r}: choose one of {', '.join(ROLES)}")
    values = resolve(ROLE_OPTIONS[role], args, environ)
    mesh_tls = _mesh_tls(values, role)
    num_threads = None
    try:
        server = ServerConfig(
            host=values["host"],
            port=values["port"],
            grace_s=values["grace_s"],
            # The gateway's own port is the public API: never mutual TLS (its channels are, below).
            tls=mesh_tls if role != "gateway" else None,
            public_tls=_public_tls(values) if role == "gateway" else None,
            health_port=values["health_port"],
            metrics_host=values["metrics_host"] or None,
        )
        if role == "cache-store":
            from cache_store.server import CacheStoreConfig

            config: Any = CacheStoreConfig(
                host=server.host,
                port=server.port,
                heartbeat_interval_ms=values["heartbeat_interval_ms"],
                expiry_ms=values["expiry_ms"],
                grace_s=server.grace_s,
                tls=server.tls,
                health_port=server.health_port,
            )
        elif role == "gateway":
            from gateway.config import GatewayConfig
            from gateway.routing_cost import RoutingConfig

            config = GatewayConfig(
                server=server,
                cache_store_address=_required(values, CACHE_STORE),
                model_path=values["model"] or _default_model(default_model),
                max_tokens_limit=values["max_tokens_limit"],
                default_max_tokens=values["default_max_tokens"],
                max_request_bytes=values["max_request_bytes"],
                max_snippet_chars=values["max_snippet_chars"],
                max_stop_strings=values["max_stop_strings"],
                max_stop_string_chars=values["max_stop_string_chars"],
                request_timeout_s=values["request_timeout_s"],
                refresh_ms=values["refresh_ms"],
                unlisted_grace_ms=values["unlisted_grace_ms"],
                max_attempts=values["max_attempts"],
                metrics_port=values["metrics_port"],
                api_keys_file=values["api_keys_file"] or None,
                salt_secret_file=values["salt_secret_file"] or None,
                routing=RoutingConfig(
                    disagg_min_tokens=values["disagg_min_tokens"],
                    decode_load_weight=values["decode_load_weight"],
                    max_load_imbalance=values["max_load_imbalance"],
                    use_prefill_min_tokens=values["use_prefill_min_tokens"],
                    transport=values["transport"],
                ),
                lookup_timeout_ms=values["lookup_timeout_ms"],
                tls=mesh_tls,
            )
        else:
            model, registration = _worker_settings(values, default_model)
            num_threads = model.num_threads
            if role == "prefill":
                from prefill_service.config import PrefillConfig

                config = PrefillConfig(
                    server,
                    model,
                    registration,
                    metrics_port=values["metrics_port"],
                    require_cache_salt=values["require_cache_salt"],
                )
            else:
                from decode_service.config import DecodeConfig

                config = DecodeConfig(
                    server,
                    model,
                    registration,
                    max_tokens_limit=values["max_tokens_limit"],
                    max_stop_strings=values["max_stop_strings"],
                    max_stop_string_chars=values["max_stop_string_chars"],
                    metrics_port=values["metrics_port"],
                    kv_quarantine_s=values["kv_quarantine_s"],
                    layerwise_transfer=values["layerwise_transfer"],
                    require_cache_salt=values["require_cache_salt"],
                )
    except ValueError as error:  # a config's own checks (__post_init__)
        raise SettingsError(f"kvmesh serve {role}: {error}") from None
    return RoleSettings(
        role, config, values["log_level"], values["metrics_port"], num_threads, server.metrics_bind_host
    )


def _mesh_tls(values: dict[str, Any], role: str) -> TLSConfig | None:
    """The role's mesh identity in --tls-dir; None without it. The files are read when the role starts."""
    return TLSConfig.in_dir(values["tls_dir"], role) if values["tls_dir"] else None


def _public_tls(values: dict[str, Any]) -> PublicTLSConfig | None:
    cert, key = values["public_tls_cert"], values["public_tls_key"]
    if bool(cert) != bool(key):
        raise SettingsError("--public-tls-cert and --public-tls-key go together: set both or neither")
    return PublicTLSConfig(cert, key) if cert else None


def _worker_settings(
    values: dict[str, Any], default_model: Callable[[], str] | None
) -> tuple[ModelSettings, RegistrationSettings]:
    from kvmesh.engine.config import EngineConfig
    from kvmesh.mesh.worker_config import ModelSettings, RegistrationSettings

    engine = EngineConfig(
        block_size=values["block_size"],
        num_blocks=values["num_blocks"],
        kv_cache_bytes=values["kv_cache_bytes"],
        prefill_chunk_size=values["prefill_chunk_size"],
        enable_prefix_caching=values["prefix_caching"],
        max_num_seqs=values["max_num_seqs"],
        max_num_batched_tokens=values["max_num_batched_tokens"],
        attention_backend=values["attention_backend"],
        cuda_graphs=values["cuda_graphs"],
    )
    model = ModelSettings(
        path=values["model"] or _default_model(default_model),
        dtype=values["dtype"],
        device=values["device"],
        num_threads=values["threads"],
        engine=engine,
    )
    if not values["transports"]:
        raise SettingsError("--transports is empty: offer at least grpc")
    registration_values: dict[str, Any] = {
        "cache_store_address": _required(values, CACHE_STORE),
        "advertise_host": values["advertise_host"],
        "worker_id": values["worker_id"],
        "transports": values["transports"],
    }
    if values["host_id"] is not None:
        registration_values["host_id"] = values["host_id"]
    return model, RegistrationSettings(**registration_values)


def _required(values: dict[str, Any], option: Option) -> Any:
    value = values[option.dest]
    if not value:
        raise SettingsError(f"{option.flag} (or {option.env}) is required")
    return value


def _default_model(default_model: Callable[[], str] | None) -> str:
    if default_model is not None:
        return default_model()
    from kvmesh import default_model_path

    return str(default_model_path())


def child_environ(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The environment for the roles `kvmesh up` starts: everything but the per-process variables."""
    dropped = {
        ENV_PREFIX + flag.removeprefix("--").replace("-", "_").upper() for flag in PER_PROCESS_VARIABLES
    }
    return {name: value for name, value in environ.items() if name not in dropped}
