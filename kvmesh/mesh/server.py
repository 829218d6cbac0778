"""Shared gRPC server scaffolding: every role starts, reports health and stops the same way.

A role's service stays thin (decode, call the core, encode): errors, health, reflection, deadlines and
graceful shutdown live here, written once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from kvmesh.mesh.errors import ErrorInterceptor
from kvmesh.mesh.supervision import DEFAULT_RESTART_POLICY, RestartPolicy, supervised
from kvmesh.mesh.tls import (
    PublicTLSConfig,
    RoleCheckInterceptor,
    TLSConfig,
    public_server_credentials,
    server_credentials,
)

logger = logging.getLogger(__name__)

AddServicerFn = Callable[[Any, grpc.aio.Server], None]
"""A generated `add_<Service>Servicer_to_server` function."""

HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


@dataclass(frozen=True)
class ServerConfig:
    """Where and how a role's gRPC server listens."""

    host: str = "127.0.0.1"
    """Interface to bind ("0.0.0.0" for all IPv4 interfaces, "::" for all IPv6)."""
    port: int = 0
    """TCP port to bind; 0 picks a free one (RunningServer.port tells which)."""
    grace_s: float = 5.0
    """Seconds that in-flight calls get to finish on shutdown before they are cancelled."""
    max_message_bytes: int = 64 * 1024 * 1024
    """Largest message sent or received, in bytes (KV chunks of a few MiB must fit)."""
    tls: TLSConfig | None = None
    """Mutual TLS (a mesh port): only callers with a certificate from the mesh CA get in, and only to the
    methods their role may call (kvmesh.mesh.tls.ALLOWED_CALLERS). None: plaintext."""
    public_tls: PublicTLSConfig | None = None
    """Server-only TLS (a public port: the gateway's clients authenticate with API keys). Not with tls."""
    health_port: int | None = None
    """Port of a second, plaintext server with only gRPC health (and reflection), bound to host, for
    probes that cannot speak this port's TLS (the kubelet's); 0 picks a free one. None: none, unless
    tls or public_tls is set (then a free one)."""
    metrics_host: str | None = None
    """Interface the role's Prometheus metrics server binds; None: host."""

    @property
    def metrics_bind_host(self) -> str:
        """Where the metrics server listens: metrics_host, else the gRPC server's host."""
        return self.metrics_host or self.host

    def __post_init__(self) -> None:
        if self.tls is not None and self.public_tls is not None:
            raise ValueError(
                "a server port is either a mesh port (tls) or a public one (public_tls), not both"
            )


@dataclass
class RunningServer:
    """A started server. Health reports NOT_SERVING until set_serving() is called."""

    server: grpc.aio.Server
    health: health_aio.HealthServicer
    host: str
    port: int
    """The bound port (the real one when the config asked for port 0)."""
    service_names: tuple[str, ...]
    health_port: int | None = None
    """The plaintext health port (ServerConfig.health_port), bound; None when there is none."""
    _background: list[asyncio.Task[Any]] = field(default_factory=list)
    _on_stop: list[Callable[[], None]] = field(default_factory=list)
    _stopping: bool = False
    failure: str | None = None
    """Why a background task this server cannot do without died (health is NOT_SERVING for good)."""
    _health_updates: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def address(self) -> str:
        """`host:port` a client on this machine can dial."""
        host = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "[::]": "[::1]", "": "127.0.0.1"}.get(
            self.host, self.host
        )
        return f"{host}:{self.port}"

    async def set_serving(self) -> None:
        """Marks the server ('') and each of its services SERVING; call once warm-up is done.

        A no-op once a background task has died (`failure`): such a server stays NOT_SERVING.
        """
        if self.failure is not None:
            return
        for name in ("", *self.service_names):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def add_background_task(self, task: asyncio.Task[Any]) -> None:
        """Ties a background task (a decode loop, expiry sweeps) to the server: stop() cancels it.

        The task must run until cancelled. If it ends before stop() (it raised, or returned), the error is
        logged and health turns NOT_SERVING for good, so that the pod is restarted rather than left
        serving without it. A task that may fail and be retried goes through supervise() instead.
        """
        self._background.append(task)
        task.add_done_callback(self._background_ended)

    def supervise(
        self, name: str, run: Callable[[], Awaitable[None]], policy: RestartPolicy = DEFAULT_RESTART_POLICY
    ) -> None:
        """Runs `run()` as a background task that is logged and restarted with backoff when it fails
        (registration, a KV event stream); one that fails policy.max_failures times in a row ends as a
        task of add_background_task does: logged, and health NOT_SERVING."""
        self.add_background_task(asyncio.create_task(supervised(name, run, policy), name=name))

    def _background_ended(self, task: asyncio.Task[Any]) -> None:
        if self._stopping or task.cancelled():
            return
        error = task.exception()
        self.failure = f"background task {task.get_name()} " + (
            f"failed: {type(error).__name__}: {error}" if error is not None else "ended"
        )
        logger.error("%s; reporting NOT_SERVING", self.failure, exc_info=error)
        update = asyncio.get_running_loop().create_task(self._set_not_serving())
        self._health_updates.add(update)  # referenced until done
        update.add_done_callback(self._health_updates.discard)

    async def _set_not_serving(self) -> None:
        for name in ("", *self.service_names):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    def on_stop(self, callback: Callable[[], None]) -> None:
        """Runs callback after the server has stopped (releasing shared memory, closing files)."""
        self._on_stop.append(callback)

    async def stop(self, grace_s: float | None) -> None:
        """Reports NOT_SERVING, lets in-flight calls finish for grace_s, then stops background tasks.

        Safe to call more than once; later calls return at once.
        """
        if self._stopping:
            return
        self._stopping = True
        # Health first, so load balancers stop sending new calls while old ones drain.
        await self.health.enter_graceful_shutdown()
        # NOTE: background tasks (a decode loop) may be what in-flight calls wait on: they stop last.
        await self.server.stop(grace_s)
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        for callback in self._on_stop:
            callback()

    async def wait_for_termination(self) -> None:
        """Returns once the server has stopped."""
        await self.server.wait_for_termination()


def _bind_address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


async def start_server(
    servicers: Sequence[tuple[AddServicerFn, Any]],
    service_names: Sequence[str],
    config: ServerConfig,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
) -> RunningServer:
    """Starts a grpc.aio server with the error interceptor, health and reflection.

    servicers: (generated add function, servicer) pairs. service_names: the full names of the services
    they implement (e.g. "kvmesh.v1.CacheStore"), for health and reflection. interceptors run inside
    the error interceptor. With config.tls, the port is mutual TLS and every call's role is checked
    first, and health is also served in plaintext on the health port. Raises OSError when an address
    cannot be bound or a TLS file cannot be read.
    """
    options = [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_message_bytes),
    ]
    # The role check is outermost: a refused caller reaches nothing else.
    checks = [RoleCheckInterceptor()] if config.tls is not None else []
    # NOTE: looked up at call time, not imported by name, so OpenTelemetry's patched grpc.aio.server
    # (kvmesh.mesh.telemetry) adds its tracing interceptor.
    server = grpc.aio.server(interceptors=[*checks, ErrorInterceptor(), *interceptors], options=options)
    for add_fn, servicer in servicers:
        add_fn(servicer, server)

    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    for name in ("", *service_names):
        await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        [*service_names, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME], server
    )

    port = _add_port(server, config.host, config.port, _credentials(config))
    health_server, health_port = None, None
    if config.tls is not None or config.public_tls is not None or config.health_port is not None:
        health_server, health_port = _health_server(health, config.host, config.health_port or 0)
    await server.start()
    security = "mutual TLS" if config.tls else "TLS" if config.public_tls else "plaintext"
    logger.info("serving %s on %s:%d (%s)", ", ".join(service_names), config.host, port, security)
    running = RunningServer(
        server=server,
        health=health,
        host=config.host,
        port=port,
        service_names=tuple(service_names),
        health_port=health_port,
    )
    if health_server is not None:
        await health_server.start()
        logger.info("serving health in plaintext on %s:%d", config.host, health_port)
        running.add_background_task(asyncio.create_task(_stop_on_cancel(health_server)))
    return running


def _credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    if config.tls is not None:
        return server_credentials(config.tls)
    if config.public_tls is not None:
        return public_server_credentials(config.public_tls)
    return None


def _add_port(
    server: grpc.aio.Server, host: str, port: int, credentials: grpc.ServerCredentials | None
) -> int:
    """Binds host:port (secure with credentials); returns the bound port. Raises OSError."""
    address = _bind_address(host, port)
    try:
        if credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, credentials)
    except RuntimeError as error:
        raise OSError(f"cannot bind {host}:{port}: {error}") from error
    if bound == 0:
        raise OSError(f"cannot bind {host}:{port}")
    return bound


def _health_server(health: health_aio.HealthServicer, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """A plaintext server with health (the same servicer, so the same statuses) and reflection only.

    NOTE: a server of its own, not a second port of the role's server: a port added there would serve
    every service, and only the role check would stand between a caller without certificate and them.
    """
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection([HEALTH_SERVICE_NAME, reflection.SERVICE_NAME], server)
    return server, _add_port(server, host, port, None)


async def _stop_on_cancel(server: grpc.aio.Server) -> None:
    """Waits until cancelled (RunningServer.stop cancels background tasks), then stops server."""
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop(None)


def install_signal_handlers(loop: asyncio.AbstractEventLoop, on_stop: Callable[[], Awaitable[None]]) -> None:
    """Runs on_stop once on the first SIGTERM or SIGINT.

    A second signal gets the default behaviour (SIGINT: KeyboardInterrupt, SIGTERM: exit), so an
    operator can always force a stuck shutdown.
    """
    stop_tasks: list[asyncio.Task[None]] = []  # keeps the task referenced until it finishes

    async def run_on_stop() -> None:
        await on_stop()

    def handle(signum: int) -> None:
        logger.info("received %s, shutting down", signal.Signals(signum).name)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        stop_tasks.append(loop.create_task(run_on_stop()))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, handle, sig)


async def wait_for_serving(address: str, timeout_s: float, service: str = "") -> None:
    """Polls the health service at address until `service` ('' = the whole server) is SERVING.

    Raises TimeoutError after timeout_s.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    last_state = "no answer"
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"{address} not SERVING after {timeout_s:.1f} s ({last_state})")
            try:
                reply = await stub.Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=min(1.0, remaining)
                )
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last_state = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
            except grpc.aio.AioRpcError as error:
                last_state = error.code().name
            await asyncio.sleep(min(0.05, max(0.0, deadline - loop.time())))
