"""Roles as real processes (`kvmesh serve ROLE`) on loopback, for the integration and fault tests.

Each role prints one line once SERVING (kvmesh.cli.launcher.SERVING_LINE); `Role.wait_serving` reads it.
`Mesh` starts a cache store, prefill and decode workers and a gateway, and kills whatever is left.
"""

from __future__ import annotations

import functools
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc

from gateway.layout import PromptLayout
from kvmesh.cli.launcher import SERVING_LINE
from kvmesh.engine.block_hash import hash_blocks, model_fingerprint, namespace_hash
from kvmesh.engine.engine import Engine
from kvmesh.engine.tokenizer import Tokenizer
from kvmesh.v1 import cache_store_pb2, cache_store_pb2_grpc, gateway_pb2

ROOT = Path(__file__).resolve().parents[1]
PREFIX = "def parse_args(argv):\n    parser = argparse.ArgumentParser()\n    "
SUFFIX = "\n    return parser.parse_args(argv)\n"
STARTUP_TIMEOUT_S = 120.0


class Role:
    """One `kvmesh serve ROLE` process; its address is read from the line it prints once SERVING."""

    def __init__(self, role: str, *args: str) -> None:
        command = [sys.executable, "-m", "kvmesh.cli", "serve", role, "--port", "0", *args]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.log = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 (closed in stop())
        """The role's stderr: its log."""
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env, cwd=ROOT
        )
        self.role = role
        self.address = ""
        self._terminated = False

    def wait_serving(self, timeout_s: float = STARTUP_TIMEOUT_S) -> str:
        assert self.process.stdout is not None
        ready, _, _ = select.select([self.process.stdout], [], [], timeout_s)
        assert ready, f"{self.role} printed nothing in {timeout_s:.0f} s"
        line = self.process.stdout.readline().strip()
        match = SERVING_LINE.match(line)
        assert match is not None and match["role"] == self.role, f"{self.role}: {line!r}"
        self.address = match["address"]
        return self.address

    def signal(self, signum: int) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signum)
            self._terminated |= signum == signal.SIGTERM

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM (unless sent already: a second one forces an exit), then SIGKILL after timeout_s;
        waits for the process either way."""
        if self.process.poll() is None:
            if not self._terminated:
                self.signal(signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()

    def log_lines(self) -> list[str]:
        """The role's log so far."""
        self.log.flush()
        self.log.seek(0)
        return [line.rstrip() for line in self.log]

    def log_problems(self) -> list[str]:
        """Lines of the role's log at ERROR or above, and tracebacks: none is expected from an event the
        mesh is built to survive (a worker killed, a store restarted, a drain)."""
        return [
            line
            for line in self.log_lines()
            if " ERROR " in line or " CRITICAL " in line or line.startswith("Traceback")
        ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Mesh:
    """A cache store, prefill and decode workers and a gateway, each in its own process.

    roles: "cache-store", "prefill-<i>", "decode-<i>", "gateway". close() stops what still runs.
    """

    def __init__(
        self,
        model: Path,
        *,
        num_prefill: int = 1,
        num_decode: int = 1,
        transport: str = "grpc",
        store_port: int = 0,
        worker_args: tuple[str, ...] = (),
        decode_args: tuple[str, ...] = (),
        prefill_args: tuple[str, ...] = (),
        gateway_args: tuple[str, ...] = (),
        metrics: bool = False,
    ) -> None:
        """metrics: give every worker a Prometheus port (metrics_ports, by role name)."""
        self.model = model
        self.roles: dict[str, Role] = {}
        self.metrics_ports: dict[str, int] = {}
        try:
            self.roles["cache-store"] = self.start_cache_store(store_port)
            self.store = self.roles["cache-store"].wait_serving()
            common = ("--cache-store", self.store, "--model", str(model), "--threads", "1", *worker_args)
            workers = [(f"prefill-{i}", "prefill", prefill_args) for i in range(num_prefill)]
            workers += [(f"decode-{i}", "decode", decode_args) for i in range(num_decode)]
            for name, role, args in workers:
                extra: tuple[str, ...] = ()
                if metrics:
                    self.metrics_ports[name] = free_port()
                    extra = ("--metrics-port", str(self.metrics_ports[name]))
                self.roles[name] = Role(role, *common, *args, *extra)
            # Started beside the workers: it learns them from the cache store as they register.
            self.roles["gateway"] = Role(
                "gateway",
                "--cache-store",
                self.store,
                "--model",
                str(model),
                "--transport",
                transport,
                "--refresh-ms",
                "100",
                "--disagg-min-tokens",
                "0",
                *gateway_args,
            )
            for name, _, _ in workers:
                self.roles[name].wait_serving()
            wait_for_workers(self.store, num_prefill + num_decode)
            self.gateway = self.roles["gateway"].wait_serving()
            time.sleep(0.3)  # three of the gateway's refresh periods: its pool holds every worker
        except BaseException:
            self.close()
            raise

    @staticmethod
    def start_cache_store(port: int = 0) -> Role:
        return Role(
            "cache-store", "--port", str(port), "--heartbeat-interval-ms", "100", "--expiry-ms", "1000"
        )

    def of_role(self, role: str) -> list[Role]:
        return [r for r in self.roles.values() if r.role == role]

    def close(self) -> None:
        """SIGTERM to every role at once (gateway first), then waits for each (SIGKILL after 30 s)."""
        stop_order = ["gateway", "decode", "prefill", "cache-store"]
        order = sorted(self.roles.values(), key=lambda r: stop_order.index(r.role))
        for role in order:
            role.signal(signal.SIGTERM)
        for role in order:
            role.stop()

    def log_problems(self) -> dict[str, list[str]]:
        """Each role's ERROR lines and tracebacks (see Role.log_problems); empty when all is quiet."""
        problems = {name: role.log_problems() for name, role in self.roles.items()}
        return {name: lines for name, lines in problems.items() if lines}

    def __enter__(self) -> Mesh:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def list_workers(store: str) -> list[cache_store_pb2.WorkerInfo]:
    with grpc.insecure_channel(store) as channel:
        stub = cache_store_pb2_grpc.CacheStoreStub(channel)
        return list(stub.ListWorkers(cache_store_pb2.ListWorkersRequest(), timeout=5).workers)


def wait_for_workers(store: str, count: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if len(list_workers(store)) >= count:
            return
        time.sleep(0.05)
    raise TimeoutError(f"fewer than {count} workers registered")


def complete_request(max_tokens: int, prefix: str = PREFIX) -> gateway_pb2.CompleteRequest:
    request = gateway_pb2.CompleteRequest(prefix=prefix, suffix=SUFFIX)
    request.sampling.max_tokens = max_tokens
    request.sampling.ignore_eos = True
    return request


def prompt_tokens(model: Path, prefix: str = PREFIX) -> list[int]:
    """The token ids the gateway lays out for a completion of prefix (and SUFFIX)."""
    return PromptLayout(Tokenizer.from_file(model / "tokenizer.json")).completion(prefix, SUFFIX)


@functools.cache
def expected_tokens(model: Path, max_tokens: int, prefix: str = PREFIX) -> list[int]:
    """What greedy decoding in one process generates for the completion (the undisturbed output)."""
    engine = Engine.from_pretrained(model)
    return engine.generate(prompt_tokens(model, prefix), max_tokens, ignore_eos=True)


def holders(store: str, model: Path, prefix: str, block_size: int = 16) -> dict[str, int]:
    """Which worker holds how many leading blocks of this completion's prompt, per the cache store."""
    hashes = hash_blocks(
        namespace_hash(model_fingerprint(model), ""), prompt_tokens(model, prefix), block_size
    )
    with grpc.insecure_channel(store) as channel:
        reply = cache_store_pb2_grpc.CacheStoreStub(channel).Lookup(
            cache_store_pb2.LookupRequest(block_hashes=hashes), timeout=5
        )
    return {m.worker_id: m.num_blocks for m in reply.matches}


def scrape(port: int) -> dict[str, float]:
    """A role's Prometheus samples, by name with labels."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def tokens_of(chunks: list) -> list[int]:
    """The token ids of a completion's streamed chunks, in order."""
    return [t for c in chunks for t in c.token_ids]
