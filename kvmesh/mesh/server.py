"""Shared gRPC server scaffolding: every role starts, reports health and stops the same way.

A role's service stays thin (decode, call the core, encode): errors, health, reflection, deadlines and
graceful shutdown live here, written once.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import signal
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from kvmesh.mesh.request_decoding import UndecodableRequest, tolerant_deserializer
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


class ServiceError(Exception):
    """An error for the client: the error interceptor turns it into a gRPC status.

    NOTE: the message is sent to the client as is; say what to fix, and never include the request's
    code or text.
    """

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> ServiceError:
    """INVALID_ARGUMENT: the client sent a bad value; the message names the field and what to send."""
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message)


def never_fits(worker: str, num_blocks_needed: int, num_blocks_total: int) -> ServiceError:
    """RESOURCE_EXHAUSTED for a prompt that a worker's whole KV pool could not hold, even empty."""
    return ServiceError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"the prompt can never fit this {worker} worker's KV pool ({num_blocks_needed} blocks needed, "
        f"{num_blocks_total} in all); send a shorter prompt",
    )


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps handler exceptions to statuses, for unary and streaming handlers alike.

    - a request that is not valid protobuf (kvmesh.mesh.request_decoding) -> INVALID_ARGUMENT naming the
      message type (and the field, for a string that is not UTF-8), logged at INFO.
    - ServiceError -> its own code and message.
    - grpc.aio.AioRpcError from a downstream call -> the downstream code and details, so UNAVAILABLE,
      RESOURCE_EXHAUSTED and DEADLINE_EXCEEDED reach the caller unchanged.
    - anything else -> INTERNAL with a short reference; the traceback is logged under the same reference.
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        # grpc deserializes before the handler runs: a DecodeError there would be UNKNOWN and an ERROR
        # traceback. The tolerant deserializer hands the guard an UndecodableRequest instead.
        request_deserializer = tolerant_deserializer(handler.request_deserializer, method)
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(
                _guard_stream(handler.stream_stream, method, request_streaming=True),
                request_deserializer=request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                _guard_stream(handler.unary_stream, method),
                request_deserializer=request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(
                _guard_unary(handler.stream_unary, method, request_streaming=True),
                request_deserializer=request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.unary_unary_rpc_method_handler(
            _guard_unary(handler.unary_unary, method),
            request_deserializer=request_deserializer,
            response_serializer=handler.response_serializer,
        )


async def _abort_for(error: Exception, context: grpc.aio.ServicerContext, method: str) -> None:
    """Aborts the call with the status that error stands for; always raises."""
    if isinstance(error, ServiceError):
        logger.debug("%s -> %s", method, error.code.name)
        await context.abort(error.code, error.message)
    if isinstance(error, grpc.aio.AioRpcError):
        logger.info("%s -> %s from a downstream call", method, error.code().name)
        await context.abort(error.code(), error.details() or "")
    error_id = uuid.uuid4().hex[:12]
    # NOTE: the exception's message is left out on purpose: library errors often quote their input,
    # and the input here is a user's source code. Type, frames and reference are enough to debug.
    frames = "".join(traceback.format_tb(error.__traceback__))
    logger.error("%s failed: %s (ref %s)\n%s", method, type(error).__name__, error_id, frames)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error (ref {error_id})")


def _undecodable(request: UndecodableRequest, method: str) -> ServiceError:
    logger.info("%s -> INVALID_ARGUMENT: %s", method, request.message)
    return invalid(request.message)


class _CheckedRequests:
    """A request stream that raises ServiceError (INVALID_ARGUMENT) at a message that did not decode."""

    def __init__(self, requests: AsyncIterator[Any], method: str) -> None:
        self._requests = requests
        self._method = method

    def __aiter__(self) -> _CheckedRequests:
        return self

    async def __anext__(self) -> Any:
        request = await anext(self._requests)
        if isinstance(request, UndecodableRequest):
            raise _undecodable(request, self._method)
        return request


def _checked(request: Any, method: str, request_streaming: bool) -> Any:
    """The request (or stream of them) the handler gets; raises ServiceError for one that did not decode."""
    if request_streaming:
        return _CheckedRequests(request, method)
    if isinstance(request, UndecodableRequest):
        raise _undecodable(request, method)
    return request


def _guard_unary(
    behavior: Callable[..., Awaitable[Any]], method: str, request_streaming: bool = False
) -> Callable[..., Awaitable[Any]]:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(_checked(request, method, request_streaming), context)
        except grpc.aio.AbortError:
            raise  # the handler aborted on its own; the status is already set
        except Exception as error:
            await _abort_for(error, context, method)

    return guarded


def _guard_stream(
    behavior: Callable[..., Any], method: str, request_streaming: bool = False
) -> Callable[..., Any]:
    # A streaming handler is either an async generator or a coroutine that calls context.write();
    # the wrapper must be the same kind, or grpc.aio would not drive it.
    if inspect.isasyncgenfunction(behavior):

        async def guarded_gen(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for response in behavior(_checked(request, method, request_streaming), context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as error:
                await _abort_for(error, context, method)

        return guarded_gen
    return _guard_unary(behavior, method, request_streaming)


def deadline_s(context: grpc.aio.ServicerContext) -> float | None:
    """Seconds left before the incoming call's deadline; None when the caller set no deadline."""
    remaining = context.time_remaining()
    if remaining is None:
        return None
    return max(0.0, float(remaining))


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
