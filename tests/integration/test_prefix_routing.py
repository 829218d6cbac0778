"""Repeat keystrokes through the mesh: tenant salts, cache-aware routing, a restarted cache store, a dead worker."""

from __future__ import annotations

import hashlib
import hmac
import json
import struct
import threading
import time
from pathlib import Path

import grpc
import pytest

from gateway.layout import PromptLayout
from gateway.tenancy import SaltSecret
from kvmesh.client import Client
from kvmesh.engine.block_hash import hash_blocks, model_fingerprint, namespace_hash
from kvmesh.engine.tokenizer import Tokenizer
from kvmesh.mesh.telemetry import setup_telemetry
from kvmesh.v1 import cache_store_pb2, cache_store_pb2_grpc, common_pb2, decode_pb2, decode_pb2_grpc
from tests.mesh_harness import MeshInThread, MeshSpec

DOCS = [
    f"import os\n\ndef handler_{i}(event, context):\n    values = [v * {i} for v in event]\n    "
    for i in range(4)
]
SUFFIX = "\n    return values\n"


@pytest.fixture(scope="module")
def model_path(mesh_model_path: Path) -> Path:
    setup_telemetry("kvmesh-tests")  # as `kvmesh serve` does: the KV event stream must work under it
    return mesh_model_path


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    path.write_text(
        json.dumps(
            {"keys": {"key-a": "org_a", "key-b": "org_b", "key-c": "org_c"}, "groups": {"org_c": "org_a"}}
        )
    )
    return path


SALT_SECRET = b"0123456789abcdef0123456789abcdef-prefix-routing-tests"


@pytest.fixture(scope="module")
def salt_secret_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("salt") / "salt.key"
    path.write_bytes(SALT_SECRET)
    return path


def usage_of(address: str, prefix: str, api_key: str | None = None):
    with Client(address, api_key=api_key) as client:
        *_, last = client.complete(prefix=prefix, suffix=SUFFIX, max_tokens=4)
    return last.usage


def test_same_tenant_hits_other_tenant_misses_and_a_sharing_group_shares(
    model_path, keys_file, salt_secret_file
):
    files = {"api_keys_file": str(keys_file), "salt_secret_file": str(salt_secret_file)}
    spec = MeshSpec(str(model_path), gateway=files)
    with MeshInThread(spec) as mesh:
        address = mesh.gateway_address
        assert usage_of(address, DOCS[0], "key-a").cached_tokens == 0
        assert usage_of(address, DOCS[0] + "x", "key-a").cached_tokens > 0
        assert usage_of(address, DOCS[0] + "x", "key-b").cached_tokens == 0
        assert usage_of(address, DOCS[0] + "xy", "key-c").cached_tokens > 0  # org_c shares org_a's cache
        with pytest.raises(grpc.RpcError) as info:
            usage_of(address, DOCS[0], "key-wrong")
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED

        # Cache probing with a salt computed without the secret finds nothing, in the cache store's index
        # or in a decode worker's prefix cache; the real salt (the secret's) finds org_a's blocks.
        usage_of(address, DOCS[1], "key-a")
        real = SaltSecret(SALT_SECRET).salt("org_a")
        v1 = b"".join(struct.pack("<Q", len(f)) + f for f in (b"kvmesh-tenant-salt-v1", b"org_a"))
        guesses = [
            hashlib.sha256(v1).hexdigest(),  # the old formula: the tenant's name alone
            hmac.new(b"", b"org_a", hashlib.sha256).hexdigest(),
            SaltSecret(b"\0" * 32).salt("org_a"),
            SaltSecret(b"org_a".ljust(32, b"_")).salt("org_a"),
            "org_a",
            "",
        ]
        deadline = time.monotonic() + 10
        while not holders(mesh, model_path, DOCS[1], real) and time.monotonic() < deadline:
            time.sleep(0.05)  # KV events reach the cache store in batches
        assert holders(mesh, model_path, DOCS[1], real), "the premise: org_a's blocks are indexed"
        assert cached_tokens_at_decode(mesh, model_path, DOCS[1], real) > 0
        for guess in guesses:
            assert holders(mesh, model_path, DOCS[1], guess) == {}, guess
            assert cached_tokens_at_decode(mesh, model_path, DOCS[1], guess) == 0, guess


def cached_tokens_at_decode(mesh: MeshInThread, model_path: Path, prefix: str, salt: str) -> int:
    """Prompt tokens a decode worker finds in its prefix cache for this prompt under this salt."""
    tokenizer = Tokenizer.from_file(model_path / "tokenizer.json")
    prompt = PromptLayout(tokenizer).completion(prefix, SUFFIX)
    request = decode_pb2.GenerateRequest(
        request_id=f"probe-{salt[:8]}",
        prompt_token_ids=prompt,
        sampling=common_pb2.SamplingParams(max_tokens=1),
        cache_salt=salt,
    )
    with grpc.insecure_channel(mesh.servers["decode-0"].address) as channel:
        *_, last = decode_pb2_grpc.DecodeStub(channel).Generate(request, timeout=30)
    return last.usage.cached_tokens


def test_with_prefix_caching_off_nothing_hits(model_path):
    with MeshInThread(MeshSpec(str(model_path), enable_prefix_caching=False)) as mesh:
        usage_of(mesh.gateway_address, DOCS[0])
        assert usage_of(mesh.gateway_address, DOCS[0] + "x").cached_tokens == 0


def holders(mesh: MeshInThread, model_path: Path, prefix: str, salt: str = "") -> dict[str, int]:
    """Which worker holds how many leading blocks of this completion's prompt, per the cache store."""
    tokenizer = Tokenizer.from_file(model_path / "tokenizer.json")
    prompt = PromptLayout(tokenizer).completion(prefix, SUFFIX)
    hashes = hash_blocks(namespace_hash(model_fingerprint(model_path), salt), prompt, 16)
    with grpc.insecure_channel(mesh.servers["cache-store"].address) as channel:
        reply = cache_store_pb2_grpc.CacheStoreStub(channel).Lookup(
            cache_store_pb2.LookupRequest(block_hashes=hashes), timeout=5
        )
    return {m.worker_id: m.num_blocks for m in reply.matches}


def test_keystrokes_follow_their_cache_across_decode_workers_and_a_cache_store_restart(model_path):
    spec = MeshSpec(str(model_path), num_decode=2)
    with MeshInThread(spec) as mesh:
        address = mesh.gateway_address
        # At once, so the gateway spreads them over both decode workers (it counts its in-flight calls).
        threads = [threading.Thread(target=usage_of, args=(address, doc)) for doc in DOCS]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        time.sleep(0.3)  # KV events reach the cache store
        decode_holders = {w for doc in DOCS for w in holders(mesh, model_path, doc) if w.startswith("decode")}
        assert len(decode_holders) == 2, "the premise: both decode workers hold some documents"
        for doc in DOCS:
            usage = usage_of(address, doc + "a")
            assert usage.cached_tokens >= usage.prompt_tokens - 2 * 16, doc
        mesh.run(mesh.restart_cache_store())
        mesh.run(mesh._wait_for_workers())
        time.sleep(0.5)  # inventories re-sent, the gateway's pool refreshed
        for doc in DOCS:
            usage = usage_of(address, doc + "ab")
            assert usage.cached_tokens >= usage.prompt_tokens - 2 * 16, doc


def test_a_dead_workers_hashes_leave_the_index(model_path):
    spec = MeshSpec(str(model_path), num_decode=2, num_prefill=0)
    with MeshInThread(spec) as mesh:
        usage_of(mesh.gateway_address, DOCS[1])
        tokenizer = Tokenizer.from_file(model_path / "tokenizer.json")
        prompt = PromptLayout(tokenizer).completion(DOCS[1], SUFFIX)
        hashes = hash_blocks(namespace_hash(model_fingerprint(model_path), ""), prompt, 16)
        store = mesh.servers["cache-store"].address

        def matches() -> dict[str, int]:
            with grpc.insecure_channel(store) as channel:
                reply = cache_store_pb2_grpc.CacheStoreStub(channel).Lookup(
                    cache_store_pb2.LookupRequest(block_hashes=hashes), timeout=5
                )
            return {m.worker_id: m.num_blocks for m in reply.matches}

        deadline = time.monotonic() + 10
        while list(matches().values()) != [len(hashes)] and time.monotonic() < deadline:
            time.sleep(0.05)  # events arrive in batches
        [(holder, num_blocks)] = matches().items()
        assert num_blocks == len(hashes)
        name = next(
            n for n, s in mesh.servers.items() if n.startswith("decode") and holder.endswith(f":{s.port}")
        )
        mesh.run(mesh.stop_server(name))
        deadline = time.monotonic() + 10
        while matches() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert matches() == {}
