"""KV transport throughput against a plain memory copy of the same bytes, measured in the same run.

    python bench/transports.py [--payload-mib 64] [--reps 9] [--threads N] [--model llama8b|qwen1.5b]
                               [--scenarios contiguous fresh scattered] [--no-grpc-loopback]

Every row moves the same payload (whole blocks, every layer, K and V) into a destination pool's blocks.
"vs memcpy" is the median, over repetitions, of (memcpy time / row time), each repetition timing a
memcpy of the same bytes right before the transfer (this machine is shared: noise hits both alike);
1.0 = as fast as a memcpy.
The measuring functions are importable (bench/mesh.py folds them in); each returns a `BenchResult`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvmesh.engine.kv_cache import KVLayout, KVPool
from kvmesh.transport import (
    KVChunk,
    KVChunkReceiver,
    KVDestination,
    SharedKVPool,
    copy_blocks,
    iter_chunks,
    make_sender,
)

MODELS = {
    # 2 MiB blocks: 32 KiB per block per layer and K/V.
    "llama8b": KVLayout(
        num_layers=32, num_blocks=1, block_size=16, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16
    ),
    # 448 KiB blocks: 8 KiB per block per layer and K/V (2 KV heads): many small pieces per copy.
    "qwen1.5b": KVLayout(
        num_layers=28, num_blocks=1, block_size=16, num_kv_heads=2, head_dim=128, dtype=torch.bfloat16
    ),
}
"""Per-block shapes of a model's KV; `num_blocks` is set per run."""


@dataclass(frozen=True)
class BenchResult:
    name: str
    num_bytes: int
    seconds: list[float]
    """One wall time per repetition (after a warm-up)."""
    baseline_seconds: list[float]
    """The memcpy baseline of the same bytes, timed right before each repetition (noise hits both)."""

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def ratio(self) -> float:
        """Median over repetitions of baseline time / this time (1.0 = as fast as memcpy)."""
        return statistics.median(b / s for b, s in zip(self.baseline_seconds, self.seconds, strict=True))


@dataclass(frozen=True)
class BenchSetup:
    """Source and destination pools four times the payload, and the block ids a transfer moves."""

    layout: KVLayout
    src_ids: list[int]
    dst_ids: list[int]

    @property
    def num_bytes(self) -> int:
        return len(self.src_ids) * self.layout.bytes_per_block


SCENARIOS = {
    "contiguous": "consecutive block ids on both sides",
    "fresh": "scattered source ids, one run of destination ids (a fresh reservation)",
    "scattered": "scattered block ids on both sides",
}


def make_setup(model: str, payload_bytes: int, scenario: str, seed: int = 0) -> BenchSetup:
    num_blocks = max(1, payload_bytes // MODELS[model].bytes_per_block)
    layout = MODELS[model].with_blocks(4 * num_blocks)
    rng = random.Random(seed)
    src_ids = list(range(num_blocks, 2 * num_blocks))
    dst_ids = list(range(2 * num_blocks, 3 * num_blocks))
    if scenario in ("fresh", "scattered"):
        src_ids = rng.sample(range(layout.num_blocks), num_blocks)
    if scenario == "scattered":
        dst_ids = rng.sample(range(layout.num_blocks), num_blocks)
    return BenchSetup(layout, src_ids, dst_ids)


def random_pool(layout: KVLayout, storage: torch.Tensor | None = None) -> KVPool:
    pool = KVPool(layout, storage=storage)
    pool.kv.view(torch.int16).random_()  # touches every page, so no page fault is timed
    return pool


class Memcpy:
    """The baseline: `copy_` of a contiguous tensor into a preallocated one, `num_bytes` long."""

    def __init__(self, num_bytes: int) -> None:
        self.src = torch.empty(num_bytes // 2, dtype=torch.int16).random_()
        self.dst = torch.zeros_like(self.src)

    def __call__(self) -> None:
        self.dst.copy_(self.src)


def time_paired(name: str, num_bytes: int, run: Callable[[], object], reps: int) -> BenchResult:
    """Time `run` `reps` times, each right after a memcpy of the same bytes (after one warm-up of both)."""
    memcpy = Memcpy(num_bytes)
    memcpy()
    run()  # warm-up: allocations, mappings, caches
    seconds, baseline = [], []
    for _ in range(reps):
        started = time.perf_counter()
        memcpy()
        baseline.append(time.perf_counter() - started)
        started = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - started)
    return BenchResult(name, num_bytes, seconds, baseline)


def measure_memcpy(num_bytes: int, reps: int) -> BenchResult:
    """The baseline against itself: shows how noisy this machine is right now."""
    return time_paired("memcpy (torch copy_)", num_bytes, Memcpy(num_bytes), reps)


def measure_index_assign(setup: BenchSetup, reps: int) -> BenchResult:
    """What transports avoid: `dst[:, :, ids] = src[:, :, ids]` (a gathered temporary, then index_put_)."""
    src, dst = random_pool(setup.layout), random_pool(setup.layout)
    src_ids, dst_ids = torch.tensor(setup.src_ids), torch.tensor(setup.dst_ids)

    def run() -> None:
        dst.kv[:, :, dst_ids] = src.kv[:, :, src_ids]

    return time_paired("index assign (reference)", setup.num_bytes, run, reps)


def measure_copy_blocks(setup: BenchSetup, reps: int) -> BenchResult:
    """The copy kernel of the push transports, no transport around it."""
    src, dst = random_pool(setup.layout), random_pool(setup.layout)
    run = lambda: copy_blocks(src.kv, setup.src_ids, dst.kv, setup.dst_ids)  # noqa: E731
    return time_paired("copy_blocks", setup.num_bytes, run, reps)


def measure_shm_attach(setup: BenchSetup, reps: int) -> BenchResult:
    """shm through the attach path, the sender and the segment's owner in this process."""
    dst, segment = SharedKVPool.create(setup.layout)
    with segment:
        dest = segment.destination("bench", setup.dst_ids, host_id="", timeout_s=3600)
        return _time_shm_sends("shm send (same process)", dest, setup, reps)


def measure_shm_cross_process(setup: BenchSetup, reps: int) -> BenchResult:
    """shm from a second process (a prefill worker) into this process's pool (a decode worker)."""
    dst, segment = SharedKVPool.create(setup.layout)
    with segment:
        dest = segment.destination("bench", setup.dst_ids, host_id="", timeout_s=3600)
        job: dict[str, object] = {"name": segment.name, "layout": _layout_json(setup.layout), "reps": reps}
        job |= {"grant": dest.grant.hex(), "expires": dest.grant_expires_unix_ms}
        job |= {"src_ids": setup.src_ids, "dst_ids": setup.dst_ids, "threads": torch.get_num_threads()}
        result = subprocess.run(
            [sys.executable, __file__, "--shm-child", json.dumps(job)],
            capture_output=True,
            text=True,
            check=True,
        )
        return BenchResult(**json.loads(result.stdout))


def _shm_child(job: dict) -> None:
    torch.set_num_threads(job["threads"])
    layout = _layout_from_json(job["layout"])
    setup = BenchSetup(layout, job["src_ids"], job["dst_ids"])
    dest = KVDestination(
        "shm",
        tuple(setup.dst_ids),
        layout,
        job["name"],
        "",
        "bench",
        bytes.fromhex(job["grant"]),
        job["expires"],
    )
    result = _time_shm_sends("shm send (other process)", dest, setup, job["reps"])
    print(json.dumps(result.__dict__))


def _time_shm_sends(name: str, dest: KVDestination, setup: BenchSetup, reps: int) -> BenchResult:
    """Sends with the owner's grant (each send checks it, as a prefill worker's does)."""
    src = random_pool(setup.layout)
    sender = make_sender("shm")
    loop = asyncio.new_event_loop()
    try:
        run = lambda: loop.run_until_complete(sender.send(src, setup.src_ids, dest))  # noqa: E731
        return time_paired(name, setup.num_bytes, run, reps)
    finally:
        loop.close()
        sender.close()


def measure_grpc_chunks(setup: BenchSetup, reps: int, chunk_bytes: int = 1 << 20) -> BenchResult:
    """Encode and receive the chunk stream in this process, no network: the transport's CPU cost."""
    src, dst = random_pool(setup.layout), random_pool(setup.layout)

    def run() -> None:
        chunks = iter_chunks(src, setup.src_ids, chunk_bytes)
        receiver = KVChunkReceiver(dst, setup.dst_ids)
        for chunk in chunks:
            receiver.add(chunk)
        receiver.finish(chunks.num_bytes, chunks.crc32)

    return time_paired("grpc chunks, encode+receive", setup.num_bytes, run, reps)


# A minimal raw-bytes streaming method: no protos, one frame per message.
# Chunk frame: b"C" + <offset u64, crc32 u32> + payload; done frame: b"D" + <total bytes u64, crc32 u32>.
_SERVICE, _METHOD = "kvmesh.bench.KVBench", "Pull"
_FRAME = struct.Struct("<QI")


async def _start_kv_server(src: KVPool, src_ids: list[int], chunk_bytes: int) -> tuple[grpc.aio.Server, int]:
    """A server whose one method streams `src_ids` of `src` as frames; returns it and its port."""

    async def pull(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        chunks = iter_chunks(src, src_ids, chunk_bytes)
        for chunk in chunks:
            yield b"C" + _FRAME.pack(chunk.offset_bytes, chunk.crc32) + chunk.payload
        yield b"D" + _FRAME.pack(chunks.num_bytes, chunks.crc32)

    # NOTE: grpc.aio binds servers and channels to the loop running when they are made.
    server = grpc.aio.server()
    handler = grpc.unary_stream_rpc_method_handler(pull)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(_SERVICE, {_METHOD: handler})])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def _time_grpc_pulls(name: str, port: int, setup: BenchSetup, reps: int) -> BenchResult:
    """Pull the stream from the server on `port` into a local pool, `reps` times."""
    dst = random_pool(setup.layout)
    loop = asyncio.new_event_loop()
    channel = loop.run_until_complete(_make_channel(port))
    call = channel.unary_stream(f"/{_SERVICE}/{_METHOD}")

    async def transfer() -> None:
        receiver = KVChunkReceiver(dst, setup.dst_ids)
        async for message in call(b"", timeout=60):
            offset_or_total, crc = _FRAME.unpack_from(message, 1)
            if message[:1] == b"C":
                receiver.add(KVChunk(offset_or_total, memoryview(message)[1 + _FRAME.size :], crc))
            else:
                receiver.finish(offset_or_total, crc)

    try:
        return time_paired(name, setup.num_bytes, lambda: loop.run_until_complete(transfer()), reps)
    finally:
        loop.run_until_complete(channel.close())
        loop.close()


async def _make_channel(port: int) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(f"127.0.0.1:{port}")


def measure_grpc_loopback(setup: BenchSetup, reps: int, chunk_bytes: int = 1 << 20) -> BenchResult:
    """A real grpc.aio server-streaming call on loopback, server and client in this process (one GIL)."""
    src = random_pool(setup.layout)
    server_loop = asyncio.new_event_loop()
    server, port = server_loop.run_until_complete(_start_kv_server(src, setup.src_ids, chunk_bytes))
    # The server runs on its own loop in a thread, as it would in its own process.
    thread = threading.Thread(target=server_loop.run_forever, daemon=True)
    thread.start()
    try:
        return _time_grpc_pulls("grpc stream, loopback, 1 proc", port, setup, reps)
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(None), server_loop).result()
        server_loop.call_soon_threadsafe(server_loop.stop)
        thread.join()
        server_loop.close()


def measure_grpc_loopback_cross_process(
    setup: BenchSetup, reps: int, chunk_bytes: int = 1 << 20
) -> BenchResult:
    """A real grpc.aio server-streaming call on loopback from a second process (a prefill worker)."""
    job: dict[str, object] = {"layout": _layout_json(setup.layout), "src_ids": setup.src_ids}
    job |= {"chunk_bytes": chunk_bytes, "threads": torch.get_num_threads()}
    with subprocess.Popen(
        [sys.executable, __file__, "--grpc-server-child", json.dumps(job)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    ) as child:
        assert child.stdin is not None and child.stdout is not None
        port = int(child.stdout.readline())
        try:
            return _time_grpc_pulls("grpc stream, loopback, 2 procs", port, setup, reps)
        finally:
            child.stdin.close()  # the child serves until its stdin closes


def _grpc_server_child(job: dict) -> None:
    torch.set_num_threads(job["threads"])
    src = random_pool(_layout_from_json(job["layout"]))

    async def serve() -> None:
        server, port = await _start_kv_server(src, job["src_ids"], job["chunk_bytes"])
        print(port, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await server.stop(None)

    asyncio.run(serve())


def _layout_json(layout: KVLayout) -> dict:
    return {**layout.__dict__, "dtype": str(layout.dtype).removeprefix("torch.")}


def _layout_from_json(data: dict) -> KVLayout:
    return KVLayout(**{**data, "dtype": getattr(torch, data["dtype"])})


def format_table(results: Sequence[BenchResult]) -> str:
    lines = [f"{'':30} {'MiB':>5} {'best ms':>8} {'med ms':>8} {'GB/s':>6} {'vs memcpy':>9}"]
    for r in results:
        lines.append(
            f"{r.name:30} {r.num_bytes / 2**20:5.1f} {r.best * 1e3:8.2f} {r.median * 1e3:8.2f} "
            f"{r.num_bytes / r.best / 1e9:6.2f} {r.ratio:9.2f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--payload-mib", type=int, default=64)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    parser.add_argument("--model", choices=sorted(MODELS), default="llama8b")
    parser.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=list(SCENARIOS))
    parser.add_argument("--no-grpc-loopback", action="store_true")
    parser.add_argument("--shm-child", help=argparse.SUPPRESS)
    parser.add_argument("--grpc-server-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.shm_child:
        _shm_child(json.loads(args.shm_child))
        return
    if args.grpc_server_child:
        _grpc_server_child(json.loads(args.grpc_server_child))
        return
    torch.set_num_threads(args.threads)
    for scenario in args.scenarios:
        setup = make_setup(args.model, args.payload_mib << 20, scenario)
        results = [
            measure_memcpy(setup.num_bytes, args.reps),
            measure_index_assign(setup, max(3, args.reps // 3)),
            measure_copy_blocks(setup, args.reps),
            measure_shm_attach(setup, args.reps),
            measure_shm_cross_process(setup, args.reps),
            measure_grpc_chunks(setup, args.reps),
        ]
        if not args.no_grpc_loopback:
            results.append(measure_grpc_loopback(setup, args.reps))
            results.append(measure_grpc_loopback_cross_process(setup, args.reps))
        print(
            f"\n{args.model}, {scenario}: {len(setup.src_ids)} blocks of {setup.layout.bytes_per_block / 2**10:.0f} "
            f"KiB, {SCENARIOS[scenario]}, {args.threads} torch threads"
        )
        print(format_table(results))


if __name__ == "__main__":
    main()
