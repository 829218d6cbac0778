"""Tenancy: API keys -> tenant -> sharing group -> cache salt; constant-time key checks; keys files that
are refused with messages that never quote a key; and, through a real gateway, UNAUTHENTICATED calls and
the salt that reaches the decode worker (never one the client sent)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import struct
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest

from gateway.config import GatewayConfig
from gateway.routing_cost import RoutingConfig
from gateway.tenancy import (
    ANONYMOUS,
    Authenticator,
    Identity,
    SaltSecret,
    TenantKeys,
    presented_key,
    tenant_salt,
)
from kvmesh.cli.options import ROLE_OPTIONS, add_options
from kvmesh.cli.settings import role_settings
from kvmesh.client import Client
from kvmesh.engine.tokenizer import Tokenizer
from kvmesh.mesh.errors import ServiceError
from kvmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.fake_decode import FakeDecode, gateway_stack, write_tiny_checkpoint

KEYS = {
    "key-alice-0123456789": "alice",
    "key-bob-0123456789": "bob",
    "key-carol-0123456789": "carol",
    "key-alice-second-one": "alice",
}
GROUPS = {"alice": "acme", "bob": "acme"}
SECRET_TEXT = "3f1c0a9e8d7b6a5f4e3d2c1b0a99887766554433221100ffeeddccbbaa998877"
SECRET = SaltSecret(SECRET_TEXT.encode())


def write_keys(path: Path, document: Any) -> Path:
    path.write_text(document if isinstance(document, str) else json.dumps(document), encoding="utf-8")
    return path


# --- salts -----------------------------------------------------------------------------------------------


def test_salt_is_an_hmac_of_the_group_or_the_tenant_under_the_secret() -> None:
    # A fixed vector: the salt must not change between releases, or every cache goes cold.
    fields = (b"kvmesh-tenant-salt-v2", b"acme")
    message = b"".join(struct.pack("<Q", len(f)) + f for f in fields)
    spelled_out = hmac.new(SECRET_TEXT.encode(), message, hashlib.sha256).hexdigest()
    assert tenant_salt(SECRET, "alice", "acme") == spelled_out
    assert spelled_out == "f4a6198769186ec574cd40a5c588eecfb9a0e7329f9154986d2cbb8585e1b269"
    assert tenant_salt(SECRET, "alice", "acme") == tenant_salt(SECRET, "bob", "acme")  # one group, one cache
    assert tenant_salt(SECRET, "carol") != tenant_salt(SECRET, "alice")
    # An ungrouped tenant is the group of its own name: a group named after it joins its cache.
    assert tenant_salt(SECRET, "acme") == tenant_salt(SECRET, "alice", "acme")
    assert (
        len(
            {
                tenant_salt(SECRET, "org_1"),
                tenant_salt(SECRET, "org_12345"),
                tenant_salt(SECRET, "org_1", "2345"),
            }
        )
        == 3
    )


def test_a_salt_cannot_be_computed_from_the_tenant_name_alone() -> None:
    salt = tenant_salt(SECRET, "alice", "acme")
    v1 = (b"kvmesh-tenant-salt-v1", b"acme")  # the old formula: a plain hash of the name
    guesses = {
        hashlib.sha256(b"".join(struct.pack("<Q", len(f)) + f for f in v1)).hexdigest(),
        *(SaltSecret(key.ljust(32, b"\0")).salt("alice", "acme") for key in (b"", b"alice", b"acme")),
        hashlib.sha256(b"acme").hexdigest(),
    }
    assert salt not in guesses


def test_rotating_the_secret_changes_every_salt() -> None:
    rotated = SaltSecret(b"a freshly generated secret of 32+ bytes, not the old one")
    old_keys, new_keys = TenantKeys(KEYS, SECRET, GROUPS), TenantKeys(KEYS, rotated, GROUPS)
    old_salts = {old_keys.identify(key).cache_salt for key in KEYS}  # type: ignore[union-attr]
    new_salts = {new_keys.identify(key).cache_salt for key in KEYS}  # type: ignore[union-attr]
    assert len(old_salts) == len(new_salts) == 2  # acme (alice, bob) and carol
    assert not old_salts & new_salts


def test_the_secret_is_never_shown_and_must_be_long(tmp_path: Path) -> None:
    assert SECRET_TEXT not in repr(SECRET) and SECRET_TEXT not in str(SECRET)
    assert SECRET_TEXT not in repr(TenantKeys(KEYS, SECRET, GROUPS))
    path = tmp_path / "salt.key"
    path.write_text(SECRET_TEXT + "\n")  # as `openssl rand -hex 32 > salt.key` writes it
    assert SaltSecret.load(path).salt("t") == SECRET.salt("t")
    path.write_text("short-secret\n")
    with pytest.raises(ValueError, match="fewer than 32") as raised:
        SaltSecret.load(path)
    assert "short-secret" not in str(raised.value) and str(path) in str(raised.value)


def test_keys_map_to_identities() -> None:
    keys = TenantKeys(KEYS, SECRET, GROUPS)
    alice = keys.identify("key-alice-0123456789")
    assert (
        alice is not None
        and alice.tenant == "alice"
        and alice.cache_salt == tenant_salt(SECRET, "alice", "acme")
    )
    assert keys.identify("key-alice-second-one") == alice
    bob = keys.identify("key-bob-0123456789")
    assert bob is not None and bob.cache_salt == alice.cache_salt
    carol = keys.identify("key-carol-0123456789")
    assert carol is not None and carol.cache_salt == tenant_salt(SECRET, "carol")
    for unknown in ("", "key-alice-012345678", "key-alice-0123456789 ", "KEY-ALICE-0123456789"):
        assert keys.identify(unknown) is None


def test_every_key_is_compared_whichever_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = TenantKeys(KEYS, SECRET, GROUPS)
    calls: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    for key in ("key-alice-0123456789", "key-carol-0123456789", "not a key", "x" * 1000):
        calls.clear()
        keys.identify(key)
        # Every key, always, and digests of equal length: no early exit, no length leak.
        assert calls == [(32, 32)] * len(KEYS)


# --- metadata --------------------------------------------------------------------------------------------


def test_presented_key_from_metadata() -> None:
    assert presented_key([("authorization", "Bearer abc")]) == "abc"
    assert presented_key([("authorization", "bearer   abc  ")]) == "abc"
    assert presented_key([("x-api-key", "abc")]) == "abc"
    assert presented_key([("x-api-key", "abc"), ("authorization", "Bearer abc")]) == "abc"
    assert presented_key([("user-agent", "grpc")]) is None
    assert presented_key([("authorization-bin", b"abc")]) is None
    for bad in ([("authorization", "Basic abc")], [("authorization", "Bearer ")], [("authorization", "abc")]):
        with pytest.raises(ServiceError) as raised:
            presented_key(bad)
        assert raised.value.code == grpc.StatusCode.UNAUTHENTICATED and "abc" not in raised.value.message
    with pytest.raises(ServiceError, match="more than one API key") as raised:
        presented_key([("x-api-key", "secret-one"), ("authorization", "Bearer secret-two")])
    assert "secret" not in raised.value.message


def test_authenticator() -> None:
    off = Authenticator(None)
    assert not off.enabled
    assert off.authenticate([("authorization", "Bearer anything")]) == ANONYMOUS
    assert off.authenticate([]) == ANONYMOUS
    on = Authenticator(TenantKeys(KEYS, SECRET, GROUPS))
    assert on.authenticate([("x-api-key", "key-carol-0123456789")]).tenant == "carol"
    for metadata in ([], [("x-kvmesh-cache-salt", "acme")], [("x-api-key", "key-mallory-secret")]):
        with pytest.raises(ServiceError) as raised:
            on.authenticate(metadata)
        assert raised.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert "mallory" not in raised.value.message


# --- keys files ------------------------------------------------------------------------------------------


def test_load_a_keys_file(tmp_path: Path) -> None:
    keys = TenantKeys.load(write_keys(tmp_path / "keys.json", {"keys": KEYS, "groups": GROUPS}), SECRET)
    assert keys.num_keys == 4
    assert keys.identify("key-bob-0123456789") == Identity("bob", tenant_salt(SECRET, "bob", "acme"))
    ungrouped = TenantKeys.load(write_keys(tmp_path / "plain.json", {"keys": {"k": "t"}}), SECRET)
    assert ungrouped.identify("k") is not None


@pytest.mark.parametrize(
    ("document", "fragment"),
    [
        ("{not json", "not valid JSON"),
        ([], '"keys"'),
        ({"groups": {}}, '"keys"'),
        ({"keys": {}}, "empty"),
        ({"keys": {"  ": "alice"}}, "number 1 is empty"),
        ({"keys": {"secret-key-1": ""}}, "empty tenant"),
        ({"keys": {"secret-key-1": 7}}, "empty tenant"),
        ({"keys": {"secret-key-1": "alice"}, "groups": {"bob": "acme"}}, "'bob', which has no API key"),
        ({"keys": {"secret-key-1": "alice"}, "groups": []}, '"groups" must be an object'),
        ({"keys": {"secret-key-1": "alice"}, "tenants": {}}, "unknown field(s) tenants"),
        ('{"keys": {"secret-key-1": "alice", "secret-key-1": "bob"}}', "appears twice"),
    ],
)
def test_bad_keys_files_are_refused_without_quoting_a_key(
    tmp_path: Path, document: Any, fragment: str
) -> None:
    path = write_keys(tmp_path / "keys.json", document)
    with pytest.raises(ValueError) as raised:
        TenantKeys.load(path, SECRET)
    message = str(raised.value)
    assert fragment in message and str(path) in message
    assert "secret-key" not in message


def test_gateway_settings_read_the_keys_file_and_routing_flags(tmp_path: Path) -> None:
    import argparse

    from kvmesh.cli.options import SettingsError

    parser = argparse.ArgumentParser()
    add_options(parser, ROLE_OPTIONS["gateway"])
    args = parser.parse_args(["--cache-store", "h:1", "--model", "/m", "--disagg-min-tokens", "64"])
    environ = {
        "KVMESH_API_KEYS_FILE": "/etc/kvmesh/keys.json",
        "KVMESH_SALT_SECRET_FILE": "/etc/kvmesh/salt/salt.key",
        "KVMESH_MAX_LOAD_IMBALANCE": "2",
    }
    config = role_settings("gateway", args, environ).config
    assert isinstance(config, GatewayConfig)
    assert config.api_keys_file == "/etc/kvmesh/keys.json"
    assert config.salt_secret_file == "/etc/kvmesh/salt/salt.key"
    assert config.routing == RoutingConfig(disagg_min_tokens=64, max_load_imbalance=2)
    off = role_settings("gateway", parser.parse_args(["--cache-store", "h:1", "--model", "/m"]), {}).config
    assert off.api_keys_file is None  # type: ignore[union-attr]
    # Multi-tenancy without a secret is refused: the salts would be derivable from the tenants' names.
    without_secret = {"KVMESH_API_KEYS_FILE": "/etc/kvmesh/keys.json"}
    with pytest.raises(SettingsError, match="salt_secret_file is not") as raised:
        role_settings("gateway", args, without_secret)
    assert "--salt-secret-file" in str(raised.value) and "KVMESH_SALT_SECRET_FILE" in str(raised.value)


def test_worker_settings_switch_prefix_caching_and_require_a_salt(tmp_path: Path) -> None:
    import argparse

    from kvmesh.cli.options import SettingsError

    parser = argparse.ArgumentParser()
    add_options(parser, ROLE_OPTIONS["decode"])
    base = ["--cache-store", "h:1", "--model", "/m"]

    def enabled(argv: list[str], environ: dict[str, str]) -> bool:
        config = role_settings("decode", parser.parse_args([*base, *argv]), environ).config
        return config.model.engine.enable_prefix_caching  # type: ignore[union-attr]

    assert enabled([], {})
    assert not enabled(["--no-prefix-caching"], {})
    assert not enabled([], {"KVMESH_PREFIX_CACHING": "off"})
    assert enabled(["--prefix-caching"], {"KVMESH_PREFIX_CACHING": "0"})  # the flag wins
    with pytest.raises(SettingsError, match="KVMESH_PREFIX_CACHING"):
        enabled([], {"KVMESH_PREFIX_CACHING": "maybe"})
    for role in ("decode", "prefill"):
        role_parser = argparse.ArgumentParser()
        add_options(role_parser, ROLE_OPTIONS[role])
        strict = role_settings(role, role_parser.parse_args([*base, "--require-cache-salt"]), {}).config
        lax = role_settings(role, role_parser.parse_args(base), {}).config
        assert strict.require_cache_salt and not lax.require_cache_salt  # type: ignore[union-attr]


# --- through a real gateway ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, code_tokenizer_json: Path) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tenancy-model"), code_tokenizer_json)


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_keys(tmp_path_factory.mktemp("keys") / "keys.json", {"keys": KEYS, "groups": GROUPS})


@pytest.fixture(scope="module")
def tenancy_files(keys_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """GatewayConfig fields: the keys file and the salt secret file (SECRET)."""
    secret_file = tmp_path_factory.mktemp("salt") / "salt.key"
    secret_file.write_text(SECRET_TEXT + "\n")
    return {"api_keys_file": str(keys_file), "salt_secret_file": str(secret_file)}


def complete_with(address: str, metadata: tuple[tuple[str, str], ...]) -> None:
    with grpc.insecure_channel(address) as channel:
        request = gateway_pb2.CompleteRequest(prefix="x = ", sampling=common_pb2.SamplingParams(max_tokens=2))
        for _ in gateway_pb2_grpc.GatewayStub(channel).Complete(request, timeout=10, metadata=metadata):
            pass


def test_gateway_salts_requests_by_tenant_and_refuses_bad_keys(
    checkpoint: Path, tenancy_files: dict[str, str]
) -> None:
    tokenizer = Tokenizer.from_file(checkpoint / "tokenizer.json")

    async def scenario() -> FakeDecode:
        decoder = FakeDecode(tokenizer)
        async with gateway_stack(checkpoint, {"d0": decoder}, **tenancy_files) as stack:
            address = stack.gateway_address
            for metadata, fragment in (
                ((), "no API key"),
                ((("x-kvmesh-cache-salt", tenant_salt(SECRET, "alice", "acme")),), "no API key"),
                ((("authorization", "Bearer key-mallory-guess"),), "not valid"),
                ((("authorization", "Basic key-mallory-guess"),), "Bearer <api key>"),
            ):
                with pytest.raises(grpc.RpcError) as raised:
                    await asyncio.to_thread(complete_with, address, metadata)
                assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
                details = raised.value.details()  # type: ignore[attr-defined]
                assert fragment in details and "mallory" not in details
            assert not decoder.requests, "an unauthenticated call reached a decode worker"

            def client_call(key: str) -> None:
                with Client(address, timeout_s=10, api_key=key) as client:
                    list(client.complete(prefix="x = ", max_tokens=2))

            await asyncio.to_thread(client_call, "key-alice-0123456789")
            await asyncio.to_thread(client_call, "key-bob-0123456789")
            # A salt sent by the client is ignored, even with a valid key.
            forged = (
                ("x-api-key", "key-carol-0123456789"),
                ("x-kvmesh-cache-salt", tenant_salt(SECRET, "x", "acme")),
            )
            await asyncio.to_thread(complete_with, address, forged)
        return decoder

    decoder = asyncio.run(scenario())
    salts = [request.cache_salt for request in decoder.requests]
    assert salts == [
        tenant_salt(SECRET, "alice", "acme"),
        tenant_salt(SECRET, "bob", "acme"),
        tenant_salt(SECRET, "carol"),
    ]


def test_gateway_without_keys_sends_no_salt_and_ignores_keys(checkpoint: Path) -> None:
    tokenizer = Tokenizer.from_file(checkpoint / "tokenizer.json")

    async def scenario() -> FakeDecode:
        decoder = FakeDecode(tokenizer)
        async with gateway_stack(checkpoint, {"d0": decoder}) as stack:
            metadata = (("authorization", "Bearer whatever"), ("x-kvmesh-cache-salt", "chosen-by-client"))
            await asyncio.to_thread(complete_with, stack.gateway_address, metadata)
            await asyncio.to_thread(complete_with, stack.gateway_address, ())
        return decoder

    decoder = asyncio.run(scenario())
    assert [request.cache_salt for request in decoder.requests] == ["", ""]


def test_gateway_refuses_to_start_with_a_bad_keys_file(checkpoint: Path, tmp_path: Path) -> None:
    bad = write_keys(tmp_path / "keys.json", {"keys": {}})

    async def scenario() -> None:
        with pytest.raises(ValueError, match='"keys" is empty'):
            async with gateway_stack(checkpoint, {}, api_keys_file=str(bad), salt_secret_file=str(secret)):
                pass

    secret = tmp_path / "salt.key"
    secret.write_text(SECRET_TEXT)
    asyncio.run(scenario())


def test_gateway_refuses_to_start_with_a_missing_or_short_salt_secret(
    checkpoint: Path, keys_file: Path, tmp_path: Path
) -> None:
    short = tmp_path / "short.key"
    short.write_text("guessable")

    async def scenario(secret_file: Path, error: type[Exception], fragment: str) -> None:
        with pytest.raises(error, match=fragment) as raised:
            async with gateway_stack(
                checkpoint, {}, api_keys_file=str(keys_file), salt_secret_file=str(secret_file)
            ):
                pass
        assert "guessable" not in str(raised.value)

    asyncio.run(scenario(short, ValueError, "9 bytes, fewer than 32"))
    asyncio.run(scenario(tmp_path / "missing.key", OSError, "missing.key"))
