"""How fresh prompts arriving at a decode worker disturb a stream it is already decoding.

    python -m bench.interference [--tree DIR [--tree DIR]] [--model PATH] [--runs 5] [--probe-tokens 200]
                                 [--arrival-ms 300] [--arrival-tokens 8] [--max-seconds 300]

Starts the roles as `python -m kvmesh.cli serve ROLE` processes on loopback (cache store, one prefill
worker, one decode worker, one gateway; the workers with --threads 1), from the checkout each --tree
names (cwd and PYTHONPATH; default: this one). A probe streams a completion of --probe-tokens tokens
(ignore_eos) through the gateway; the gaps between consecutive token messages, as the client receives
them, are what a user sees. Each round runs the probe alone (idle), then again while other clients send
fresh prompts every --arrival-ms, alternating short ones (20-60 tokens, below the gateway's
--use-prefill-min-tokens: the decode worker prefills them itself) and long ones (600-1500 tokens,
prefilled by the prefill worker and shipped to the decode worker). Every prompt starts with a unique
header, so no prefix cache helps. There is one decode worker: probe and arrivals share it.

The baseline is the probe alone on the same mesh in the same run: the tracked number is
p99(arrivals) / p99(idle), goal <= 1.3. With two --tree (e.g. `--tree /work/base --tree .`) both
checkouts run with the same model and prompts, and their p99s under arrivals are compared as well.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import math
import os
import random
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
from tokenizers import Tokenizer

from kvmesh import default_model_path
from kvmesh.v1 import cache_store_pb2, cache_store_pb2_grpc, gateway_pb2, gateway_pb2_grpc

PROBE_PREFIX = "def parse_args(argv):\n    parser = argparse.ArgumentParser()\n    "
PROBE_SUFFIX = "\n    return parser.parse_args(argv)\n"
LOCAL_MAX_TOKENS = 256
"""The gateway's --use-prefill-min-tokens: prompts shorter than this stay on the decode worker."""
PROMPT_TOKENS = {"short": (20, 60), "long": (600, 1500)}
GOAL = 1.3
WORKER_FLAGS = ("--port", "--log-level", "--cache-store", "--model", "--threads")
FLAGS = {  # what Mesh passes to each role; check_flags makes sure a checkout's CLI has them
    "cache-store": ("--port", "--log-level", "--heartbeat-interval-ms", "--expiry-ms"),
    "prefill": WORKER_FLAGS,
    "decode": WORKER_FLAGS,
    "gateway": (*WORKER_FLAGS[:-1], "--use-prefill-min-tokens", "--refresh-ms"),
}


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):  # Linux: SIGTERM the child if the bench dies
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def _start_child(pinned_role: str | None) -> None:
    _die_with_parent()
    if pinned_role is not None:  # --pin: the decode worker gets CPU 0 to itself, the rest share CPU 1
        os.sched_setaffinity(0, {0} if pinned_role == "decode" else {1})


class Mesh:
    """The four roles from one checkout, as child processes on loopback; stop() ends them all."""

    def __init__(self, tree: Path, model: Path, logs: Path, pin: bool = False) -> None:
        self.tree, self.model, self.logs, self.pin = tree, model, logs, pin
        self.processes: list[subprocess.Popen[str]] = []

    def serve(self, role: str, *args: str, timeout_s: float = 120) -> str:
        """Starts one role; returns its address once it prints its serving line."""
        command = [sys.executable, "-m", "kvmesh.cli", "serve", role, "--port", "0", "--log-level", "warning"]
        env = {**os.environ, "PYTHONPATH": str(self.tree), "OMP_NUM_THREADS": "1"}
        log_path = self.logs / f"{self.tree.name}-{role}.log"
        with log_path.open("a") as log:  # the child keeps its own copy of the descriptor
            process = subprocess.Popen(
                [*command, *args],
                cwd=self.tree,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                preexec_fn=lambda: _start_child(role if self.pin else None),
            )
        self.processes.append(process)
        assert process.stdout is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and process.poll() is None:
            if select.select([process.stdout], [], [], 0.5)[0]:
                line = process.stdout.readline().strip()
                if " serving on " in line:
                    return line.rsplit(" ", 1)[1]
        tail = log_path.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{role} from {self.tree} did not start; its stderr ends:\n{tail}")

    def start(self) -> str:
        """Cache store, then both workers, then the gateway; returns the gateway's address."""
        store = self.serve("cache-store", "--heartbeat-interval-ms", "100", "--expiry-ms", "2000")
        common = ("--cache-store", store, "--model", str(self.model))
        self.serve("prefill", *common, "--threads", "1")
        self.serve("decode", *common, "--threads", "1")
        with grpc.insecure_channel(store) as channel:  # so the gateway's first look sees both workers
            stub = cache_store_pb2_grpc.CacheStoreStub(channel)
            for _ in range(200):
                if len(stub.ListWorkers(cache_store_pb2.ListWorkersRequest(), timeout=5).workers) >= 2:
                    break
                time.sleep(0.05)
        local = ("--use-prefill-min-tokens", str(LOCAL_MAX_TOKENS), "--refresh-ms", "100")
        return self.serve("gateway", *common, *local)

    def stop(self) -> None:
        """SIGTERM, gateway first; SIGKILL whatever still runs 15 s later. A second Ctrl-C waits."""
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for process in reversed(self.processes):
                if process.poll() is None:
                    process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 15
            for process in self.processes:
                try:
                    process.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
            self.processes.clear()
        finally:
            signal.signal(signal.SIGINT, previous)


def check_flags(tree: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    for role, flags in FLAGS.items():
        command = [sys.executable, "-m", "kvmesh.cli", "serve", role, "--help"]
        text = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=60).stdout
        if missing := [flag for flag in flags if flag not in text.split()]:
            raise SystemExit(f"{tree}: `kvmesh serve {role}` has no {', '.join(missing)}")


def make_prompt(tokenizer: Tokenizer, rng: random.Random, num_tokens: int) -> str:
    """Code-like text of about num_tokens tokens, starting with a header no other prompt has."""
    lines = [f"# request {rng.getrandbits(64):016x}"]
    count = len(tokenizer.encode(lines[0]).ids)
    while count < num_tokens:  # counted line by line: within a few tokens of the whole text's count
        a, b = rng.choice("abcdefghxyz"), rng.randrange(1000)
        lines.append(f"    {a}_{b} = compute_{rng.randrange(99)}({a}{b % 7}, {rng.randrange(10**6)})")
        count += len(tokenizer.encode(lines[-1] + "\n").ids)
    return "\n".join(lines) + "\n"


def request(prefix: str, suffix: str, max_tokens: int) -> gateway_pb2.CompleteRequest:
    message = gateway_pb2.CompleteRequest(prefix=prefix, suffix=suffix)
    message.sampling.max_tokens = max_tokens
    message.sampling.ignore_eos = True
    return message


def probe(stub: gateway_pb2_grpc.GatewayStub, num_tokens: int) -> tuple[list[float], list[int]]:
    """One probe stream: (ms between consecutive token messages, tokens per message)."""
    times, sizes = [], []
    for chunk in stub.Complete(request(PROBE_PREFIX, PROBE_SUFFIX, num_tokens), timeout=120):
        if chunk.token_ids:
            times.append(time.perf_counter())
            sizes.append(len(chunk.token_ids))
    assert sum(sizes) == num_tokens, f"the probe got {sum(sizes)} of {num_tokens} tokens"
    return [(b - a) * 1000 for a, b in zip(times, times[1:], strict=False)], sizes


class Arrivals:
    """While entered: a fresh prompt every --arrival-ms, short and long in turn, at most --max-in-flight."""

    def __init__(self, stub: gateway_pb2_grpc.GatewayStub, prompts: dict[str, list[str]], args: Any) -> None:
        self.stub, self.prompts, self.args = stub, prompts, args
        self.pool = ThreadPoolExecutor(args.max_in_flight)
        self.lock = threading.Lock()
        self.in_flight = 0
        self.stats: dict[str, Counter[str]] = {kind: Counter() for kind in prompts}
        self.stopping = threading.Event()
        self.thread = threading.Thread()

    def send(self, kind: str, prompt: str) -> None:
        """One arrival, start to end; counts its tokens and whether the prefill worker computed its KV."""
        try:
            for chunk in self.stub.Complete(request(prompt, "", self.args.arrival_tokens), timeout=60):
                if chunk.HasField("usage"):
                    usage = chunk.usage
                    with self.lock:
                        self.stats[kind].update(
                            done=1,
                            prompt_tokens=usage.prompt_tokens,
                            cached_tokens=usage.cached_tokens,
                            via_prefill_worker=bool(usage.transport),  # KV moved between workers
                        )
        except grpc.RpcError:
            with self.lock:
                self.stats[kind]["errors"] += 1
        finally:
            with self.lock:
                self.in_flight -= 1

    def _loop(self) -> None:
        turn = 0
        while not self.stopping.wait(self.args.arrival_ms / 1000):
            kind = ("short", "long")[turn % 2]
            with self.lock:
                if self.in_flight >= self.args.max_in_flight or not self.prompts[kind]:
                    self.stats[kind]["skipped"] += 1
                    continue
                self.in_flight += 1
                self.stats[kind]["sent"] += 1
            turn += 1
            self.pool.submit(self.send, kind, self.prompts[kind].pop())

    def __enter__(self) -> Arrivals:
        self.stopping.clear()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        time.sleep(2 * self.args.arrival_ms / 1000)  # the probe starts with arrivals under way
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(5)
        for _ in range(600):  # up to 60 s for the ones in flight
            if self.in_flight == 0:
                break
            time.sleep(0.1)


def summary(gaps: list[float], sizes: list[int], runs: int) -> dict[str, float]:
    def percentile(q: float) -> float:  # nearest rank
        return round(sorted(gaps)[max(0, math.ceil(q / 100 * len(gaps)) - 1)], 2)

    return {
        "runs": runs,
        "gaps": len(gaps),
        "tokens_per_message": round(sum(sizes) / max(1, len(sizes)), 2),
        "p50_ms": percentile(50),
        "p99_ms": percentile(99),
        "max_ms": round(max(gaps), 2),
    }


def _arrival_summary(counts: Counter[str]) -> dict[str, int]:
    done = max(1, counts["done"])
    means = {f"mean_{key}": round(counts.pop(key, 0) / done) for key in ("prompt_tokens", "cached_tokens")}
    return dict(counts) | means


def measure(tree: Path, args: Any, logs: Path) -> dict[str, Any]:
    """Warm-up, then --runs rounds of (probe alone, probe under arrivals), on a mesh from tree."""
    tokenizer = Tokenizer.from_file(str(args.model / "tokenizer.json"))
    rng = random.Random(args.seed)  # the same prompts for every tree
    num_prompts = 2 + args.runs * int(args.probe_tokens * 30 / args.arrival_ms + 4)
    prompts = {
        k: [make_prompt(tokenizer, rng, rng.randint(*n)) for _ in range(num_prompts)]
        for k, n in PROMPT_TOKENS.items()
    }
    phases: dict[str, tuple[list[float], list[int]]] = {"idle": ([], []), "arrivals": ([], [])}
    runs = 0
    mesh = Mesh(tree, args.model, logs, args.pin)
    try:
        address = mesh.start()
        with grpc.insecure_channel(address) as probe_channel, grpc.insecure_channel(address) as load_channel:
            stub = gateway_pb2_grpc.GatewayStub(probe_channel)
            probe(stub, args.probe_tokens)  # warm-up: the probe, one short and one long arrival
            for kind in prompts:
                list(stub.Complete(request(prompts[kind].pop(), "", args.arrival_tokens), timeout=60))
            arrivals = Arrivals(gateway_pb2_grpc.GatewayStub(load_channel), prompts, args)
            deadline = time.monotonic() + args.max_seconds
            while runs < args.runs and (runs == 0 or time.monotonic() < deadline):
                for phase, gaps in phases.items():
                    with arrivals if phase == "arrivals" else contextlib.nullcontext():
                        found = probe(stub, args.probe_tokens)
                    gaps[0].extend(found[0])
                    gaps[1].extend(found[1])
                runs += 1
            arrivals.pool.shutdown(wait=False, cancel_futures=True)
    finally:
        mesh.stop()
    result: dict[str, Any] = {phase: summary(*found, runs) for phase, found in phases.items()}
    result["p99_ratio"] = round(result["arrivals"]["p99_ms"] / result["idle"]["p99_ms"], 2)
    result["arrivals_sent"] = {kind: _arrival_summary(counts) for kind, counts in arrivals.stats.items()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, action="append", help="checkout to run roles from (repeatable)")
    parser.add_argument("--model", type=Path, default=None, help="checkpoint (default: the built-in model)")
    parser.add_argument("--runs", type=int, default=5, help="rounds of (idle probe, probe under arrivals)")
    parser.add_argument("--probe-tokens", type=int, default=200, help="tokens the probe generates")
    parser.add_argument("--arrival-ms", type=float, default=300, help="one fresh prompt every this many ms")
    parser.add_argument("--arrival-tokens", type=int, default=8, help="tokens each arrival generates")
    parser.add_argument("--max-in-flight", type=int, default=4, help="arrivals in flight at most")
    parser.add_argument("--max-seconds", type=float, default=300, help="no new round after this, per tree")
    parser.add_argument("--seed", type=int, default=0, help="picks the arrival prompts")
    parser.add_argument(
        "--pin",
        action="store_true",
        help="decode worker alone on CPU 0, the other roles and this client on CPU 1 (needs 2 CPUs): "
        "measures the decode worker's own scheduling, without the other roles' CPU contention",
    )
    args = parser.parse_args()
    if args.pin:
        os.sched_setaffinity(0, {1})
    sys.setswitchinterval(0.0005)  # the probe's thread gets the GIL back soon after each message arrives
    args.model = (args.model or default_model_path()).resolve()
    trees = [tree.resolve() for tree in args.tree or [Path(__file__).resolve().parent.parent]]
    for tree in trees:
        check_flags(tree)
    with tempfile.TemporaryDirectory(prefix="kvmesh-interference-") as logs:
        results = [{"tree": str(tree)} | measure(tree, args, Path(logs)) for tree in trees]
    columns = ("runs", "gaps", "tokens_per_message", "p50_ms", "p99_ms", "max_ms")
    print("| tree | phase | " + " | ".join(columns) + " | p99 / idle p99 |")
    print("|---|---|" + "---:|" * (len(columns) + 1))
    for result in results:
        for phase in ("idle", "arrivals"):
            ratio = result["p99_ratio"] if phase == "arrivals" else 1.0
            cells = [result[phase][column] for column in columns] + [ratio]
            print(f"| {result['tree']} | {phase} | " + " | ".join(map(str, cells)) + " |")
    for result in results:
        print(f"arrivals on {result['tree']}: {json.dumps(result['arrivals_sent'])}")
    line: dict[str, Any] = {"goal_p99_ratio": GOAL, "trees": results, "args": vars(args)}
    if len(results) == 2:
        first, second = (result["arrivals"]["p99_ms"] for result in results)
        line["p99_arrivals_second_over_first"] = round(second / first, 2)
        print(f"p99 under arrivals, {trees[1]} / {trees[0]}: {line['p99_arrivals_second_over_first']}")
    print(json.dumps(line, default=str))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # the roles are stopped by then (Mesh.stop in measure's finally)
        sys.exit(130)
