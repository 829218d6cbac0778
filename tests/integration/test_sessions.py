"""Editor sessions (Gateway.Session) through the real mesh: supersede, reuse, predict-ahead, errors."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
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
