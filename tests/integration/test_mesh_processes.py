"""Every role in its own process (`kvmesh serve`), and a decode worker killed for real mid-stream."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from gateway.layout import PromptLayout
from kvmesh.cli.launcher import SERVING_LINE
from kvmesh.engine.engine import Engine
from kvmesh.v1 import cache_store_pb2, cache_store_pb2_grpc, gateway_pb2, gateway_pb2_grpc

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "def parse_args(argv):\n    parser = argparse.ArgumentParser()\n    "
SUFFIX = "\n    return parser.parse_args(argv)\n"
pytestmark = pytest.mark.slow


class Role:
    """One `kvmesh serve ROLE` process; its address is read from the line it prints once SERVING."""

    def __init__(self, role: str, *args: str) -> None:
        command = [sys.executable, "-m", "kvmesh.cli", "serve", role, "--port", "0", *args]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        self.role = role
        self.address = ""

    def wait_serving(self) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline().strip()
        match = SERVING_LINE.match(line)
        assert match is not None and match["role"] == self.role, f"{self.role}: {line!r}"
        self.address = match["address"]
        return self.address

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def model(mesh_model_path: Path) -> Path:
    return mesh_model_path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_mesh(
    model: Path, num_decode: int, transport: str, decode_args: tuple[str, ...] = ()
) -> dict[str, Role]:
    roles: dict[str, Role] = {}
    try:
        roles["cache-store"] = Role("cache-store", "--heartbeat-interval-ms", "100", "--expiry-ms", "1000")
        store = roles["cache-store"].wait_serving()
        common = ["--cache-store", store, "--model", str(model)]
        roles["prefill"] = Role("prefill", *common, "--threads", "1")
        for i in range(num_decode):
            roles[f"decode-{i}"] = Role("decode", *common, "--threads", "1", *decode_args)
        for name, role in roles.items():
            if name != "cache-store":
                role.wait_serving()
        wait_for_workers(store, 1 + num_decode)
        roles["gateway"] = Role(
            "gateway", *common, "--transport", transport, "--refresh-ms", "100", "--disagg-min-tokens", "0"
        )
        roles["gateway"].wait_serving()
        return roles
    except BaseException:
        for role in roles.values():
            role.stop()
        raise


def list_workers(store: str) -> list:
    with grpc.insecure_channel(store) as channel:
        stub = cache_store_pb2_grpc.CacheStoreStub(channel)
        return list(stub.ListWorkers(cache_store_pb2.ListWorkersRequest(), timeout=5).workers)


def wait_for_workers(store: str, count: int) -> None:
    for _ in range(300):
        if len(list_workers(store)) >= count:
            return
        time.sleep(0.05)
    raise TimeoutError(f"fewer than {count} workers registered")


def complete_request(max_tokens: int) -> gateway_pb2.CompleteRequest:
    request = gateway_pb2.CompleteRequest(prefix=PREFIX, suffix=SUFFIX)
    request.sampling.max_tokens = max_tokens
    request.sampling.ignore_eos = True
    return request


def expected_tokens(model: Path, max_tokens: int) -> list[int]:
    engine = Engine.from_pretrained(model)
    prompt = PromptLayout(engine.tokenizer).completion(PREFIX, SUFFIX)
    return engine.generate(prompt, max_tokens, ignore_eos=True)


@pytest.mark.parametrize("transport", ["shm", "grpc"])
def test_roles_in_their_own_processes_stream_what_the_engine_generates(model, transport):
    roles = start_mesh(model, num_decode=1, transport=transport)
    try:
        with grpc.insecure_channel(roles["gateway"].address) as channel:
            chunks = list(gateway_pb2_grpc.GatewayStub(channel).Complete(complete_request(20), timeout=60))
    finally:
        for role in roles.values():
            role.stop()
    assert [t for c in chunks for t in c.token_ids] == expected_tokens(model, 20)
    assert chunks[-1].usage.transport == transport
    assert {role.process.returncode for role in roles.values()} == {0}


def test_a_decode_worker_killed_mid_stream_is_resumed_on_another_without_gap_or_duplicate(model):
    roles = start_mesh(model, num_decode=2, transport="grpc")
    store = roles["cache-store"].address
    try:
        with grpc.insecure_channel(roles["gateway"].address) as channel:
            call = gateway_pb2_grpc.GatewayStub(channel).Complete(complete_request(300), timeout=120)
            chunks = [next(call)]
            busy = []
            while not busy:  # the worker serving the stream reports it in its next heartbeat
                busy = [
                    w
                    for w in list_workers(store)
                    if w.role == cache_store_pb2.WORKER_ROLE_DECODE and w.load.num_running
                ]
                chunks.append(next(call))
            [victim] = [r for r in roles.values() if r.role == "decode" and busy[0].address == r.address]
            victim.process.send_signal(signal.SIGKILL)
            num_before_kill = sum(len(c.token_ids) for c in chunks)
            chunks.extend(call)
    finally:
        for role in roles.values():
            role.stop()
    tokens = [t for c in chunks for t in c.token_ids]
    assert num_before_kill < 300  # the kill landed mid-stream
    assert tokens == expected_tokens(model, 300)
    assert victim.process.returncode == -signal.SIGKILL
    assert chunks[-1].usage.completion_tokens == 300


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def test_worker_metrics_count_prefix_cache_queries_and_hits(model):
    port = free_port()
    roles = start_mesh(model, num_decode=1, transport="grpc", decode_args=("--metrics-port", str(port)))
    try:
        with grpc.insecure_channel(roles["gateway"].address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            list(stub.Complete(complete_request(4), timeout=60))
            before = scrape(port)
            last = list(stub.Complete(complete_request(4), timeout=60))[-1]
            after = scrape(port)
    finally:
        for role in roles.values():
            role.stop()
    hits = 'vllm:prefix_cache_hits_total{role="decode"}'
    queries = 'vllm:prefix_cache_queries_total{role="decode"}'
    assert after[hits] - before[hits] == last.usage.cached_tokens > 0
    assert after[queries] - before[queries] >= last.usage.cached_tokens
    assert after['kvmesh_kv_blocks_used{role="decode"}'] == 0
    assert after['kvmesh_kv_blocks_cached{role="decode"}'] > 0
