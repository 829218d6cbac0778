"""Cancel storm and overload against a real process mesh: nothing leaks, nothing hangs, nothing is refused
that need not be.

    python -m bench.chaos [--requests 10000] [--load-s 60] [--burst 200] [--model PATH]

A cache store, one prefill worker, two decode workers (shared-memory KV transport) and a gateway run as
`kvmesh serve` processes on loopback, each worker with a Prometheus port.

1. Storm. --requests completions and edits, short prompts (prefilled by the decode worker) and long ones
   (prefilled by the prefill worker and shipped over shared memory), at most --max-in-flight at once,
   each cancelled by the client at a random point: before prefill (0-2 ms after sending), during the
   prefill or the transfer (2-150 ms), mid-stream (after 1-6 chunks); a tenth run to their end. Then,
   within 10 s: every worker's `kvmesh_kv_blocks_used` must be back to 0 (leaked blocks otherwise).
   Counted: RESOURCE_EXHAUSTED answers (goal 0: the cancelled requests' blocks come back as soon as
   their writer has stopped, not after a fixed quarantine), other errors (goal 0).
2. Load. --concurrency clients send requests back to back for --load-s seconds, none cancelled:
   errors (goal 0), latency p50 / p99.
3. Burst. --burst requests at once, past capacity, each with a --burst-deadline-s deadline: every one
   must be answered before its deadline, served or RESOURCE_EXHAUSTED; none hung.

Finally every process is stopped (SIGKILL past a grace) and the /dev/shm segments the mesh created (its
decode workers' pools, seen once it started) must be gone (leaked segments, goal 0). Loopback only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio

from kvmesh import default_model_path
from kvmesh.cli.launcher import SERVING_LINE
from kvmesh.v1 import gateway_pb2, gateway_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]
SHM_DIR = Path("/dev/shm")
BLOCKS_USED = "kvmesh_kv_blocks_used"
STARTUP_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 15.0
SETTLE_TIMEOUT_S = 10.0
"""How long the workers get to return every block after the storm, in seconds."""


# ---- the mesh -----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Process:
    name: str
    role: str
    process: asyncio.subprocess.Process
    metrics_port: int | None = None
    address: str = ""


class Mesh:
    """The roles as `kvmesh serve` processes; stop() ends them all, whatever state they are in."""

    def __init__(self, model: str, log_dir: Path, num_decode: int = 2) -> None:
        self._model = model
        self._log_dir = log_dir
        self._num_decode = num_decode
        self.processes: list[Process] = []

    async def _spawn(self, name: str, role: str, *args: str, metrics: bool = False) -> Process:
        metrics_port = free_port() if metrics else None
        extra = ("--metrics-port", str(metrics_port)) if metrics_port else ()
        command = [sys.executable, "-m", "kvmesh.cli", "serve", role, "--port", "0", *args, *extra]
        log = open(self._log_dir / f"{name}.log", "wb")  # noqa: SIM115 (the child owns it)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        child = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=log, env=env, cwd=ROOT
        )
        log.close()
        process = Process(name, role, child, metrics_port)
        self.processes.append(process)
        return process

    async def _wait_serving(self, process: Process) -> str:
        assert process.process.stdout is not None
        async with asyncio.timeout(STARTUP_TIMEOUT_S):
            while True:
                raw = await process.process.stdout.readline()
                if not raw:
                    raise RuntimeError(f"{process.name} exited; see {self._log_dir / process.name}.log")
                match = SERVING_LINE.match(raw.decode().strip())
                if match and match["role"] == process.role:
                    process.address = match["address"]
                    return process.address

    async def start(self) -> str:
        """Starts every role; returns the gateway's address once all are SERVING."""
        store = await self._spawn("cache-store", "cache-store", "--heartbeat-interval-ms", "200")
        store_address = await self._wait_serving(store)
        common = ("--cache-store", store_address, "--model", self._model, "--threads", "1")
        workers = [
            await self._spawn("prefill-0", "prefill", *common, "--transports", "shm,grpc", metrics=True)
        ]
        for i in range(self._num_decode):
            workers.append(await self._spawn(f"decode-{i}", "decode", *common, metrics=True))
        gateway = await self._spawn(
            "gateway", "gateway", "--cache-store", store_address, "--model", self._model, "--transport", "shm"
        )
        await asyncio.gather(*(self._wait_serving(p) for p in workers))
        address = await self._wait_serving(gateway)
        await asyncio.sleep(1.5)  # a few heartbeats and refreshes: the gateway's pool holds every worker
        return address

    def workers(self) -> list[Process]:
        return [p for p in self.processes if p.metrics_port is not None]

    async def stop(self) -> None:
        """SIGTERM to all (gateway first), SIGKILL whatever still runs after STOP_TIMEOUT_S."""
        order = sorted(
            self.processes, key=lambda p: ["gateway", "decode", "prefill", "cache-store"].index(p.role)
        )
        for process in order:
            if process.process.returncode is None:
                process.process.send_signal(signal.SIGTERM)
        for process in order:
            try:
                await asyncio.wait_for(process.process.wait(), STOP_TIMEOUT_S)
            except TimeoutError:
                process.process.kill()
                await process.process.wait()


def blocks_used(port: int) -> float:
    """kvmesh_kv_blocks_used of a worker, from its metrics port."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    for line in text.splitlines():
        if line.startswith(BLOCKS_USED + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise RuntimeError(f"no {BLOCKS_USED} on port {port}")


def shm_segments() -> set[str]:
    return {p.name for p in SHM_DIR.iterdir() if p.name.startswith("kvmesh-")} if SHM_DIR.is_dir() else set()


# ---- requests -----------------------------------------------------------------------------------------

LONG_BODY = "".join(
    f"def handler_{i}(event, context):\n    values = [v * {i} for v in event['items']]\n    return sum(values)\n\n"
    for i in range(40)
)


def make_request(rng: random.Random) -> tuple[str, gateway_pb2.CompleteRequest | gateway_pb2.EditRequest]:
    """A completion or an edit with a short or long prompt; long prompts start unique (no cache hit)."""
    long = rng.random() < 0.5
    unique = f"# request {rng.getrandbits(48):012x}\n"
    body = unique + (LONG_BODY[: rng.randint(2000, len(LONG_BODY))] if long else "")
    if rng.random() < 0.7:
        request = gateway_pb2.CompleteRequest(
            prefix=body + "def parse(argv):\n    ", suffix="\n    return args\n"
        )
        request.sampling.max_tokens = rng.randint(8, 32)
        return f"complete-{'long' if long else 'short'}", request
    original = body + "def area(w, h):\n    return w * h\n"
    request = gateway_pb2.EditRequest(original=original, snippet="rename w to width", speculative=True)
    request.sampling.max_tokens = 48
    return f"edit-{'long' if long else 'short'}", request


def start_call(stub: gateway_pb2_grpc.GatewayStub, request, timeout_s: float):  # noqa: ANN001, ANN201
    if isinstance(request, gateway_pb2.EditRequest):
        return stub.Edit(request, timeout=timeout_s)
    return stub.Complete(request, timeout=timeout_s)


@dataclass
class Outcomes:
    codes: Counter[str] = field(default_factory=Counter)
    by_mode: Counter[str] = field(default_factory=Counter)
    latencies_s: list[float] = field(default_factory=list)


async def read_all(call) -> None:  # noqa: ANN001
    async for _ in call:
        pass


async def storm_one(stub: gateway_pb2_grpc.GatewayStub, rng: random.Random, outcomes: Outcomes) -> None:
    kind, request = make_request(rng)
    draw = rng.random()
    mode = (
        "before-prefill"
        if draw < 0.3
        else "in-transfer"
        if draw < 0.6
        else "mid-stream"
        if draw < 0.9
        else "none"
    )
    outcomes.by_mode[f"{mode} {kind}"] += 1
    call = start_call(stub, request, 30.0)
    try:
        if mode == "before-prefill":
            await asyncio.sleep(rng.uniform(0, 0.002))
        elif mode == "in-transfer":
            await asyncio.sleep(rng.uniform(0.002, 0.150))
        elif mode == "mid-stream":
            num_chunks = rng.randint(1, 6)
            async for _ in call:
                num_chunks -= 1
                if num_chunks == 0:
                    break
        else:
            await read_all(call)
        if not call.done():
            call.cancel()
            outcomes.codes["CANCELLED (by the client)"] += 1
            return
        code = await call.code()
        outcomes.codes["OK" if code == grpc.StatusCode.OK else code.name] += 1
    except grpc.aio.AioRpcError as error:
        outcomes.codes[error.code().name] += 1
    finally:
        call.cancel()


async def run_storm(
    stub: gateway_pb2_grpc.GatewayStub, num_requests: int, max_in_flight: int, seed: int
) -> Outcomes:
    rng = random.Random(seed)
    outcomes = Outcomes()
    slots = asyncio.Semaphore(max_in_flight)
    tasks: set[asyncio.Task[None]] = set()

    async def one() -> None:
        try:
            await asyncio.wait_for(storm_one(stub, rng, outcomes), 60)
        except TimeoutError:
            outcomes.codes["HUNG (60 s)"] += 1
        finally:
            slots.release()

    for _ in range(num_requests):
        await slots.acquire()
        task = asyncio.create_task(one())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
    return outcomes


async def timed_request(stub: gateway_pb2_grpc.GatewayStub, request, deadline_s: float) -> tuple[str, float]:  # noqa: ANN001
    started = time.perf_counter()
    try:
        await asyncio.wait_for(read_all(start_call(stub, request, deadline_s)), deadline_s + 5.0)
        code = "OK"
    except grpc.aio.AioRpcError as error:
        code = error.code().name
    except TimeoutError:
        code = "HUNG"
    return code, time.perf_counter() - started


async def run_load(
    stub: gateway_pb2_grpc.GatewayStub, concurrency: int, load_s: float, seed: int
) -> Outcomes:
    rng = random.Random(seed)
    outcomes = Outcomes()
    end = time.monotonic() + load_s

    async def client() -> None:
        while time.monotonic() < end:
            _, request = make_request(rng)
            code, seconds = await timed_request(stub, request, 60.0)
            outcomes.codes[code] += 1
            if code == "OK":
                outcomes.latencies_s.append(seconds)

    await asyncio.gather(*(client() for _ in range(concurrency)))
    return outcomes


async def run_burst(
    stub: gateway_pb2_grpc.GatewayStub, num_requests: int, deadline_s: float, seed: int
) -> Outcomes:
    rng = random.Random(seed)
    outcomes = Outcomes()
    results = await asyncio.gather(
        *(timed_request(stub, make_request(rng)[1], deadline_s) for _ in range(num_requests))
    )
    for code, seconds in results:
        outcomes.codes[code] += 1
        outcomes.latencies_s.append(seconds)
    return outcomes


async def settle(mesh: Mesh) -> tuple[dict[str, float], float]:
    """Polls every worker's blocks in use until all are 0 or SETTLE_TIMEOUT_S; returns the last values
    and the seconds it took."""
    started = time.monotonic()
    while True:
        used = {p.name: await asyncio.to_thread(blocks_used, p.metrics_port) for p in mesh.workers()}  # type: ignore[arg-type]
        elapsed = time.monotonic() - started
        if not any(used.values()) or elapsed > SETTLE_TIMEOUT_S:
            return used, elapsed
        await asyncio.sleep(0.05)


# ---- report -------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return (
        statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]
    )


async def main_async(args: argparse.Namespace) -> list[tuple[str, str, str, str]]:
    rows: list[tuple[str, str, str, str]] = []
    shm_before = shm_segments()
    ours: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="kvmesh-chaos-") as log_dir:
        mesh = Mesh(args.model, Path(log_dir))
        try:
            address = await mesh.start()
            # NOTE: this mesh's own segments (its decode workers' pools): other jobs on the machine may
            # create and remove segments of their own meanwhile, which must not count as leaks here.
            ours = shm_segments() - shm_before
            async with grpc.aio.insecure_channel(address) as channel:
                stub = gateway_pb2_grpc.GatewayStub(channel)
                started = time.monotonic()
                storm = await run_storm(stub, args.requests, args.max_in_flight, args.seed)
                storm_s = time.monotonic() - started
                used, settle_s = await settle(mesh)
                exhausted = storm.codes["RESOURCE_EXHAUSTED"]
                errors = sum(
                    n
                    for c, n in storm.codes.items()
                    if c not in ("OK", "CANCELLED (by the client)", "RESOURCE_EXHAUSTED")
                )
                rows += [
                    (
                        "storm",
                        "requests (max in flight)",
                        f"{args.requests} ({args.max_in_flight}) in {storm_s:.1f} s",
                        "",
                    ),
                    ("storm", "outcomes", ", ".join(f"{c} {n}" for c, n in storm.codes.most_common()), ""),
                    ("storm", "RESOURCE_EXHAUSTED", str(exhausted), "0"),
                    ("storm", "other errors", str(errors), "0"),
                    (
                        "storm",
                        "leaked blocks per worker",
                        ", ".join(f"{n} {int(v)}" for n, v in used.items()),
                        "all 0",
                    ),
                    (
                        "storm",
                        "seconds until every block was back",
                        f"{settle_s:.2f}",
                        "< 2 (the quarantine)",
                    ),
                ]
                load = await run_load(stub, args.concurrency, args.load_s, args.seed + 1)
                load_errors = sum(n for c, n in load.codes.items() if c != "OK")
                rows += [
                    (
                        "load",
                        f"requests ({args.concurrency} clients, {args.load_s:.0f} s)",
                        str(sum(load.codes.values())),
                        "",
                    ),
                    (
                        "load",
                        "errors",
                        f"{load_errors} ({', '.join(f'{c} {n}' for c, n in load.codes.items() if c != 'OK') or '-'})",
                        "0",
                    ),
                    (
                        "load",
                        "latency p50 / p99 (s)",
                        f"{percentile(load.latencies_s, 50):.2f} / {percentile(load.latencies_s, 99):.2f}",
                        "",
                    ),
                ]
                burst = await run_burst(stub, args.burst, args.burst_deadline_s, args.seed + 2)
                late = sum(1 for s in burst.latencies_s if s > args.burst_deadline_s)
                hung = burst.codes["HUNG"]
                rows += [
                    (
                        "burst",
                        f"requests at once (deadline {args.burst_deadline_s:.0f} s)",
                        str(args.burst),
                        "",
                    ),
                    (
                        "burst",
                        "outcomes",
                        ", ".join(f"{c} {n}" for c, n in burst.codes.most_common()),
                        "OK or RESOURCE_EXHAUSTED",
                    ),
                    ("burst", "answered after the deadline / hung", f"{late} / {hung}", "0 / 0"),
                    (
                        "burst",
                        "slowest answer (s)",
                        f"{max(burst.latencies_s):.2f}",
                        f"< {args.burst_deadline_s:.0f}",
                    ),
                ]
                used_after, _ = await settle(mesh)
                rows.append(
                    (
                        "end",
                        "blocks in use after load and burst",
                        ", ".join(f"{n} {int(v)}" for n, v in used_after.items()),
                        "all 0",
                    )
                )
        finally:
            await mesh.stop()
        logs = [path.read_text(errors="replace") for path in Path(log_dir).glob("decode-*.log")]
        quarantined = sum(log.count("unconfirmed stop, blocks quarantined") for log in logs)
        rows.append(("end", "cancelled shm transfers quarantined (stop unconfirmed)", str(quarantined), "0"))
    leaked = ours & shm_segments()
    rows.append(("end", f"leaked /dev/shm segments (of the mesh's {len(ours)})", str(len(leaked)), "0"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=10_000, help="requests in the cancel storm")
    parser.add_argument("--max-in-flight", type=int, default=8, help="most storm requests in flight at once")
    parser.add_argument("--concurrency", type=int, default=24, help="clients of the load phase")
    parser.add_argument("--load-s", type=float, default=60.0, help="length of the load phase, in seconds")
    parser.add_argument("--burst", type=int, default=200, help="requests sent at once after the load phase")
    parser.add_argument("--burst-deadline-s", type=float, default=60.0, help="deadline of each burst request")
    parser.add_argument("--model", default=None, help="checkpoint directory (default: the built-in model)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.model = args.model or str(default_model_path())
    rows = asyncio.run(main_async(args))
    print("| phase | measure | value | goal |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
