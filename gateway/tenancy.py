"""Who is calling, and which cache salt that gives: API key -> tenant -> sharing group -> salt.

The salt is part of every block hash's namespace (kvmesh.engine.block_hash), so two tenants never see each
other's KV, and tenants of one sharing group share theirs. The gateway alone chooses it: a client sends a
key, never a salt (anything it sends as a salt is ignored).

Keys file (JSON), loaded once at start-up:

    {"keys": {"<api key>": "<tenant>", ...}, "groups": {"<tenant>": "<group>", ...}}

A tenant left out of "groups" is in the group of its own name. Without a keys file multi-tenancy is off: no key is asked for and the salt is "".

A salt is HMAC-SHA256 of the group's name under a server secret (a file, `--salt-secret-file`), so knowing
a tenant's name is not enough to compute its salt and probe its cache. Multi-tenancy without a secret is
refused at start-up. Rotating the secret changes every salt: every cache entry of every tenant becomes
unreachable at once, and the old blocks age out of the workers' pools (LRU) like any unused block.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

from kvmesh.mesh.errors import ServiceError

SALT_VERSION = b"kvmesh-tenant-salt-v2"
"""v2: HMAC under the server secret (v1 was a plain SHA-256 of the name, computable by anyone)."""
MIN_SECRET_BYTES = 32
"""Shortest salt secret accepted: 256 bits, the HMAC-SHA256 key size (`openssl rand -hex 32` gives 64)."""

Metadata = Sequence[tuple[str, str | bytes]]
"""gRPC invocation metadata: (lowercase key, value) pairs."""


class SaltSecret:
    """The server secret that tenant salts are derived under. Its repr and str never show it."""

    __slots__ = ("_key",)

    def __init__(self, key: bytes) -> None:
        """Raises ValueError (never quoting the key) for a key shorter than MIN_SECRET_BYTES."""
        if len(key) < MIN_SECRET_BYTES:
            raise ValueError(
                f"the salt secret is {len(key)} bytes, fewer than {MIN_SECRET_BYTES}: "
                "write a random one, e.g. `openssl rand -hex 32`"
            )
        self._key = key

    @classmethod
    def load(cls, path: str | Path) -> SaltSecret:
        """Reads a secret file (surrounding whitespace, such as the newline `echo` adds, is not part of it).
        Raises OSError when it cannot be read, ValueError when it is too short; neither quotes it."""
        path = Path(path)
        try:
            return cls(path.read_bytes().strip())
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None

    def __repr__(self) -> str:
        return "SaltSecret(<redacted>)"

    __str__ = __repr__

    def salt(self, tenant: str, group: str | None = None) -> str:
        """See tenant_salt."""
        fields = (SALT_VERSION, (group or tenant).encode())
        message = b"".join(struct.pack("<Q", len(f)) + f for f in fields)
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()


def tenant_salt(secret: SaltSecret, tenant: str, group: str | None = None) -> str:
    """The cache salt of a tenant: HMAC-SHA256, under the server secret, of its group's name.

    A tenant not put in a group is in the group of its own name, so "groups": {"org_c": "org_a"} gives
    org_c the cache of tenant org_a. Fields are length-prefixed: no two names meet.
    """
    return secret.salt(tenant, group)


@dataclass(frozen=True)
class Identity:
    """The caller, as the gateway authenticated it."""

    tenant: str
    """Tenant name from the keys file; "" when multi-tenancy is off."""
    cache_salt: str
    """Block-hash namespace salt for this caller's requests; "" when multi-tenancy is off."""


ANONYMOUS = Identity(tenant="", cache_salt="")


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    seen: dict[str, object] = {}
    for name, value in pairs:
        if name in seen:
            # NOTE: the name may be an API key: say where, never what.
            raise ValueError("a name appears twice in one JSON object (an API key or a tenant); remove one")
        seen[name] = value
    return seen


class TenantKeys:
    """The keys file: API keys by SHA-256 digest, each with its tenant's identity.

    Keys are kept only as digests: comparing equal-length digests with hmac.compare_digest, against every
    key without stopping at a match, takes the same time whichever key (if any) was presented.
    """

    def __init__(
        self, keys: Mapping[str, str], secret: SaltSecret, groups: Mapping[str, str] | None = None
    ) -> None:
        """keys: API key -> tenant; secret: what salts derive from; groups: tenant -> sharing group.
        Raises ValueError (never quoting a key)."""
        groups = dict(groups or {})
        if not keys:
            raise ValueError('"keys" is empty: with multi-tenancy on, give at least one API key')
        tenants = set()
        for i, (key, tenant) in enumerate(keys.items()):
            if not isinstance(key, str) or not key.strip():
                raise ValueError(f"API key number {i + 1} is empty")
            if not isinstance(tenant, str) or not tenant:
                raise ValueError(f"API key number {i + 1} maps to an empty tenant name")
            tenants.add(tenant)
        for tenant, group in groups.items():
            if tenant not in tenants:
                raise ValueError(f'"groups" names tenant {tenant!r}, which has no API key')
            if not isinstance(group, str) or not group:
                raise ValueError(f'"groups" gives tenant {tenant!r} an empty group name')
        self._entries = [
            (_digest(key), Identity(tenant, tenant_salt(secret, tenant, groups.get(tenant))))
            for key, tenant in keys.items()
        ]

    @classmethod
    def load(cls, path: str | Path, secret: SaltSecret) -> TenantKeys:
        """Reads a keys file. Raises OSError when it cannot be read, ValueError when it is malformed."""
        path = Path(path)
        try:
            document = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicates)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path} is not valid JSON (line {error.lineno}, column {error.colno})"
            ) from None
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None
        if not isinstance(document, dict) or not isinstance(document.get("keys"), dict):
            raise ValueError(f'{path} must hold an object with "keys": {{"<api key>": "<tenant>"}}')
        groups = document.get("groups", {})
        if not isinstance(groups, dict):
            raise ValueError(f'{path}: "groups" must be an object {{"<tenant>": "<group>"}}')
        unknown = set(document) - {"keys", "groups"}
        if unknown:
            raise ValueError(f"{path}: unknown field(s) {', '.join(sorted(unknown))}; expected keys, groups")
        try:
            return cls(document["keys"], secret, groups)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None

    @property
    def num_keys(self) -> int:
        return len(self._entries)

    def identify(self, key: str) -> Identity | None:
        """The identity that key belongs to; None for an unknown key. Constant time in the key."""
        digest = _digest(key)
        # Every entry is compared, whether or not an earlier one matched.
        matches = [identity for entry, identity in self._entries if hmac.compare_digest(digest, entry)]
        return matches[0] if matches else None


def _unauthenticated(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAUTHENTICATED, message)


def presented_key(metadata: Metadata) -> str | None:
    """The API key in call metadata (`authorization: Bearer <key>` or `x-api-key: <key>`); None if none.

    Raises ServiceError (UNAUTHENTICATED) for a malformed authorization header, or two different keys.
    """
    found: list[str] = []
    for name, value in metadata:
        if isinstance(value, bytes):
            continue  # binary (-bin) headers carry no key
        name = name.lower()
        if name == "authorization":
            scheme, _, credentials = value.strip().partition(" ")
            if scheme.lower() != "bearer" or not credentials.strip():
                raise _unauthenticated('the authorization header must read "Bearer <api key>"')
            found.append(credentials.strip())
        elif name == "x-api-key":
            found.append(value.strip())
    if not found:
        return None
    if len(set(found)) > 1:
        raise _unauthenticated("the call carries more than one API key; send exactly one")
    return found[0]


class Authenticator:
    """Turns a call's metadata into an Identity; multi-tenancy is off when it has no keys."""

    def __init__(self, keys: TenantKeys | None) -> None:
        self._keys = keys

    @property
    def enabled(self) -> bool:
        return self._keys is not None

    def authenticate(self, metadata: Metadata) -> Identity:
        """The caller's identity. With multi-tenancy off, ANONYMOUS (keys are not even looked at).

        Raises ServiceError (UNAUTHENTICATED) for a missing or unknown key; the message never quotes it.
        """
        if self._keys is None:
            return ANONYMOUS
        key = presented_key(metadata)
        if key is None:
            raise _unauthenticated(
                'no API key: send it in the call metadata as "authorization: Bearer <api key>" or "x-api-key"'
            )
        identity = self._keys.identify(key)
        if identity is None:
            raise _unauthenticated("the API key is not valid; check it, or ask the operator for one")
        return identity
