"""Tracing and metrics set-up, shared by every role.

Tracing: an OpenTelemetry TracerProvider, with grpc.aio servers and channels instrumented so the W3C
`traceparent` travels over every hop. No OTLP exporter is installed; `OTEL_TRACES_EXPORTER=console`
prints spans, and tests attach their own processor (add_span_processor).

Metrics: OpenTelemetry instruments (GenAI names) are exported through prometheus_client's default
registry, next to any prometheus_client metric, and served by start_metrics_server.

NOTE: OpenTelemetry providers and the grpc instrumentation are process-wide, so set-up happens once per
process; in embedded mode (all roles in one process) the first role's service name wins.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import prometheus_client
from opentelemetry import metrics, trace
from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.instrumentation.grpc import GrpcAioInstrumentorClient
from opentelemetry.instrumentation.grpc import filters as grpc_filters
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

from kvmesh.mesh.server_tracing import StreamSafeInstrumentor

_tracer_provider: TracerProvider | None = None
"""The process's tracer provider, once setup_telemetry has run."""


def _not_infrastructure() -> grpc_filters.Condition:
    # Health polls and reflection would drown the request traces; they carry no request.
    # NOTE: PublishKVEvents is a long-lived client stream written with call.write(); the aio client
    # instrumentation wraps client streams as request iterators and silently stops such writes.
    return grpc_filters.negate(
        grpc_filters.any_of(
            grpc_filters.health_check(),
            grpc_filters.service_prefix("grpc.reflection."),
            grpc_filters.method_name("PublishKVEvents"),
        )
    )


def setup_telemetry(service_name: str) -> TracerProvider:
    """Installs the tracer and meter providers and instruments grpc.aio; idempotent.

    Must run before the first grpc.aio server or channel is created, or those go untraced.
    """
    global _tracer_provider
    if _tracer_provider is not None:
        return _tracer_provider
    # The standard variables win: OTEL_SERVICE_NAME names the service (a Kubernetes pod sets it).
    resource = Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME") or service_name})
    tracer_provider = TracerProvider(resource=resource)
    exporter = os.environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "console":
        tracer_provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    elif exporter == "otlp" or (not exporter and os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")):
        # OTLP over gRPC; the exporter reads OTEL_EXPORTER_OTLP_* (endpoint, headers, timeout) itself.
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(tracer_provider)
    # PrometheusMetricReader registers itself with prometheus_client's default registry.
    meter_provider = MeterProvider(resource=resource, metric_readers=[PrometheusMetricReader()])
    metrics.set_meter_provider(meter_provider)

    # Not GrpcAioInstrumentorServer: see kvmesh.mesh.server_tracing (cancelled streams, quiet logs).
    StreamSafeInstrumentor(filter_=_not_infrastructure()).instrument(tracer_provider=tracer_provider)
    GrpcAioInstrumentorClient(filter_=_not_infrastructure()).instrument(tracer_provider=tracer_provider)
    _tracer_provider = tracer_provider
    return tracer_provider


def add_span_processor(processor: SpanProcessor) -> None:
    """Attaches a span processor (tests: SimpleSpanProcessor(InMemorySpanExporter())).

    Raises RuntimeError before setup_telemetry.
    """
    if _tracer_provider is None:
        raise RuntimeError("call setup_telemetry() before add_span_processor()")
    _tracer_provider.add_span_processor(processor)


def tracer(name: str) -> trace.Tracer:
    """A tracer for one module (pass __name__); a no-op tracer before setup_telemetry."""
    return trace.get_tracer(name)


@contextmanager
def span_across_yields(tracer: trace.Tracer, name: str) -> Iterator[trace.Span]:
    """A span for a block that yields (in an async generator): started and ended, never made current.

    NOTE: `with start_as_current_span(...)` around a yield attaches a context that must be detached in
    the same task; a cancelled stream's generator is closed from another task, where that fails with
    "Failed to detach context" and a traceback. Spans started inside the block are not its children.
    """
    span = tracer.start_span(name)
    try:
        yield span
    except Exception as error:
        span.record_exception(error)
        raise
    finally:
        span.end()


def meter(name: str) -> metrics.Meter:
    """A meter for one module (pass __name__); its instruments appear on the metrics port."""
    return metrics.get_meter(name)


def start_metrics_server(port: int, host: str) -> int:
    """Serves prometheus_client's default registry over HTTP (/metrics) on a daemon thread.

    host: the interface to bind, the role's own (ServerConfig.metrics_bind_host) unless told otherwise;
    "0.0.0.0" exposes the metrics on every interface. port 0 picks a free port; returns the bound port.
    """
    http_server, _thread = prometheus_client.start_http_server(port, addr=host)
    return int(http_server.server_port)
