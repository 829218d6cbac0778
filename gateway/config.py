"""Gateway settings, read once at the process edge."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.routing_cost import RoutingConfig
from kvmesh.mesh.server import ServerConfig


@dataclass(frozen=True)
class GatewayConfig:
    """The gateway's settings; the block size is not one of them: the gateway uses the workers'."""

    server: ServerConfig
    """Where the public gRPC server listens."""
    cache_store_address: str
    """host:port of the cache store, where the gateway learns the live workers."""
    model_path: str
    """Checkpoint directory; the gateway reads only its tokenizer.json and config.json, never the weights."""
    max_tokens_limit: int = 1024
    """Largest sampling.max_tokens a request may ask for, in tokens."""
    default_max_tokens: int = 64
    """Tokens generated when a request leaves sampling.max_tokens at 0."""
    max_request_bytes: int = 1024 * 1024
    """Largest serialized request accepted, in bytes."""
    max_snippet_chars: int = 16384
    """Longest update snippet an Edit may send, in characters: a snippet is the changed region of a file,
    not a second copy of it."""
    request_timeout_s: float = 60.0
    """Deadline of a request whose client set none, in seconds."""
    refresh_ms: int = 500
    """How often the worker list is re-read from the cache store, in milliseconds."""
    max_attempts: int = 3
    """Tries per request when a worker is UNAVAILABLE, the first one included."""
    metrics_port: int | None = None
    """Prometheus metrics port; None: no metrics server."""
    api_keys_file: str | None = None
    """JSON file of API keys, tenants and sharing groups (gateway.tenancy); None: multi-tenancy off."""
    routing: RoutingConfig = RoutingConfig()
    """The cost model's knobs (gateway.routing_cost); it checks its own fields."""
    lookup_timeout_ms: int = 100
    """Deadline of the cache store Lookup, in milliseconds; past it the request routes by load alone."""

    def __post_init__(self) -> None:
        if not self.cache_store_address:
            raise ValueError("cache_store_address is empty: set the cache store's host:port")
        if not 0 < self.default_max_tokens <= self.max_tokens_limit:
            raise ValueError(
                f"need 0 < default_max_tokens ({self.default_max_tokens}) <= "
                f"max_tokens_limit ({self.max_tokens_limit})"
            )
        if self.max_snippet_chars <= 0:
            raise ValueError(f"max_snippet_chars must be positive, got {self.max_snippet_chars}")
        if self.max_request_bytes <= 0:
            raise ValueError(f"max_request_bytes must be positive, got {self.max_request_bytes}")
        if self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be positive, got {self.request_timeout_s}")
        if self.refresh_ms <= 0:
            raise ValueError(f"refresh_ms must be positive, got {self.refresh_ms}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.lookup_timeout_ms <= 0:
            raise ValueError(f"lookup_timeout_ms must be positive, got {self.lookup_timeout_ms}")
        if self.api_keys_file == "":
            raise ValueError("api_keys_file is empty: give a path, or leave it unset for no multi-tenancy")
