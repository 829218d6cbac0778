"""Errors for clients, in one place: ServiceError and its constructors, and the interceptor that turns
every handler's exceptions (and undecodable requests) into gRPC statuses, for unary and streaming
handlers alike."""

from __future__ import annotations

import inspect
import logging
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import grpc.aio

from kvmesh.mesh.request_decoding import UndecodableRequest, tolerant_deserializer

logger = logging.getLogger(__name__)


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
