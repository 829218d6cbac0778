"""Block hashes: the one function every role calls to name a block of KV.

    h(-1) = SHA-256(length-prefixed fields: version, model fingerprint, tenant salt, adapter id)
    h(i)  = SHA-256(h(i-1) || uint32 count || the block's token ids as uint32, little-endian)

Only full blocks are hashed. A cryptographic hash, because a collision would hand one request another's
KV (another tenant's code, even); every field of the namespace is length-prefixed, so ("org_1", "2345")
and ("org_12345", "") cannot meet.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from pathlib import Path

HASH_VERSION = b"kvmesh-block-hash-v1"
HASH_BYTES = 32


def _length_prefixed(*fields: bytes) -> bytes:
    return b"".join(struct.pack("<Q", len(f)) + f for f in fields)


def namespace_hash(model_fingerprint: str, tenant_salt: str = "", adapter_id: str = "") -> bytes:
    """h(-1): the parent of a prompt's first block. Anything that changes the KV belongs here."""
    fields = (HASH_VERSION, model_fingerprint.encode(), tenant_salt.encode(), adapter_id.encode())
    return hashlib.sha256(_length_prefixed(*fields)).digest()


def hash_block(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """The hash of one block given its parent's hash."""
    payload = struct.pack(f"<I{len(token_ids)}I", len(token_ids), *token_ids)
    return hashlib.sha256(parent + payload).digest()


def hash_blocks(namespace: bytes, token_ids: Sequence[int], block_size: int, start: int = 0) -> list[bytes]:
    """Chained hashes of every full block of token_ids (a partial last block gets none).

    `start` continues a chain: pass the hash of block start-1 as `namespace` to hash blocks from `start`.
    """
    hashes = []
    parent = namespace
    for begin in range(start * block_size, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[begin : begin + block_size])
        hashes.append(parent)
    return hashes


def model_fingerprint(path: str | Path) -> str:
    """Identity of a checkpoint: config, tokenizer and every byte of the weights.

    NOTE: the weights are hashed in full: two checkpoints of the same shape (a retrained model rolled out
    beside the old one) must never share block hashes. Hashing runs at about 1 GB/s.
    """
    path = Path(path)
    digest = hashlib.sha256(HASH_VERSION)
    names = ["config.json", "tokenizer.json", *sorted(p.name for p in path.glob("*.safetensors"))]
    for name in names:
        file = path / name
        if not file.is_file():
            continue
        digest.update(_length_prefixed(name.encode()))
        with file.open("rb") as handle:
            while chunk := handle.read(8 << 20):
                digest.update(chunk)
    return digest.hexdigest()[:32]
