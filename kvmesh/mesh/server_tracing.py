"""Server spans for grpc.aio that never keep an OpenTelemetry context attached across a `yield`.

OpenTelemetry's own aio server interceptor wraps a response stream in `with start_as_current_span(...)`
around `yield response`. When a client cancels, grpc.aio drops the stream's generator at that `yield`,
and the event loop later closes it from another task: detaching the context token there fails
("Failed to detach context", an ERROR with a traceback) for every cancelled stream. Here the span is made
current only while the handler runs one step (`anext`), and ended from wherever the stream ends.
Unary calls keep OpenTelemetry's interceptor as it is (they never yield).
"""

from __future__ import annotations

import copy
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio
from opentelemetry import trace
from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorServer
from opentelemetry.instrumentation.grpc._aio_server import (
    OpenTelemetryAioServerInterceptor,
    _OpenTelemetryAioServicerContext,
)
from opentelemetry.propagate import extract


class _SpanArguments:
    """Stands in for the tracer while OpenTelemetry's _start_span builds a server span's arguments."""

    def start_as_current_span(self, **arguments: Any) -> dict[str, Any]:
        return arguments


class StreamSafeServerInterceptor(OpenTelemetryAioServerInterceptor):  # type: ignore[misc]
    """OpenTelemetry's aio server interceptor, with response streams traced step by step."""

    def _intercept_aio_server_stream(
        self, behavior: Callable[..., AsyncIterator[Any]], handler_call_details: grpc.HandlerCallDetails
    ) -> Callable[..., AsyncIterator[Any]]:
        async def stream_interceptor(request_or_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
            span = self._start_server_span(handler_call_details, context)
            traced = _OpenTelemetryAioServicerContext(context, span)
            responses = behavior(request_or_iterator, traced)
            try:
                while True:
                    # NOTE: current only while the handler runs one step: no token outlives a yield.
                    with trace.use_span(
                        span, end_on_exit=False, record_exception=False, set_status_on_exception=False
                    ):
                        try:
                            response = await anext(responses)
                        except StopAsyncIteration:
                            break
                    yield response
            except Exception as error:
                if type(error) is not Exception:  # a bare Exception is grpc's abort (as OpenTelemetry does)
                    span.record_exception(error)
                raise
            finally:
                await responses.aclose()
                span.end()

        return stream_interceptor

    def _start_server_span(self, handler_call_details: grpc.HandlerCallDetails, context: Any) -> trace.Span:
        """A started (not current) server span with OpenTelemetry's attributes, child of the caller's."""
        shim = copy.copy(self)
        shim._tracer = _SpanArguments()
        arguments = shim._start_span(handler_call_details, context)
        metadata = context.invocation_metadata()
        parent = extract({md.key: md.value for md in metadata}) if metadata else None
        return self._tracer.start_span(
            arguments["name"], context=parent, kind=arguments["kind"], attributes=arguments["attributes"]
        )


class StreamSafeInstrumentor(GrpcAioInstrumentorServer):  # type: ignore[misc]
    """GrpcAioInstrumentorServer that puts StreamSafeServerInterceptor first on every grpc.aio server."""

    def _instrument(self, **kwargs: Any) -> None:
        self._original_func = grpc.aio.server
        tracer = trace.get_tracer(__name__, tracer_provider=kwargs.get("tracer_provider"))
        original, filter_ = self._original_func, self._filter

        def server(*args: Any, **server_kwargs: Any) -> grpc.aio.Server:
            interceptors = list(server_kwargs.get("interceptors") or ())
            interceptors.insert(0, StreamSafeServerInterceptor(tracer, filter_=filter_))
            server_kwargs["interceptors"] = interceptors
            return original(*args, **server_kwargs)

        grpc.aio.server = server
