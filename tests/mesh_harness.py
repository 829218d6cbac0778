"""The four roles as real gRPC servers on loopback (port 0), hosted by one background event loop.

Tests talk to them through real channels, as a client would; the harness only starts and stops them.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import pytest

from cache_store.server import CacheStoreConfig
from cache_store.server import serve as serve_cache_store
from decode_service.config import DecodeConfig
from decode_service.server import serve as serve_decode
from gateway.config import GatewayConfig
from gateway.routing_cost import RoutingConfig
from gateway.server import serve as serve_gateway
from kvmesh.engine.config import EngineConfig
from kvmesh.mesh.server import RunningServer, ServerConfig, wait_for_serving
from kvmesh.mesh.tls import PublicTLSConfig, TLSConfig, make_mesh_certs, mesh_channel
from kvmesh.mesh.worker_config import ModelSettings, RegistrationSettings
from kvmesh.mesh.workers import WorkerLoad
from kvmesh.v1 import cache_store_pb2, cache_store_pb2_grpc
from prefill_service.config import PrefillConfig
from prefill_service.server import serve as serve_prefill

T = TypeVar("T")


@dataclass(frozen=True)
class MeshSpec:
    model_path: str
    num_prefill: int = 1
    num_decode: int = 1
    num_blocks: int = 256
    block_size: int = 16
    worker_transports: tuple[str, ...] = ("shm", "grpc")
    enable_prefix_caching: bool = True
    max_num_batched_tokens: int = 256
    """Token budget of a forward pass on every worker (the decode role's default)."""
    routing: RoutingConfig = RoutingConfig()
    """The gateway's routing (its KV transport, say)."""
    gateway: dict[str, Any] = field(default_factory=dict)
    """Extra GatewayConfig fields."""
    device: str = field(default_factory=lambda: os.environ.get("KVMESH_TEST_DEVICE", "cpu"))
    """The workers' torch device: KVMESH_TEST_DEVICE=cuda runs the mesh tests on a GPU."""
    mutual_tls: bool = False
    """The roles talk mutual TLS, with certificates from a throwaway CA (the gateway's port stays plain)."""
    public_tls: PublicTLSConfig | None = None
    """TLS of the gateway's public port; None: plaintext."""


class MeshInThread:
    def __init__(self, spec: MeshSpec) -> None:
        self.spec = spec
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="mesh", daemon=True)
        self.servers: dict[str, RunningServer] = {}
        self._tls_dir: tempfile.TemporaryDirectory[str] | None = None

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 120) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout_s)

    def __enter__(self) -> MeshInThread:
        if self.spec.device != "cpu":
            # The shm transport needs the KV pool in host memory; a GPU worker offers only grpc.
            if self.spec.routing.transport == "shm":
                pytest.skip(
                    f"the shm transport needs a host KV pool; this mesh's workers run on {self.spec.device}"
                )
            transports = tuple(t for t in self.spec.worker_transports if t != "shm")
            self.spec = replace(self.spec, worker_transports=transports)
        if self.spec.mutual_tls:
            self._tls_dir = tempfile.TemporaryDirectory(prefix="kvmesh-tls-")
            make_mesh_certs(self._tls_dir.name)
        self._thread.start()
        self.run(self._start())
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.run(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if self._tls_dir is not None:
            self._tls_dir.cleanup()

    def tls(self, role: str) -> TLSConfig | None:
        """A role's mesh identity; None when the mesh is plaintext."""
        return TLSConfig.in_dir(self._tls_dir.name, role) if self._tls_dir is not None else None

    @property
    def gateway_address(self) -> str:
        return self.servers["gateway"].address

    async def _start(self) -> None:
        spec = self.spec
        self.servers["cache-store"] = await serve_cache_store(
            CacheStoreConfig(heartbeat_interval_ms=100, expiry_ms=1000, tls=self.tls("cache-store"))
        )
        engine = EngineConfig(
            num_blocks=spec.num_blocks,
            block_size=spec.block_size,
            enable_prefix_caching=spec.enable_prefix_caching,
            max_num_batched_tokens=spec.max_num_batched_tokens,
        )
        model = ModelSettings(path=spec.model_path, device=spec.device, engine=engine)
        registration = RegistrationSettings(
            cache_store_address=self.servers["cache-store"].address, transports=spec.worker_transports
        )
        for i in range(spec.num_prefill):
            self.servers[f"prefill-{i}"] = await serve_prefill(
                PrefillConfig(ServerConfig(tls=self.tls("prefill")), model, registration)
            )
        for i in range(spec.num_decode):
            self.servers[f"decode-{i}"] = await serve_decode(
                DecodeConfig(ServerConfig(tls=self.tls("decode")), model, registration)
            )
        await self._wait_for_workers()  # so the gateway's first look at the pools sees every worker
        gateway = GatewayConfig(
            server=ServerConfig(public_tls=spec.public_tls),
            cache_store_address=self.servers["cache-store"].address,
            model_path=spec.model_path,
            refresh_ms=100,
            routing=spec.routing,
            tls=self.tls("gateway"),
            **spec.gateway,
        )
        self.servers["gateway"] = await serve_gateway(gateway)
        # A gateway whose public port is TLS also serves health in plaintext on its health port.
        running = self.servers["gateway"]
        health = f"127.0.0.1:{running.health_port}" if running.health_port is not None else running.address
        await wait_for_serving(health, timeout_s=30)

    async def _wait_for_workers(self) -> None:
        expected = self.spec.num_prefill + self.spec.num_decode
        for _ in range(200):
            if len(await self.worker_loads()) == expected:
                return
            await asyncio.sleep(0.05)
        raise TimeoutError("workers did not register with the cache store")

    async def worker_loads(self) -> dict[str, WorkerLoad]:
        """Each live worker's load as its last heartbeat told the cache store (asked as the gateway)."""
        store = self.servers["cache-store"].address
        async with mesh_channel(store, self.tls("gateway"), "cache-store") as channel:
            reply = await cache_store_pb2_grpc.CacheStoreStub(channel).ListWorkers(
                cache_store_pb2.ListWorkersRequest(), timeout=5
            )
        return {
            w.worker_id: WorkerLoad(
                w.load.num_running, w.load.num_waiting, w.load.num_blocks_free, w.load.num_blocks_total
            )
            for w in reply.workers
        }

    async def restart_cache_store(self) -> None:
        """Stop the cache store and start an empty one on the same port: workers must re-register and
        re-send their inventories."""
        old = self.servers.pop("cache-store")
        await old.stop(0)
        self.servers["cache-store"] = await serve_cache_store(
            CacheStoreConfig(
                port=old.port, heartbeat_interval_ms=100, expiry_ms=1000, tls=self.tls("cache-store")
            )
        )

    async def stop_server(self, name: str, grace_s: float = 0.0) -> None:
        await self.servers.pop(name).stop(grace_s)

    async def _stop(self) -> None:
        for name in (
            "gateway",
            *[n for n in self.servers if n.startswith(("decode", "prefill"))],
            "cache-store",
        ):
            if name in self.servers:
                await self.servers.pop(name).stop(0.5)
