"""Typing traces (kvmesh.client_trace), their replay (kvmesh.client_replay) and `kvmesh replay`, through
the real mesh."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc.aio
import pytest

from kvmesh.cli.main import main
from kvmesh.client import Client
from kvmesh.client_keystrokes import summarize
from kvmesh.client_replay import replay
from kvmesh.client_trace import Trace, TraceConfig, make_trace
from kvmesh.v1 import gateway_pb2_grpc
from tests.mesh_harness import MeshInThread, MeshSpec

BEFORE = "import os\n\n\ndef read_config(path):\n    with open(path) as f:\n"
AFTER = "    return config\n\n\nprint(read_config('x'))\n"
CONFIG = TraceConfig(num_lines=1, char_ms=40, word_pause_ms=5, line_pause_ms=5, typo_rate=0.0, accept_ms=200)


def test_a_trace_types_its_region_back_with_pauses_and_typos():
    text = "a = 1\n" * 10 + "value = compute(alpha, beta)\n" + "b = 2\n" * 10
    config = TraceConfig(num_lines=1, start_line=10, typo_rate=0.5, seed=3)
    trace = make_trace("f.py", text, config)
    assert trace.region == "value = compute(alpha, beta)\n"
    assert trace.document == "a = 1\n" * 10 + "b = 2\n" * 10
    assert len(trace.steps) == len(trace.region)
    assert [s.look for s in trace.steps] == [c in " \n.,:;()[]{}=\t" for c in trace.region]
    assert any(s.typo for s in trace.steps)
    assert all(not s.typo for s, c in zip(trace.steps, trace.region, strict=True) if not c.isalpha())
    after_word = trace.steps[trace.region.index(" ") + 1].delay_ms
    assert after_word >= config.char_ms * (1 - config.jitter) + config.word_pause_ms
    assert make_trace("f.py", text, config) == trace  # seeded


def test_a_trace_survives_save_and_load(tmp_path: Path):
    trace = make_trace("f.py", "x = 1\n" * 8, TraceConfig(num_lines=2, seed=1))
    trace.save(tmp_path / "trace.json")
    assert Trace.load(tmp_path / "trace.json") == trace


@pytest.fixture(scope="module")
def mesh(mesh_model_path: Path):
    with MeshInThread(MeshSpec(str(mesh_model_path), num_blocks=512)) as mesh:
        yield mesh


def file_the_model_completes(address: str) -> str:
    """A file whose middle line is " " + the model's own greedy one-line suggestion after that space: the
    typist types the space, sees the suggestion, and accepts it."""
    with Client(address) as client:
        document = BEFORE + " " + AFTER
        chunks = list(client.complete(document=(document, BEFORE.count("\n"), 1), max_tokens=16, stop=["\n"]))
    suggestion = "".join(c.text for c in chunks)
    assert suggestion and "\n" not in suggestion
    return BEFORE + " " + suggestion + "\n" + AFTER


@pytest.mark.parametrize("mode", ["session", "stateless"])
def test_a_replay_accepts_the_suggestion_the_file_says_next(mesh, mode):
    text = file_the_model_completes(mesh.gateway_address)
    trace = make_trace("f.py", text, TraceConfig(**{**CONFIG.__dict__, "start_line": BEFORE.count("\n")}))

    async def go():
        async with grpc.aio.insecure_channel(mesh.gateway_address) as channel:
            return await replay(gateway_pb2_grpc.GatewayStub(channel), trace, mode, max_tokens=16)

    keystrokes, num_accepts = asyncio.run(go())
    assert num_accepts == 1
    assert [k.kind for k in keystrokes] == ["type", "accept", "type"]  # " ", Tab, "\n"
    summary = summarize(keystrokes, num_accepts)
    assert keystrokes[0].latency_ms is not None and keystrokes[2].latency_ms is not None
    if mode == "session":
        assert summary.num_visible == 3  # the accept's suggestion was ready: the next keystroke came later
        assert keystrokes[1].usage is not None
        assert keystrokes[1].usage.source == 3  # PREDICTED: computed before the accept
        assert set(summary.sources) <= {"MODEL", "PREDICTED", "REUSED"}
    else:
        assert set(summary.sources) == {"UNSPECIFIED"}  # a stateless call has no source


def test_kvmesh_replay_prints_a_summary(mesh, tmp_path: Path, capsys):
    path = tmp_path / "f.py"
    path.write_text(BEFORE + "    config = parse(f.read())\n" + AFTER, encoding="utf-8")
    argv = [
        "replay",
        "--target",
        mesh.gateway_address,
        "--file",
        str(path),
        "--start-line",
        "5",
        "--lines",
        "1",
    ]
    trace_path = tmp_path / "trace.json"
    assert main([*argv, "--speed", "20", "--save-trace", str(trace_path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_keystrokes"] >= len("    config = parse(f.read())\n")
    assert summary["num_visible"] >= 1
    stateless = [
        "replay",
        "--target",
        mesh.gateway_address,
        "--trace",
        str(trace_path),
        "--mode",
        "stateless",
    ]
    assert main([*stateless, "--speed", "20"]) == 0
    assert "keystrokes" in capsys.readouterr().out.splitlines()[-1]


def test_kvmesh_replay_of_a_missing_file_is_exit_2(tmp_path: Path, capsys):
    assert main(["replay", "--file", str(tmp_path / "missing.py")]) == 2
    assert "missing.py" in capsys.readouterr().err
