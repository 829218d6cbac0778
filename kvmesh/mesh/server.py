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
        if handler.request_streaming and handler.response_streaming:
            return grpc.stream_stream_rpc_method_handler(
                _guard_stream(handler.stream_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                _guard_stream(handler.unary_stream, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.request_streaming:
            return grpc.stream_unary_rpc_method_handler(
                _guard_unary(handler.stream_unary, method),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.unary_unary_rpc_method_handler(
            _guard_unary(handler.unary_unary, method),
            request_deserializer=handler.request_deserializer,
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


def _guard_unary(behavior: Callable[..., Awaitable[Any]], method: str) -> Callable[..., Awaitable[Any]]:
    async def guarded(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise  # the handler aborted on its own; the status is already set
        except Exception as error:
            await _abort_for(error, context, method)

    return guarded


def _guard_stream(behavior: Callable[..., Any], method: str) -> Callable[..., Any]:
    # A streaming handler is either an async generator or a coroutine that calls context.write();
    # the wrapper must be the same kind, or grpc.aio would not drive it.
    if inspect.isasyncgenfunction(behavior):

        async def guarded_gen(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                async for response in behavior(request, context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as error:
                await _abort_for(error, context, method)

        return guarded_gen
    return _guard_unary(behavior, method)


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
    _background: list[asyncio.Task[Any]] = field(default_factory=list)
    _on_stop: list[Callable[[], None]] = field(default_factory=list)
    _stopping: bool = False

    @property
    def address(self) -> str:
        """`host:port` a client on this machine can dial."""
        host = {"0.0.0.0": "127.0.0.1", "::": "[::1]", "[::]": "[::1]", "": "127.0.0.1"}.get(
            self.host, self.host
        )
        return f"{host}:{self.port}"

    async def set_serving(self) -> None:
        """Marks the server ('') and each of its services SERVING; call once warm-up is done."""
        for name in ("", *self.service_names):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def add_background_task(self, task: asyncio.Task[Any]) -> None:
        """Ties a background task (heartbeats, expiry sweeps) to the server: stop() cancels it."""
        self._background.append(task)

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
    the error interceptor. Raises OSError when the address cannot be bound.
    """
    options = [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_message_bytes),
    ]
    # NOTE: looked up at call time, not imported by name, so OpenTelemetry's patched grpc.aio.server
    # (kvmesh.mesh.telemetry) adds its tracing interceptor.
    server = grpc.aio.server(interceptors=[ErrorInterceptor(), *interceptors], options=options)
    for add_fn, servicer in servicers:
        add_fn(servicer, server)

    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    for name in ("", *service_names):
        await health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        [*service_names, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME], server
    )

    try:
        port = server.add_insecure_port(_bind_address(config.host, config.port))
    except RuntimeError as error:
        raise OSError(f"cannot bind {config.host}:{config.port}: {error}") from error
    if port == 0:
        raise OSError(f"cannot bind {config.host}:{config.port}")
    await server.start()
    logger.info("serving %s on %s:%d", ", ".join(service_names), config.host, port)
    return RunningServer(
        server=server, health=health, host=config.host, port=port, service_names=tuple(service_names)
    )


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
