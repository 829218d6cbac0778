"""Faults injected for real into a mesh of processes: a decode worker SIGKILLed mid-stream, a prefill
worker SIGKILLed during a transfer, the cache store SIGKILLed and restarted under a stream of keystrokes,
and SIGTERM draining in-flight streams. Each test bounds its own waits."""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from kvmesh.v1 import cache_store_pb2, gateway_pb2_grpc
from tests.processes import (
    PREFIX,
    Mesh,
    Role,
    complete_request,
    expected_tokens,
    free_port,
    holders,
    list_workers,
    prompt_tokens,
    scrape,
    tokens_of,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model(mesh_model_path: Path) -> Path:
    return mesh_model_path


def busy_decode_role(mesh: Mesh) -> Role:
    """The decode worker whose heartbeat reports a running stream (waits up to 10 s)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        busy = [
            w.address
            for w in list_workers(mesh.store)
            if w.role == cache_store_pb2.WORKER_ROLE_DECODE and w.load.num_running
        ]
        if busy:
            [role] = [r for r in mesh.of_role("decode") if r.address == busy[0]]
            return role
        time.sleep(0.02)
    raise TimeoutError("no decode worker reported a running stream")


def test_a_decode_worker_killed_mid_stream_is_resumed_on_another_without_gap_or_duplicate(model):
    with Mesh(model, num_decode=2) as mesh, grpc.insecure_channel(mesh.gateway) as channel:
        call = gateway_pb2_grpc.GatewayStub(channel).Complete(complete_request(300), timeout=120)
        chunks = [next(call)]
        victim = busy_decode_role(mesh)
        victim.signal(signal.SIGKILL)
        num_before_kill = len(tokens_of(chunks))
        chunks.extend(call)
    assert num_before_kill < 300  # the kill landed mid-stream
    assert tokens_of(chunks) == expected_tokens(model, 300)  # byte-identical to an undisturbed run
    assert victim.process.returncode == -signal.SIGKILL
    assert chunks[-1].usage.completion_tokens == 300
    assert mesh.log_problems() == {}  # a lost worker is an expected event: no ERROR, no traceback


@pytest.mark.parametrize("transport", ["shm", "nccl"])
def test_a_prefill_worker_killed_during_a_transfer_does_not_fail_the_request(model, transport):
    """nccl: the NCCL transport's gloo twin (CPU pools); the decode worker's receive fails when its peer's
    socket dies, and the gateway retries the request."""
    # A long prompt, prefilled 16 tokens a pass, keeps the prefill worker busy long enough to be caught.
    prefix = PREFIX + "".join(f"    parser.add_argument('--option-{i}', type=int)\n    " for i in range(60))
    assert 1000 < len(prompt_tokens(model, prefix)) < 1900
    with Mesh(
        model,
        num_decode=2,
        transport="shm" if transport == "shm" else "auto",  # the gateway picks what both workers offer
        worker_args=("--transports", f"{transport},grpc"),
        prefill_args=("--prefill-chunk-size", "16", "--max-num-batched-tokens", "16"),
        metrics=True,
    ) as mesh:
        prefill = mesh.roles["prefill-0"]
        with grpc.insecure_channel(mesh.gateway) as channel:
            done = threading.Event()
            result: list = []

            def request() -> None:
                try:
                    result.extend(
                        gateway_pb2_grpc.GatewayStub(channel).Complete(
                            complete_request(8, prefix), timeout=60
                        )
                    )
                except grpc.RpcError as error:
                    result.append(error)
                done.set()

            thread = threading.Thread(target=request)
            thread.start()
            deadline = time.monotonic() + 20
            used = 'kvmesh_kv_blocks_used{role="prefill"}'
            while not done.is_set() and time.monotonic() < deadline:
                if scrape(mesh.metrics_ports["prefill-0"]).get(used, 0) > 0:
                    prefill.signal(signal.SIGKILL)  # it holds the prompt's blocks: computing or shipping
                    break
                time.sleep(0.005)
            thread.join(60)
        assert prefill.process.wait(10) == -signal.SIGKILL, "the prefill worker finished before the kill"
        assert not [r for r in result if isinstance(r, grpc.RpcError)], result
        assert tokens_of(result) == expected_tokens(model, 8, prefix)
        # The first attempt failed with the transfer (the decode worker's receive saw its peer die), and the
        # gateway retried it: a WARNING, not an ERROR.
        retries = [line for line in mesh.roles["gateway"].log_lines() if "decode attempt 1 failed" in line]
        assert len(retries) == 1 and "(UNAVAILABLE)" in retries[0], retries
        # Whichever decode worker took the first attempt gets its blocks back (after the quarantine of a
        # transfer whose writer cannot confirm it stopped: it was killed).
        decode_ports = [p for name, p in mesh.metrics_ports.items() if name.startswith("decode")]
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if all(scrape(p)['kvmesh_kv_blocks_used{role="decode"}'] == 0 for p in decode_ports):
                break
            time.sleep(0.1)
        assert [scrape(p)['kvmesh_kv_blocks_used{role="decode"}'] for p in decode_ports] == [0, 0]
    assert mesh.log_problems() == {}


@dataclass
class Keystrokes:
    """Completions of a growing prefix, one after the other, in a thread, until stopped."""

    gateway: str
    base: str
    failures: list[str] = field(default_factory=list)
    num_done: int = 0
    last_prefix: str = ""
    _stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        with grpc.insecure_channel(self.gateway) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            while not self._stop.is_set():
                prefix = self.base + "x" * (self.num_done % 200)
                try:
                    list(stub.Complete(complete_request(4, prefix), timeout=30))
                    self.last_prefix = prefix
                except grpc.RpcError as error:
                    self.failures.append(f"{error.code().name}: {error.details()}")
                self.num_done += 1

    def stop(self) -> None:
        self._stop.set()


def test_a_cache_store_killed_and_restarted_fails_no_request_and_its_index_comes_back(model):
    port = free_port()
    base = PREFIX + "".join(f"x{i} = {i}\n    " for i in range(20))
    with Mesh(model, num_decode=2, store_port=port) as mesh:
        keystrokes = Keystrokes(mesh.gateway, base)
        thread = threading.Thread(target=keystrokes.run)
        thread.start()
        try:
            time.sleep(1.0)
            num_before = keystrokes.num_done
            mesh.roles["cache-store"].signal(signal.SIGKILL)
            mesh.roles["cache-store"].process.wait(10)
            time.sleep(0.5)  # the mesh runs without a cache store for a while
            mesh.roles["cache-store"] = Mesh.start_cache_store(port)
            mesh.roles["cache-store"].wait_serving()
            back = time.monotonic()
            num_during = keystrokes.num_done - num_before
            # The workers register again and re-send their inventories: the index finds the prefix.
            while time.monotonic() - back < 5 and not holders(mesh.store, model, keystrokes.last_prefix):
                time.sleep(0.02)
            index_back_s = time.monotonic() - back
            with grpc.insecure_channel(mesh.gateway) as channel:
                repeat = list(
                    gateway_pb2_grpc.GatewayStub(channel).Complete(
                        complete_request(4, keystrokes.last_prefix + "y"), timeout=30
                    )
                )
            time.sleep(0.5)
        finally:
            keystrokes.stop()
            thread.join(60)
        num_after = keystrokes.num_done - num_before - num_during
    assert keystrokes.failures == []
    assert num_before > 0 and num_during > 0 and num_after > 0
    assert index_back_s < 2.0
    assert repeat[-1].usage.cached_tokens > 0
    assert mesh.log_problems() == {}


def test_sigterm_lets_in_flight_streams_finish(model):
    with (
        Mesh(model, decode_args=("--grace-s", "60"), gateway_args=("--grace-s", "60")) as mesh,
        grpc.insecure_channel(mesh.gateway) as channel,
    ):
        stub = gateway_pb2_grpc.GatewayStub(channel)
        calls = [stub.Complete(complete_request(120), timeout=120) for _ in range(2)]
        chunks = [[next(call)] for call in calls]
        busy_decode_role(mesh)
        decode, gateway = mesh.roles["decode-0"], mesh.roles["gateway"]
        decode.signal(signal.SIGTERM)
        gateway.signal(signal.SIGTERM)
        for received, call in zip(chunks, calls, strict=True):
            received.extend(call)
        assert decode.process.wait(60) == 0 and gateway.process.wait(60) == 0
    expected = expected_tokens(model, 120)
    assert [tokens_of(c) for c in chunks] == [expected, expected]
    assert mesh.log_problems() == {}
