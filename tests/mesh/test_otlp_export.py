"""Traces leave through OTLP when the standard OTEL_* variables say so, to a real collector endpoint."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]

# A role's process: telemetry set up as `kvmesh serve` does, then one traced call to its own health service.
CHILD = """
import asyncio
from kvmesh.mesh.telemetry import setup_telemetry, tracer
provider = setup_telemetry("kvmesh-gateway")
from cache_store.server import CacheStoreConfig, serve
async def main():
    running = await serve(CacheStoreConfig())
    with tracer("child").start_as_current_span("route"):
        pass
    await running.stop(0)
asyncio.run(main())
provider.shutdown()
"""


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[tuple[str, str]] = []
        self.received = threading.Event()

    def Export(self, request, context):  # noqa: N802 (generated name)
        for resource_spans in request.resource_spans:
            service = next(
                a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"
            )
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend((service, span.name) for span in scope_spans.spans)
        self.received.set()
        return trace_service_pb2.ExportTraceServiceResponse()


def test_spans_are_exported_over_otlp_with_the_service_name_from_the_environment():
    collector = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_SERVICE_NAME": "kvmesh-gateway-pod-7",
        }
        env.pop("OTEL_TRACES_EXPORTER", None)
        child = subprocess.run(
            [sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=60
        )
        assert child.returncode == 0, child.stderr
        assert collector.received.wait(10)
    finally:
        server.stop(0)
    assert ("kvmesh-gateway-pod-7", "route") in collector.spans
