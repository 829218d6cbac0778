"""Gateway settings, read once at the process edge."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.routing_cost import RoutingConfig
from kvmesh.mesh.convert import DEFAULT_MAX_STOP_STRING_CHARS, DEFAULT_MAX_STOP_STRINGS
from kvmesh.mesh.server import ServerConfig
from kvmesh.mesh.tls import TLSConfig


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
    max_stop_strings: int = DEFAULT_MAX_STOP_STRINGS
    """Most sampling.stop_strings a request may send."""
    max_stop_string_chars: int = DEFAULT_MAX_STOP_STRING_CHARS
    """Longest stop string a request may send, in characters (the per-token stop check costs this much)."""
    max_snippet_chars: int = 16384
    """Longest update snippet an Edit may send, in characters: a snippet is the changed region of a file,
    not a second copy of it."""
    max_sessions_per_tenant: int = 64
    """Editor sessions (Gateway.Session streams) one tenant may hold open at once."""
    session_idle_timeout_s: float = 600.0
    """An editor session that sends nothing for this many seconds is closed (DEADLINE_EXCEEDED)."""
    max_document_chars: int = 1_000_000
    """Longest document (and context) an editor session may hold, in characters."""
    request_timeout_s: float = 60.0
    """Deadline of a request whose client set none, in seconds."""
    refresh_ms: int = 500
    """How often the worker list is re-read from the cache store, in milliseconds."""
    unlisted_grace_ms: int = 5000
    """How long a worker stays in the pool after the cache store stops listing it, in milliseconds: long
    enough for live workers to register again with a restarted cache store (a heartbeat period and a
    reconnect), so that a restart fails no request."""
    max_attempts: int = 3
    """Tries per request when a worker is UNAVAILABLE, the first one included."""
    metrics_port: int | None = None
    """Prometheus metrics port; None: no metrics server."""
    api_keys_file: str | None = None
    """JSON file of API keys, tenants and sharing groups (gateway.tenancy); None: multi-tenancy off."""
    salt_secret_file: str | None = None
    """File holding the server secret that tenant cache salts are HMACs under (at least 32 bytes); required
    with api_keys_file. Only the path is kept here: the secret is read at start-up and never logged."""
    routing: RoutingConfig = RoutingConfig()
    """The cost model's knobs (gateway.routing_cost); it checks its own fields."""
    lookup_timeout_ms: int = 100
    """Deadline of the cache store Lookup, in milliseconds; past it the request routes by load alone."""
    tls: TLSConfig | None = None
    """The gateway's mesh identity for its channels to the cache store and the decode workers (mutual
    TLS); None: plaintext. The public port's own TLS is server.public_tls."""

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
        if self.max_stop_strings < 0 or self.max_stop_string_chars <= 0:
            raise ValueError(
                f"need max_stop_strings >= 0 ({self.max_stop_strings}) and max_stop_string_chars > 0 "
                f"({self.max_stop_string_chars})"
            )
        if self.max_request_bytes <= 0:
            raise ValueError(f"max_request_bytes must be positive, got {self.max_request_bytes}")
        if (
            self.max_sessions_per_tenant < 1
            or self.session_idle_timeout_s <= 0
            or self.max_document_chars < 1
        ):
            raise ValueError(
                "max_sessions_per_tenant, session_idle_timeout_s and max_document_chars must be positive"
            )
        if self.request_timeout_s <= 0:
            raise ValueError(f"request_timeout_s must be positive, got {self.request_timeout_s}")
        if self.refresh_ms <= 0:
            raise ValueError(f"refresh_ms must be positive, got {self.refresh_ms}")
        if self.unlisted_grace_ms < 0:
            raise ValueError(f"unlisted_grace_ms must be >= 0, got {self.unlisted_grace_ms}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.lookup_timeout_ms <= 0:
            raise ValueError(f"lookup_timeout_ms must be positive, got {self.lookup_timeout_ms}")
        if self.api_keys_file == "":
            raise ValueError("api_keys_file is empty: give a path, or leave it unset for no multi-tenancy")
        if self.api_keys_file is not None and not self.salt_secret_file:
            # NOTE: refusing is the safe choice: a salt derived from the tenant's name alone would let
            # anyone who knows the name probe that tenant's cache.
            raise ValueError(
                "api_keys_file is set but salt_secret_file is not: multi-tenancy needs a server secret "
                "that tenant cache salts derive from; write one (e.g. `openssl rand -hex 32 > salt.key`, "
                "mode 600) and set --salt-secret-file (KVMESH_SALT_SECRET_FILE)"
            )
