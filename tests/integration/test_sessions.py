"""Editor sessions (Gateway.Session) through the real mesh: supersede, reuse, predict-ahead, errors."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import prometheus_client
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.routing_cost import RoutingConfig
from kvmesh.client import Client
from kvmesh.mesh.telemetry import add_span_processor, setup_telemetry
from tests.integration.test_mesh import _settled
from tests.mesh_harness import MeshInThread, MeshSpec

DOCUMENT = "import os\n\ndef read_config(path):\n    with open(path) as f:\n        \n    return config\n"
LINE, COLUMN = 4, 8
EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module")
def mesh(mesh_model_path: Path):
    setup_telemetry("kvmesh-tests")
    add_span_processor(SimpleSpanProcessor(EXPORTER))
    spec = MeshSpec(str(mesh_model_path), num_blocks=512, routing=RoutingConfig(disagg_min_tokens=0))
    with MeshInThread(spec) as mesh:
        yield mesh


def collect(chunks) -> tuple[str, list[int], object]:
    chunks = list(chunks)
    return "".join(c.text for c in chunks), [t for c in chunks for t in c.token_ids], chunks[-1].usage


def num_generate_calls() -> int:
    return sum(1 for s in EXPORTER.get_finished_spans() if s.name.endswith("DecodeService/Generate"))


def session_counter(name: str, **labels: str) -> float:
    """A kvmesh.session.* counter from this process's metrics (the mesh runs in it), summed over the
    label values not given."""
    return sum(
        sample.value
        for metric in prometheus_client.REGISTRY.collect()
        for sample in metric.samples
        if sample.name == f"kvmesh_session_{name}_total"
        and all(sample.labels.get(key) == value for key, value in labels.items())
    )


def test_a_session_completion_equals_a_stateless_one(mesh):
    with Client(mesh.gateway_address) as client:
        expected = collect(client.complete(document=(DOCUMENT, LINE, COLUMN), max_tokens=12))
        with client.session() as session:
            session.open(DOCUMENT)
            text, tokens, usage = collect(session.complete(LINE, COLUMN, max_tokens=12))
    assert (text, tokens) == expected[:2]
    assert usage.source == "MODEL"


def test_typing_into_a_suggestion_serves_its_rest_with_no_model_call(mesh):
    with Client(mesh.gateway_address) as client, client.session() as session:
        session.open(DOCUMENT)
        text, _, _ = collect(session.complete(LINE, COLUMN, max_tokens=12))
        assert len(text) > 3 and "\n" not in text[:3]
        calls = num_generate_calls()
        session.edit(LINE, COLUMN, LINE, COLUMN, text[:3])
        rest, _, usage = collect(session.complete(LINE, COLUMN + 3, max_tokens=12))
        assert num_generate_calls() == calls
    assert rest == text[3:]
    assert usage.source == "REUSED"


def test_after_accept_the_predicted_suggestion_equals_a_fresh_one(mesh):
    with Client(mesh.gateway_address) as client:
        with client.session(predict_ahead=True) as session:
            session.open(DOCUMENT)
            text, _, _ = collect(session.complete(LINE, COLUMN, max_tokens=8))
            session.accept()
            lines = (DOCUMENT[: DOCUMENT.index("\n    return")] + text).split("\n")
            line, column = len(lines) - 1, len(lines[-1])
            predicted = collect(session.complete(line, column, max_tokens=8))
        accepted = DOCUMENT.replace("f:\n        \n", "f:\n        " + text + "\n", 1)
        fresh = collect(client.complete(document=(accepted, line, column), max_tokens=8))
    assert predicted[2].source == "PREDICTED"
    assert predicted[:2] == fresh[:2]


def test_an_edit_elsewhere_cancels_the_prediction(mesh):
    with Client(mesh.gateway_address) as client, client.session(predict_ahead=True) as session:
        session.open(DOCUMENT)
        collect(session.complete(LINE, COLUMN, max_tokens=8))
        session.edit(0, 0, 0, 0, "# header\n")
        _, _, usage = collect(session.complete(LINE + 1, COLUMN, max_tokens=8))
    assert usage.source == "MODEL"
    loads = _settled(mesh)
    assert all(load.num_blocks_free == load.num_blocks_total for load in loads.values()), loads


def test_a_newer_completion_supersedes_and_frees_the_old_one(mesh):
    with Client(mesh.gateway_address) as client, client.session() as session:
        session.open(DOCUMENT * 8)
        old = session.complete(LINE, COLUMN, max_tokens=200)
        session.edit(LINE, COLUMN, LINE, COLUMN, "zq")  # not what the model writes
        new = session.complete(LINE, COLUMN + 2, max_tokens=4)
        old_chunks = list(old)
        assert not old_chunks or old_chunks[-1].usage is None  # ended by the newer one, unfinished
        _, _, usage = collect(new)
        assert usage.source == "MODEL"
    loads = _settled(mesh)
    assert all(
        load.num_running == 0 and load.num_blocks_free == load.num_blocks_total for load in loads.values()
    )


def test_a_dropped_session_frees_everything(mesh):
    with Client(mesh.gateway_address) as client:
        session = client.session()
        session.open(DOCUMENT * 8)
        chunks = session.complete(LINE, COLUMN, max_tokens=400)
        next(chunks)
        session.close()
    time.sleep(0.2)
    loads = _settled(mesh)
    assert all(
        load.num_running == 0 and load.num_blocks_free == load.num_blocks_total for load in loads.values()
    )


@pytest.mark.parametrize(
    ("send", "field"),
    [
        (lambda s: s.edit(40, 0, 40, 0, "x"), "change.range.start_line"),
        (lambda s: s.edit(0, 3, 0, 99, "x"), "change.range.end_column"),
        (lambda s: (setattr(s, "version", 5), s.edit(0, 0, 0, 0, "x")), "change.version"),
        (lambda s: list(s.complete(0, 200)), "complete.column"),
        (lambda s: s.open("again"), "open"),
    ],
)
def test_bad_changes_are_invalid_argument_naming_the_field(mesh, send, field):
    with Client(mesh.gateway_address) as client, client.session() as session:
        session.open(DOCUMENT)
        with pytest.raises(grpc.RpcError) as raised:
            send(session)
            list(session.complete(0, 0, max_tokens=2))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in raised.value.details()


def test_a_superseded_request_in_prefill_is_cancelled_on_the_prefill_worker(mesh):
    def num_cancel_prefills() -> int:
        spans = EXPORTER.get_finished_spans()
        return sum(
            1 for s in spans if s.name == "/kvmesh.v1.Prefill/CancelPrefill" and s.kind.name == "SERVER"
        )

    cancels = num_cancel_prefills()
    for attempt in range(3):  # the supersede must land while the old prompt is still in prefill
        # The cursor at the start: the layout puts the suffix first, so a unique first line makes every
        # block new and the ~1,800-token prompt takes ~100 ms on the prefill worker.
        document = f"# supersede in prefill {attempt} {time.time_ns()}\n" + DOCUMENT * 60
        with Client(mesh.gateway_address) as client, client.session() as session:
            session.open(document)
            old = session.complete(0, 0, max_tokens=50)
            time.sleep(0.05)
            session.edit(0, 0, 0, 0, "zq")
            new = session.complete(0, 2, max_tokens=4)
            old_chunks = list(old)
            assert not old_chunks or old_chunks[-1].usage is None  # cut by the newer one
            assert collect(new)[2].source == "MODEL"
        loads = _settled(mesh)
        assert all(
            load.num_running == 0 and load.num_blocks_free == load.num_blocks_total for load in loads.values()
        )
        if not old_chunks and num_cancel_prefills() > cancels:
            return
    pytest.fail("no superseded request reached the prefill worker's CancelPrefill in 3 tries")


def test_tokens_of_superseded_and_unused_predicted_requests_count_as_wasted(mesh):
    superseded = session_counter("wasted_tokens", reason="superseded")
    predicted = session_counter("wasted_tokens", reason="prediction")
    computed = session_counter("computed_tokens")
    with Client(mesh.gateway_address) as client, client.session(predict_ahead=True) as session:
        session.open(DOCUMENT * 8)
        old = session.complete(LINE, COLUMN, max_tokens=200)
        next(old)  # it has generated tokens
        session.edit(LINE, COLUMN, LINE, COLUMN, "zq")  # not what the model writes
        collect(session.complete(LINE, COLUMN + 2, max_tokens=8))
        time.sleep(0.5)  # the prediction made after it runs to its end
        session.edit(0, 0, 0, 0, "# header\n")  # contradicts the prediction
        collect(session.complete(LINE + 1, COLUMN + 2, max_tokens=2))
    _settled(mesh)
    wasted_superseded = session_counter("wasted_tokens", reason="superseded") - superseded
    wasted_predicted = session_counter("wasted_tokens", reason="prediction") - predicted
    assert wasted_superseded >= 1
    assert wasted_predicted >= 1
    assert session_counter("computed_tokens") - computed >= wasted_superseded + wasted_predicted + 8


@pytest.fixture(scope="module")
def limited_mesh(mesh_model_path: Path):
    limits = {"max_sessions_per_tenant": 2, "session_idle_timeout_s": 0.5, "max_document_chars": 2000}
    with MeshInThread(MeshSpec(str(mesh_model_path), num_blocks=256, gateway=limits)) as mesh:
        yield mesh


def test_a_tenant_past_its_session_limit_gets_resource_exhausted(limited_mesh):
    with Client(limited_mesh.gateway_address) as client:
        first, second = client.session(), client.session()
        for session in (first, second):
            session.open(DOCUMENT)
            collect(session.complete(LINE, COLUMN, max_tokens=2))  # the gateway holds it now
        with client.session() as third, pytest.raises(grpc.RpcError) as raised:
            third.open(DOCUMENT)
            list(third.complete(LINE, COLUMN, max_tokens=2))
        assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_sessions_per_tenant" in raised.value.details()
        first.close()
        deadline = time.monotonic() + 5
        while True:  # the gateway frees the slot once it sees the stream end
            try:
                with client.session() as fourth:
                    fourth.open(DOCUMENT)
                    assert collect(fourth.complete(LINE, COLUMN, max_tokens=2))[2].source == "MODEL"
                break
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        second.close()


def test_an_idle_session_is_closed_with_deadline_exceeded(limited_mesh):
    with Client(limited_mesh.gateway_address) as client, client.session() as session:
        session.open(DOCUMENT)
        collect(session.complete(LINE, COLUMN, max_tokens=2))
        time.sleep(1.0)  # twice session_idle_timeout_s
        with pytest.raises(grpc.RpcError) as raised:
            list(session.complete(LINE, COLUMN, max_tokens=2))
    assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "session_idle_timeout_s" in raised.value.details()


@pytest.mark.parametrize(
    ("send", "field"),
    [
        (lambda s: s.open("x" * 2001), "open.text"),
        (lambda s: s.open("x", context="y" * 2001), "open.context"),
        (lambda s: (s.open("x" * 1990), s.edit(0, 0, 0, 0, "z" * 11)), "change.text"),
    ],
)
def test_a_document_past_the_size_limit_is_invalid_argument_naming_the_field(limited_mesh, send, field):
    with (
        Client(limited_mesh.gateway_address) as client,
        client.session() as session,
        pytest.raises(grpc.RpcError) as raised,
    ):
        send(session)
        list(session.complete(0, 0, max_tokens=2))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in raised.value.details()
    assert "max_document_chars" in raised.value.details()
