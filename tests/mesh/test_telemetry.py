"""Trace context crosses a real grpc.aio streaming call; handler errors become statuses and span errors.

The toy server is the generated Gateway service behind kvmesh.mesh.server.start_server, so these also cover
the shared error interceptor and deadline_s.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from kvmesh.mesh import telemetry
from kvmesh.mesh.errors import ServiceError, deadline_s
from kvmesh.mesh.server import RunningServer, ServerConfig, start_server, wait_for_serving
from kvmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

GATEWAY = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name


class ToyGateway(gateway_pb2_grpc.GatewayServicer):
    """Complete streams three chunks; Edit fails as its snippet says, after one chunk."""

    def __init__(self) -> None:
        self.seen_deadline_s: list[float | None] = []

    async def Complete(
        self, request: gateway_pb2.CompleteRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.CompletionChunk]:
        self.seen_deadline_s.append(deadline_s(context))
        for i in range(3):
            yield gateway_pb2.CompletionChunk(text=f"t{i}", token_ids=[i])
        yield gateway_pb2.CompletionChunk(
            finish_reason=common_pb2.FINISH_REASON_STOP, usage=common_pb2.Usage()
        )

    async def Edit(
        self, request: gateway_pb2.EditRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.CompletionChunk]:
        yield gateway_pb2.CompletionChunk(text="x")
        if request.snippet == "invalid":
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, "snippet is invalid")
        raise RuntimeError("secret source code must not reach the client")


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    telemetry.setup_telemetry("kvmesh-test")
    exporter = InMemorySpanExporter()
    telemetry.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


async def _start(servicer: ToyGateway) -> RunningServer:
    running = await start_server(
        [(gateway_pb2_grpc.add_GatewayServicer_to_server, servicer)], [GATEWAY], ServerConfig(port=0)
    )
    # Health stays NOT_SERVING until the role says it is warm.
    for service in ("", GATEWAY):
        reply = await running.health.Check(health_pb2.HealthCheckRequest(service=service), None)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
    await running.set_serving()
    await wait_for_serving(running.address, timeout_s=10, service=GATEWAY)
    return running


def _by_kind(spans: tuple[ReadableSpan, ...], name: str, kind: SpanKind) -> ReadableSpan:
    matching = [s for s in spans if s.name == name and s.kind == kind]
    assert len(matching) == 1, [(s.name, s.kind) for s in spans]
    return matching[0]


def test_streaming_call_shares_one_trace(spans: InMemorySpanExporter) -> None:
    servicer = ToyGateway()

    async def main() -> list[gateway_pb2.CompletionChunk]:
        running = await _start(servicer)
        try:
            with telemetry.tracer(__name__).start_as_current_span("root"):
                async with grpc.aio.insecure_channel(running.address) as channel:
                    stub = gateway_pb2_grpc.GatewayStub(channel)
                    return [
                        c async for c in stub.Complete(gateway_pb2.CompleteRequest(prefix="a"), timeout=30)
                    ]
        finally:
            await running.stop(0)

    spans.clear()
    chunks = asyncio.run(main())
    assert [c.text for c in chunks] == ["t0", "t1", "t2", ""]
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_STOP
    deadline = servicer.seen_deadline_s[0]
    # The client's 30 s deadline arrives as a timestamp; clock rounding can add a fraction of a second.
    assert deadline is not None and 0 < deadline <= 31

    finished = spans.get_finished_spans()
    root = _by_kind(finished, "root", SpanKind.INTERNAL)
    client = _by_kind(finished, "/kvmesh.v1.Gateway/Complete", SpanKind.CLIENT)
    server = _by_kind(finished, "/kvmesh.v1.Gateway/Complete", SpanKind.SERVER)
    assert {root.context.trace_id, client.context.trace_id, server.context.trace_id} == {
        root.context.trace_id
    }
    assert client.parent is not None and client.parent.span_id == root.context.span_id
    assert server.parent is not None and server.parent.span_id == client.context.span_id
    assert server.parent.is_remote
    # Health and reflection are infrastructure: never traced.
    assert not [s for s in finished if "grpc.health" in s.name]


@pytest.mark.parametrize(
    ("snippet", "code"), [("invalid", grpc.StatusCode.INVALID_ARGUMENT), ("crash", grpc.StatusCode.INTERNAL)]
)
def test_stream_errors_become_statuses(
    spans: InMemorySpanExporter, snippet: str, code: grpc.StatusCode
) -> None:
    async def main() -> tuple[list[str], grpc.aio.AioRpcError]:
        running = await _start(ToyGateway())
        texts: list[str] = []
        try:
            async with grpc.aio.insecure_channel(running.address) as channel:
                stub = gateway_pb2_grpc.GatewayStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    async for chunk in stub.Edit(gateway_pb2.EditRequest(snippet=snippet), timeout=30):
                        texts.append(chunk.text)
                return texts, raised.value
        finally:
            await running.stop(0)

    spans.clear()
    texts, error = asyncio.run(main())
    assert texts == ["x"]  # what was sent before the error still arrives
    assert error.code() == code
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        assert error.details() == "snippet is invalid"
    else:
        assert "secret" not in (error.details() or "")
        assert (error.details() or "").startswith("internal error (ref ")
    server = _by_kind(spans.get_finished_spans(), "/kvmesh.v1.Gateway/Edit", SpanKind.SERVER)
    assert server.attributes is not None and server.attributes["rpc.grpc.status_code"] == code.value[0]
    # OpenTelemetry's gRPC conventions: a client's mistake is not a server error, a crash is.
    expected = StatusCode.ERROR if code == grpc.StatusCode.INTERNAL else StatusCode.UNSET
    assert server.status.status_code == expected


def test_metrics_server_serves_otel_and_prometheus_metrics(spans: InMemorySpanExporter) -> None:
    counter = telemetry.meter(__name__).create_counter("kvmesh_test_requests", unit="1")
    counter.add(2)
    port = telemetry.start_metrics_server(0, host="127.0.0.1")
    assert port > 0
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        body = response.read().decode()
    assert "kvmesh_test_requests" in body
