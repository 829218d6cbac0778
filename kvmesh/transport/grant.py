"""Write grants: a prefill worker writes into another worker's pool only the blocks its owner reserved.

A pool in shared memory carries a random key in its header (`kvmesh.transport.shm`), readable only by
processes that could write the pool anyway (same user, same host). For each transfer the owner signs
what it reserved, HMAC-SHA256(key, request id, pool name, block ids, expiry), and sends the grant with
the destination; the writer verifies it against the key it reads from the segment before copying. A
caller on the network, even one holding a valid decode-worker certificate, cannot make a grant for a
pool it does not own, nor stretch one to other blocks, another request or past its expiry.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
import time
from collections.abc import Sequence

GRANT_KEY_BYTES = 32
GRANT_VERSION = b"kvmesh-write-grant-v1"


class GrantError(PermissionError):
    """A transfer's grant is missing, forged, for other blocks, or expired; nothing was written."""


def _message(request_id: str, pool_name: str, block_ids: Sequence[int], expires_unix_ms: int) -> bytes:
    fields = [GRANT_VERSION, request_id.encode(), pool_name.encode()]
    # NOTE: length-prefixed, so no two different grants share a message.
    head = b"".join(struct.pack(">I", len(field)) + field for field in fields)
    return head + struct.pack(f">qI{len(block_ids)}I", expires_unix_ms, len(block_ids), *block_ids)


def sign_grant(
    key: bytes, request_id: str, pool_name: str, block_ids: Sequence[int], expires_unix_ms: int
) -> bytes:
    """The grant the pool's owner sends with a transfer into `block_ids` for `request_id`."""
    return hmac.new(key, _message(request_id, pool_name, block_ids, expires_unix_ms), hashlib.sha256).digest()


def check_grant(
    key: bytes,
    grant: bytes,
    request_id: str,
    pool_name: str,
    block_ids: Sequence[int],
    expires_unix_ms: int,
    now_unix_ms: int | None = None,
) -> None:
    """Raise GrantError unless `grant` is the owner's signature of exactly this transfer, unexpired."""
    if not grant:
        raise GrantError(
            f"no write grant for pool {pool_name!r}: only its owner's reservations may be written"
        )
    expected = sign_grant(key, request_id, pool_name, block_ids, expires_unix_ms)
    if not hmac.compare_digest(grant, expected):
        raise GrantError(
            f"the write grant for pool {pool_name!r} does not match request {request_id!r} and its blocks: "
            "only the blocks its owner reserved for this request may be written"
        )
    now = int(time.time() * 1000) if now_unix_ms is None else now_unix_ms
    if now > expires_unix_ms:
        raise GrantError(f"the write grant for pool {pool_name!r} expired {now - expires_unix_ms} ms ago")
