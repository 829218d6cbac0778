"""End to end: the four roles as real gRPC servers on loopback, driven through the public API."""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.layout import PromptLayout
from gateway.routing_cost import RoutingConfig
from kvmesh.client import Client
from kvmesh.engine.engine import Engine
from kvmesh.engine.generate import generate_speculative
from kvmesh.engine.speculative import DraftCursor
from kvmesh.mesh.telemetry import add_span_processor, setup_telemetry
from kvmesh.v1 import decode_pb2, decode_pb2_grpc, gateway_pb2
from tests.engine.test_speculative import NUM_FREE_RUN, edit_lists, edited
from tests.factories import random_ids
from tests.mesh_harness import MeshInThread, MeshSpec

PREFIX = "import os\n\ndef read_config(path):\n    with open(path) as f:\n        "
SUFFIX = "\n    return config\n"
EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module")
def model_path(mesh_model_path: Path) -> Path:
    setup_telemetry("kvmesh-tests")
    add_span_processor(SimpleSpanProcessor(EXPORTER))
    return mesh_model_path


@pytest.fixture(scope="module")
def engine(model_path: Path) -> Engine:
    return Engine.from_pretrained(model_path)


def expected_completion(engine: Engine, prefix: str, suffix: str, max_tokens: int) -> list[int]:
    prompt = PromptLayout(engine.tokenizer).completion(prefix, suffix)
    return engine.generate(prompt, max_tokens)


def stream(address: str, **kwargs) -> tuple[list[int], str, object]:
    with Client(address) as client:
        chunks = list(client.complete(**kwargs))
    return [t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks), chunks[-1]


@pytest.mark.parametrize(
    ("worker_transports", "gateway_transport", "num_prefill", "transport"),
    [
        (("shm", "grpc"), "shm", 1, "shm"),
        (("shm", "grpc"), "grpc", 1, "grpc"),
        # The NCCL transport's gloo twin (CPU pools), chosen by the gateway, through the real servers.
        (("nccl", "grpc"), "auto", 1, "nccl"),
        # Device to device (GPU pools only: KVMESH_TEST_DEVICE=cuda), chosen by the gateway.
        (("cuda_ipc", "grpc"), "auto", 1, "cuda_ipc"),
        (("grpc",), "auto", 0, ""),
    ],
    ids=["shm", "grpc", "nccl", "cuda_ipc", "decode-prefills-itself"],
)
def test_streamed_completion_equals_the_engine_in_process(
    model_path, engine, worker_transports, gateway_transport, num_prefill, transport
):
    device = MeshSpec(str(model_path)).device
    if transport == "cuda_ipc" and device == "cpu":
        pytest.skip("cuda_ipc moves KV between CUDA pools; run with KVMESH_TEST_DEVICE=cuda")
    if transport == "nccl" and device != "cpu":
        pytest.skip("NCCL refuses two ranks on one GPU; the gloo twin runs on CPU pools")
    spec = MeshSpec(
        str(model_path),
        num_prefill=num_prefill,
        worker_transports=worker_transports,
        routing=RoutingConfig(transport=gateway_transport, disagg_min_tokens=0),
    )
    expected = expected_completion(engine, PREFIX, SUFFIX, 24)
    with MeshInThread(spec) as mesh:
        tokens, text, last = stream(mesh.gateway_address, prefix=PREFIX, suffix=SUFFIX, max_tokens=24)
    assert tokens == expected
    assert text == engine.tokenizer.decode(expected)
    usage = last.usage
    assert usage.completion_tokens == len(expected)
    assert usage.prompt_tokens == len(PromptLayout(engine.tokenizer).completion(PREFIX, SUFFIX))
    assert usage.cached_tokens == 0 and usage.prefilled_tokens == usage.prompt_tokens
    assert usage.transport == transport
    if num_prefill:
        assert usage.transfer_bytes == -(-(usage.prompt_tokens - 1) // 16) * engine.kv_bytes_per_token * 16
    else:
        assert usage.transfer_bytes == 0
    assert usage.ttft_ms > 0 and usage.stage_ms["decode"] > 0


@pytest.mark.parametrize("transport", ["shm", "grpc"])
def test_a_repeat_keystroke_reuses_the_cached_prefix_and_ships_only_the_rest(model_path, engine, transport):
    spec = MeshSpec(str(model_path), routing=RoutingConfig(transport=transport, disagg_min_tokens=0))
    with MeshInThread(spec) as mesh:
        _, _, first = stream(mesh.gateway_address, prefix=PREFIX, suffix=SUFFIX, max_tokens=8)
        tokens, _, second = stream(mesh.gateway_address, prefix=PREFIX + "c", suffix=SUFFIX, max_tokens=8)
    assert tokens == expected_completion(engine, PREFIX + "c", SUFFIX, 8)
    assert first.usage.cached_tokens == 0
    usage = second.usage
    # SPM: the suffix comes first, so only the block holding the cursor changed.
    assert usage.cached_tokens >= usage.prompt_tokens - 2 * 16
    assert usage.prefilled_tokens == usage.prompt_tokens - usage.cached_tokens
    assert 0 < usage.transfer_bytes < first.usage.transfer_bytes


def test_every_role_reports_serving_and_one_trace_spans_every_hop(model_path):
    with MeshInThread(
        MeshSpec(str(model_path), routing=RoutingConfig(transport="grpc", disagg_min_tokens=0))
    ) as mesh:
        for name, server in mesh.servers.items():
            with grpc.insecure_channel(server.address) as channel:
                reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, name
        EXPORTER.clear()
        stream(mesh.gateway_address, prefix=PREFIX, suffix=SUFFIX, max_tokens=4)
        time.sleep(0.2)
    spans = EXPORTER.get_finished_spans()
    by_name = {s.name: s for s in spans}
    hops = ["/kvmesh.v1.Gateway/Complete", "/kvmesh.v1.Decode/Generate", "/kvmesh.v1.Prefill/Prefill"]
    server_spans = [s for s in spans if s.name.lstrip("/") in [h.lstrip("/") for h in hops] or s.name in hops]
    names = {s.name for s in spans}
    for hop in ("kvmesh.v1.Gateway/Complete", "kvmesh.v1.Decode/Generate", "kvmesh.v1.Prefill/Prefill"):
        assert any(hop in n for n in names), (hop, names)
    for stage in ("prefill", "transfer", "ship"):
        assert stage in by_name, names
    trace_ids = {
        s.context.trace_id for s in spans if any(h in s.name for h in ("Gateway", "Decode", "Prefill"))
    }
    trace_ids |= {by_name[s].context.trace_id for s in ("prefill", "transfer", "ship")}
    assert len(trace_ids) == 1, server_spans
    assert by_name["transfer"].attributes["kvmesh.num_bytes"] > 0


def _settled(mesh: MeshInThread, timeout_s: float = 10.0) -> dict:
    """Worker loads once nothing runs, waits or holds blocks (heartbeats lag a little)."""
    deadline = time.monotonic() + timeout_s
    while True:
        loads = mesh.run(mesh.worker_loads())
        idle = all(
            load.num_running == 0 and load.num_waiting == 0 and load.num_blocks_free == load.num_blocks_total
            for load in loads.values()
        )
        if idle or time.monotonic() > deadline:
            return loads
        time.sleep(0.1)


@pytest.mark.parametrize("transport", ["shm", "grpc"])
def test_cancelled_requests_free_every_block_and_leave_no_task(model_path, transport):
    spec = MeshSpec(
        str(model_path), num_blocks=1024, routing=RoutingConfig(transport=transport, disagg_min_tokens=0)
    )
    prefix = PREFIX * 12  # a few hundred tokens: the transfer takes a while
    rng = random.Random(7)
    with MeshInThread(spec) as mesh:
        stream(mesh.gateway_address, prefix=prefix, suffix=SUFFIX, max_tokens=2)  # warm channels
        baseline = Counter(mesh.run(_task_names()))
        before = _settled(mesh)
        with Client(mesh.gateway_address) as client:
            stub = client._stub

            def cancel_one(i: int) -> None:
                request = gateway_pb2.CompleteRequest(prefix=prefix + str(i), suffix=SUFFIX)
                request.sampling.max_tokens = 40
                call = stub.Complete(request, timeout=30)
                point = rng.choice(["before-prefill", "during-transfer", "mid-stream"])
                if point == "mid-stream":
                    with contextlib.suppress(grpc.RpcError):  # a full pool sheds load: also fine here
                        for _ in range(rng.randint(1, 5)):
                            next(call, None)
                else:
                    time.sleep(rng.uniform(0, 0.002 if point == "before-prefill" else 0.02))
                call.cancel()

            threads = [threading.Thread(target=cancel_one, args=(i,)) for i in range(100)]
            for i, thread in enumerate(threads):
                thread.start()
                if i % 10 == 9:
                    for t in threads[i - 9 : i + 1]:
                        t.join()
        # Eventually (blocks of cancelled shm transfers sit out a short quarantine, and a loaded machine
        # is slow) every block is free and every task the storm started has ended. A leak never gets
        # there, so the generous wait costs time only on failure.
        after = _settled(mesh, timeout_s=60)
        assert after == before
        deadline = time.monotonic() + 60
        while (extra := Counter(mesh.run(_task_names())) - baseline) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not extra, f"tasks left running: {extra}"
        # The mesh still answers exactly after the storm.
        tokens, _, _ = stream(mesh.gateway_address, prefix=PREFIX, suffix=SUFFIX, max_tokens=8)
        assert len(tokens) == 8


async def _task_names() -> list[str]:
    """What each other task runs (its coroutine's qualified name, no address), to compare before and after."""
    await asyncio.sleep(0)
    return [
        getattr(t.get_coro(), "__qualname__", type(t.get_coro()).__name__)
        for t in asyncio.all_tasks()
        if t is not asyncio.current_task()
    ]


def test_a_full_decode_pool_answers_resource_exhausted(model_path):
    spec = MeshSpec(
        str(model_path), num_blocks=8, routing=RoutingConfig(transport="grpc", disagg_min_tokens=0)
    )
    with MeshInThread(spec) as mesh, pytest.raises(grpc.RpcError) as info:
        stream(mesh.gateway_address, prefix=PREFIX * 20, suffix=SUFFIX, max_tokens=4)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "KV pool is full" in info.value.details()


ORIGINAL = "def area(width, height):\n    return width * height\n\n\nprint(area(2, 3))\n"
SNIPPET = "def area(width, height):\n    # ... existing code ...\n    return round(width * height, 2)\n"


@pytest.mark.parametrize("transport", ["shm", "grpc"])
def test_speculative_edit_streams_exactly_what_plain_greedy_decoding_gives(model_path, engine, transport):
    prompt = PromptLayout(engine.tokenizer).edit(ORIGINAL, SNIPPET)
    expected = engine.generate(prompt.token_ids, 40, ignore_eos=True)
    spec = MeshSpec(str(model_path), routing=RoutingConfig(transport=transport, disagg_min_tokens=0))
    with MeshInThread(spec) as mesh:
        with Client(mesh.gateway_address) as client:
            for speculative in (True, False):
                request = gateway_pb2.EditRequest(original=ORIGINAL, snippet=SNIPPET, speculative=speculative)
                request.sampling.max_tokens = 40
                request.sampling.ignore_eos = True
                chunks = list(client._stub.Edit(request, timeout=60))
                assert [t for c in chunks for t in c.token_ids] == expected, speculative
        # A draft the model agrees with (its own greedy output, edited in the middle): most of it is
        # accepted, many tokens per forward pass, and the output is still exactly plain greedy's.
        draft = expected[:15] + [7, 8] + expected[15:]
        decode = next(s for n, s in mesh.servers.items() if n.startswith("decode"))
        with grpc.insecure_channel(decode.address) as channel:
            request = decode_pb2.GenerateRequest(
                request_id="spec", prompt_token_ids=prompt.token_ids, draft_token_ids=draft
            )
            request.sampling.max_tokens = 40
            request.sampling.ignore_eos = True
            chunks = list(decode_pb2_grpc.DecodeStub(channel).Generate(request, timeout=60))
    assert [t for c in chunks for t in c.token_ids] == expected
    usage = chunks[-1].usage
    assert usage.accepted_prediction_tokens >= 30 and usage.rejected_prediction_tokens > 0
    assert usage.forward_passes < 20


@pytest.fixture(scope="module")
def speculative_mesh(model_path: Path):
    # Prefill on the prefill worker, KV over the gRPC stream: drafts are verified on shipped KV.
    with MeshInThread(
        MeshSpec(str(model_path), routing=RoutingConfig(transport="grpc", disagg_min_tokens=0))
    ) as mesh:
        yield mesh


@settings(max_examples=12, deadline=None)
@given(
    prompt_seed=st.integers(0, 999),
    edits=edit_lists,
    max_tokens=st.integers(1, NUM_FREE_RUN + 4),
    stop_at=st.none() | st.floats(0, 1),
)
def test_decode_worker_speculation_equals_plain_greedy_on_random_drafts(
    speculative_mesh, engine, prompt_seed, edits, max_tokens, stop_at
):
    # Drafts are edited copies of the model's own output (insertions, deletions, substitutions, moved
    # blocks, unrelated or empty), so long runs are accepted and stops and max_tokens fall inside
    # accepted chunks; the worker's stream must be plain greedy decoding's, token for token.
    prompt = random_ids(40, vocab_size=engine.config.vocab_size, seed=prompt_seed)
    free_run = engine.generate(prompt, NUM_FREE_RUN, ignore_eos=True)
    stops = [] if stop_at is None else [free_run[int(stop_at * (len(free_run) - 1))]]
    expected = engine.generate(prompt, max_tokens, ignore_eos=True, stop_token_ids=stops)
    decode = next(s for n, s in speculative_mesh.servers.items() if n.startswith("decode"))
    request = decode_pb2.GenerateRequest(
        request_id=f"prop-{prompt_seed}", prompt_token_ids=prompt, draft_token_ids=edited(free_run, edits)
    )
    request.sampling.max_tokens = max_tokens
    request.sampling.ignore_eos = True
    request.sampling.stop_token_ids.extend(stops)
    with grpc.insecure_channel(decode.address) as channel:
        chunks = list(decode_pb2_grpc.DecodeStub(channel).Generate(request, timeout=60))
    assert [t for c in chunks for t in c.token_ids] == expected
    usage = chunks[-1].usage
    assert usage.completion_tokens == len(expected)


def test_a_decode_worker_that_prefills_itself_tells_the_cursor_its_first_token(speculative_mesh, engine):
    # No prefill_address: the worker prefills the prompt itself, and the first token comes from that plain
    # prefill step. The cursor must hear of it, or its first proposals are one token off (the same
    # output, but rejected drafts and extra passes). The worker's counts equal the engine's own helper's.
    prompt = random_ids(40, vocab_size=engine.config.vocab_size, seed=7)
    free_run = engine.generate(prompt, NUM_FREE_RUN, ignore_eos=True)
    _, stats = generate_speculative(
        engine, prompt, DraftCursor.for_edit(free_run, prompt), NUM_FREE_RUN, ignore_eos=True
    )
    assert stats.rejected_prediction_tokens == 0
    decode = next(s for n, s in speculative_mesh.servers.items() if n.startswith("decode"))
    request = decode_pb2.GenerateRequest(
        request_id="first-token", prompt_token_ids=prompt, draft_token_ids=free_run
    )
    request.sampling.max_tokens = NUM_FREE_RUN
    request.sampling.ignore_eos = True
    with grpc.insecure_channel(decode.address) as channel:
        chunks = list(decode_pb2_grpc.DecodeStub(channel).Generate(request, timeout=60))
    assert [t for c in chunks for t in c.token_ids] == free_run
    usage = chunks[-1].usage
    assert usage.accepted_prediction_tokens == stats.accepted_prediction_tokens
    assert usage.rejected_prediction_tokens == 0


def test_prompt_lookup_completion_streams_exactly_the_plain_completion(model_path, engine):
    # A prompt that repeats itself, so there is something to look up.
    base = engine.tokenizer.decode(expected_completion(engine, PREFIX, SUFFIX, 24))
    prefix = PREFIX + base + "\n" + PREFIX
    expected = expected_completion(engine, prefix, SUFFIX, 24)
    with MeshInThread(MeshSpec(str(model_path))) as mesh, Client(mesh.gateway_address) as client:
        plain = list(client.complete(prefix=prefix, suffix=SUFFIX, max_tokens=24))
        lookup = list(client.complete(prefix=prefix, suffix=SUFFIX, max_tokens=24, prompt_lookup=True))
    assert [t for c in lookup for t in c.token_ids] == [t for c in plain for t in c.token_ids] == expected
    assert plain[-1].usage.accepted_prediction_tokens == 0
