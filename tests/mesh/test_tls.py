"""Mutual TLS between the roles: real servers on loopback (port 0), attacked as an intruder in the mesh
would; each attack must fail, and the right role must be served."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cache_store.server import CacheStoreConfig
from cache_store.server import serve as serve_cache_store
from kvmesh.cli.launcher import LocalMesh
from kvmesh.cli.main import build_parser, main
from kvmesh.cli.settings import role_settings
from kvmesh.mesh import telemetry
from kvmesh.mesh.server import RunningServer, ServerConfig, start_server
from kvmesh.mesh.tls import (
    ALLOWED_CALLERS,
    MESH_ROLES,
    TLSConfig,
    caller_role,
    make_mesh_certs,
    may_call,
    mesh_channel,
)
from kvmesh.v1 import cache_store_pb2, cache_store_pb2_grpc, decode_pb2, prefill_pb2, prefill_pb2_grpc

TIMEOUT_S = 10.0
PREFILL_SERVICE = prefill_pb2.DESCRIPTOR.services_by_name["Prefill"].full_name


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_mesh_certs(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second CA with the same role names: its certificates must not get in."""
    return make_mesh_certs(tmp_path_factory.mktemp("other-tls"))


def identity(directory: Path, role: str) -> TLSConfig:
    return TLSConfig.in_dir(directory, role)


async def cache_store(certs: Path) -> RunningServer:
    return await serve_cache_store(
        CacheStoreConfig(heartbeat_interval_ms=100, expiry_ms=1000, tls=identity(certs, "cache-store"))
    )


class _Prefill(prefill_pb2_grpc.PrefillServicer):
    """Answers every allowed call with one empty message: reaching it means the role check let it in."""

    async def Prefill(  # noqa: N802 (generated name)
        self, request: prefill_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[prefill_pb2.PrefillChunk]:
        yield prefill_pb2.PrefillChunk()


async def prefill_server(certs: Path) -> RunningServer:
    return await start_server(
        [(prefill_pb2_grpc.add_PrefillServicer_to_server, _Prefill())],
        [PREFILL_SERVICE],
        ServerConfig(tls=identity(certs, "prefill")),
    )


def worker_proto(worker_id: str) -> cache_store_pb2.WorkerInfo:
    return cache_store_pb2.WorkerInfo(
        worker_id=worker_id,
        role=cache_store_pb2.WORKER_ROLE_DECODE,
        address="127.0.0.1:9001",
        block_size_tokens=16,
        model_fingerprint="fp",
    )


async def call_error(coro: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await coro  # type: ignore[misc]
    return raised.value


# ---- the allow table ----------------------------------------------------------------------------------


def test_every_internal_method_has_callers_and_nothing_else_is_allowed() -> None:
    services = [
        cache_store_pb2.DESCRIPTOR.services_by_name["CacheStore"],
        prefill_pb2.DESCRIPTOR.services_by_name["Prefill"],
        decode_pb2.DESCRIPTOR.services_by_name["Decode"],
    ]
    methods = {f"/{s.full_name}/{m.name}" for s in services for m in s.methods}
    assert methods == set(ALLOWED_CALLERS)
    assert not may_call("gateway", "/kvmesh.v1.Gateway/Complete")  # not a mesh method
    assert not may_call("decode", "/kvmesh.v1.Unknown/Method")
    assert not may_call(None, "/grpc.health.v1.Health/Check")
    assert not may_call("client", "/kvmesh.v1.CacheStore/Lookup")
    for role in MESH_ROLES:
        assert may_call(role, "/grpc.health.v1.Health/Check")


def test_caller_role_needs_exactly_one_role_uri() -> None:
    assert caller_role({"peer_uri": [b"spiffe://kvmesh/role/decode"]}) == "decode"
    assert caller_role({"peer_uri": [b"spiffe://other/role/decode"]}) is None
    assert caller_role({"peer_uri": [b"spiffe://kvmesh/role/a", b"spiffe://kvmesh/role/b"]}) is None
    assert caller_role({}) is None


# ---- attacks on a real cache store ----------------------------------------------------------------------


def test_cache_store_refuses_callers_without_a_mesh_certificate(certs: Path, other_ca: Path) -> None:
    async def scenario() -> None:
        store = await cache_store(certs)
        request = cache_store_pb2.ListWorkersRequest()
        try:
            async with grpc.aio.insecure_channel(store.address) as channel:  # plaintext
                error = await call_error(
                    cache_store_pb2_grpc.CacheStoreStub(channel).ListWorkers(request, timeout=TIMEOUT_S)
                )
                assert error.code() == grpc.StatusCode.UNAVAILABLE
            ca = (certs / "ca.crt").read_bytes()
            no_cert = grpc.ssl_channel_credentials(root_certificates=ca)
            options = [("grpc.ssl_target_name_override", "cache-store.kvmesh.internal")]
            async with grpc.aio.secure_channel(store.address, no_cert, options=options) as channel:
                error = await call_error(
                    cache_store_pb2_grpc.CacheStoreStub(channel).ListWorkers(request, timeout=TIMEOUT_S)
                )
                assert error.code() == grpc.StatusCode.UNAVAILABLE
            # A gateway certificate from another CA, trusting this mesh's CA to verify the server.
            forged = identity(other_ca, "gateway")
            client = grpc.ssl_channel_credentials(
                root_certificates=ca,
                private_key=Path(forged.key_file).read_bytes(),
                certificate_chain=Path(forged.cert_file).read_bytes(),
            )
            async with grpc.aio.secure_channel(store.address, client, options=options) as channel:
                error = await call_error(
                    cache_store_pb2_grpc.CacheStoreStub(channel).ListWorkers(request, timeout=TIMEOUT_S)
                )
                assert error.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await store.stop(0)

    asyncio.run(scenario())


def test_cache_store_checks_the_callers_role(certs: Path) -> None:
    async def scenario() -> None:
        store = await cache_store(certs)
        try:
            async with mesh_channel(store.address, identity(certs, "decode"), "cache-store") as channel:
                stub = cache_store_pb2_grpc.CacheStoreStub(channel)
                # A decode worker may not read the index...
                error = await call_error(stub.Lookup(cache_store_pb2.LookupRequest(), timeout=TIMEOUT_S))
                assert error.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "'decode'" in (error.details() or "") and "only gateway" in (error.details() or "")
                error = await call_error(stub.ListWorkers(cache_store_pb2.ListWorkersRequest(), timeout=5))
                assert error.code() == grpc.StatusCode.PERMISSION_DENIED
                # ...but registers.
                await stub.Register(cache_store_pb2.RegisterRequest(worker=worker_proto("d0")), timeout=5)
            async with mesh_channel(store.address, identity(certs, "gateway"), "cache-store") as channel:
                stub = cache_store_pb2_grpc.CacheStoreStub(channel)
                # A fake worker with a gateway certificate cannot join the mesh.
                error = await call_error(
                    stub.Register(cache_store_pb2.RegisterRequest(worker=worker_proto("fake")), timeout=5)
                )
                assert error.code() == grpc.StatusCode.PERMISSION_DENIED
                assert "only decode, prefill may call it" in (error.details() or "")
                error = await call_error(
                    stub.Heartbeat(cache_store_pb2.HeartbeatRequest(worker_id="d0"), timeout=5)
                )
                assert error.code() == grpc.StatusCode.PERMISSION_DENIED
                reply = await stub.ListWorkers(cache_store_pb2.ListWorkersRequest(), timeout=TIMEOUT_S)
                assert [w.worker_id for w in reply.workers] == ["d0"]
                await stub.Lookup(cache_store_pb2.LookupRequest(), timeout=TIMEOUT_S)
        finally:
            await store.stop(0)

    asyncio.run(scenario())


def test_a_caller_checks_the_servers_role(certs: Path) -> None:
    async def scenario() -> None:
        store = await cache_store(certs)
        try:
            # A gateway that meant to reach a decode worker must not talk to whatever answers there.
            async with mesh_channel(store.address, identity(certs, "gateway"), "decode") as channel:
                error = await call_error(
                    health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                )
                assert error.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await store.stop(0)

    asyncio.run(scenario())


def test_health_is_served_without_a_certificate_on_the_health_port_only(certs: Path) -> None:
    async def scenario() -> None:
        store = await cache_store(certs)
        try:
            assert store.health_port is not None and store.health_port != store.port
            async with grpc.aio.insecure_channel(f"127.0.0.1:{store.health_port}") as channel:
                health = health_pb2_grpc.HealthStub(channel)
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
                # Only health: the cache store's own service is not on this port.
                stub = cache_store_pb2_grpc.CacheStoreStub(channel)
                error = await call_error(stub.ListWorkers(cache_store_pb2.ListWorkersRequest(), timeout=5))
                assert error.code() == grpc.StatusCode.UNIMPLEMENTED
            # On the mesh port, any mesh role may ask for health.
            async with mesh_channel(store.address, identity(certs, "prefill"), "cache-store") as channel:
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S
                )
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
        finally:
            await store.stop(0)
        # Stopped with its server.
        async with grpc.aio.insecure_channel(f"127.0.0.1:{store.health_port}") as channel:
            error = await call_error(
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
            )
            assert error.code() == grpc.StatusCode.UNAVAILABLE

    asyncio.run(scenario())


# ---- attacks on a prefill worker ------------------------------------------------------------------------


def test_only_a_decode_worker_may_call_prefill(certs: Path) -> None:
    async def prefill_as(server: RunningServer, role: str) -> list[prefill_pb2.PrefillChunk]:
        async with mesh_channel(server.address, identity(certs, role), "prefill") as channel:
            call = prefill_pb2_grpc.PrefillStub(channel).Prefill(prefill_pb2.PrefillRequest(), timeout=5)
            return [chunk async for chunk in call]

    async def scenario() -> None:
        server = await prefill_server(certs)
        try:
            assert len(await prefill_as(server, "decode")) == 1
            for role in ("gateway", "prefill", "cache-store"):
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await prefill_as(server, role)
                assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED, role
                assert f"'{role}' may not call /kvmesh.v1.Prefill/Prefill" in (raised.value.details() or "")
        finally:
            await server.stop(0)

    asyncio.run(scenario())


# ---- settings, certificates, `kvmesh up` ----------------------------------------------------------------


def test_settings_read_the_tls_dir_per_role(certs: Path) -> None:
    parser = build_parser()
    args = parser.parse_args(["serve", "cache-store", "--tls-dir", str(certs)])
    settings = role_settings("cache-store", args, environ={})
    assert settings.config.tls == identity(certs, "cache-store")  # type: ignore[union-attr]
    args = parser.parse_args(["serve", "gateway", "--cache-store", "x:1", "--model", "m"])
    settings = role_settings("gateway", args, environ={"KVMESH_TLS_DIR": str(certs)})
    assert settings.config.tls == identity(certs, "gateway")  # type: ignore[union-attr]
    assert settings.config.server.tls is None  # type: ignore[union-attr]  # the public port is not mTLS


def test_a_missing_certificate_stops_the_role(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "cache-store", "--tls-dir", str(tmp_path), "--log-level", "error"]) == 1
    assert f"cannot read TLS file {tmp_path / 'ca.crt'}" in capsys.readouterr().err


def test_kvmesh_certs_writes_private_keys(tmp_path: Path) -> None:
    assert main(["certs", str(tmp_path / "certs"), "--hosts", "kvmesh-cache-store", "10.0.0.7"]) == 0
    for role in MESH_ROLES:
        assert (tmp_path / "certs" / f"{role}.crt").is_file()
        assert stat.S_IMODE(os.stat(tmp_path / "certs" / f"{role}.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(tmp_path / "certs" / "ca.key").st_mode) == 0o600


def test_kvmesh_up_makes_private_throwaway_certificates() -> None:
    mesh = LocalMesh(port=0, model_path="unused")
    directory = mesh._make_certs()
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert (directory / "decode.crt").is_file()
    asyncio.run(mesh.stop())
    assert not directory.exists()


# ---- metrics --------------------------------------------------------------------------------------------


def test_metrics_listen_on_the_roles_host_unless_told_otherwise() -> None:
    parser = build_parser()
    settings = role_settings("cache-store", parser.parse_args(["serve", "cache-store"]), environ={})
    assert settings.metrics_host == "127.0.0.1"
    args = parser.parse_args(["serve", "cache-store", "--host", "0.0.0.0", "--metrics-host", "127.0.0.1"])
    assert role_settings("cache-store", args, environ={}).metrics_host == "127.0.0.1"
    # Bound to the one address asked for: another loopback address of the same machine gets nothing.
    port = telemetry.start_metrics_server(0, "127.0.0.2")
    with urllib.request.urlopen(f"http://127.0.0.2:{port}/metrics", timeout=TIMEOUT_S) as response:
        assert response.status == 200
    with socket.socket() as sock:
        sock.settimeout(TIMEOUT_S)
        assert sock.connect_ex(("127.0.0.1", port)) != 0
