"""The mesh against the engine called in-process, on the same model, in the same run.

    python bench/mesh.py [--model PATH] [--prompt-tokens 1024] [--new-tokens 64] [--reps 9]

Part 1 starts the four roles as separate `kvmesh serve` processes on loopback (as `kvmesh up` does),
once per KV transport, and measures time to first token (client-side, request sent -> first token
received) and decode tokens/s (client-side) on a prompt of about --prompt-tokens tokens; the baseline
is the engine in this process, with the same single torch thread the workers use: TTFT = prefill + the
first token, tokens/s = generate. Every request differs in its first token, so no cache can help.

Part 2 is each KV transport's bytes/s against a plain memory copy of the same bytes (bench/transports.py).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import grpc
import torch

import bench.transports as transport_bench
from gateway.layout import PromptLayout
from kvmesh import default_model_path
from kvmesh.cli.launcher import LocalMesh
from kvmesh.engine.engine import Engine
from kvmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc


def make_prefix(engine: Engine, num_tokens: int) -> str:
    """Real Python source, cut to about num_tokens tokens of the model's tokenizer."""
    source = Path(torch.__file__).with_name("functional.py").read_text()
    ids = engine.tokenizer.encode(source)[:num_tokens]
    return engine.tokenizer.decode(ids)


def engine_request(engine: Engine, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    """(TTFT ms, decode tokens/s) of the engine in this process."""
    started = time.perf_counter()
    engine.generate(prompt, 1, ignore_eos=True)
    ttft_s = time.perf_counter() - started
    started = time.perf_counter()
    engine.generate(prompt, new_tokens, ignore_eos=True)
    return ttft_s * 1000, (new_tokens - 1) / (time.perf_counter() - started - ttft_s)


STAGES = ("route_ms", "queue_ms", "prefill_ms", "transfer_ms")


async def timed_completion(
    stub: gateway_pb2_grpc.GatewayStub, prefix: str, new_tokens: int
) -> tuple[float, float, int, common_pb2.Usage]:
    """(seconds to the first token, seconds to the last, tokens received, the final usage) of one
    completion through the mesh, seen by the client."""
    request = gateway_pb2.CompleteRequest(prefix=prefix, suffix="\n")
    request.sampling.max_tokens = new_tokens
    request.sampling.ignore_eos = True
    started = time.perf_counter()
    first = None
    num_tokens = 0
    usage = None
    async for chunk in stub.Complete(request, timeout=120):
        if chunk.token_ids and first is None:
            first = time.perf_counter()
        num_tokens += len(chunk.token_ids)
        if chunk.HasField("usage"):
            usage = chunk.usage
    ended = time.perf_counter()
    if first is None or usage is None:
        raise RuntimeError("the mesh sent no token or no usage")
    return first - started, ended - started, num_tokens, usage


async def mesh_request(
    stub: gateway_pb2_grpc.GatewayStub, prefix: str, new_tokens: int
) -> tuple[float, float, dict[str, float]]:
    """(TTFT ms, decode tokens/s, stage ms) of one completion through the mesh, seen by the client."""
    first_s, last_s, num_tokens, usage = await timed_completion(stub, prefix, new_tokens)
    assert num_tokens == new_tokens, num_tokens
    stages = {f: getattr(usage.stage_ms, f) for f in STAGES}
    return first_s * 1000, (num_tokens - 1) / (last_s - first_s), stages


Row = tuple[float, float, float, float, dict[str, float]]
"""engine TTFT ms, engine tokens/s, mesh TTFT ms, mesh tokens/s, mesh stage ms."""


async def measure(
    engine: Engine, model: str, transport: str, prefixes: list[str], prompts: list[list[int]], new_tokens: int
) -> list[Row]:
    """Engine and mesh request by request, alternating, so the machine's noise hits both alike."""
    mesh = LocalMesh(port=0, model_path=model, transport=transport)
    address = await mesh.start()
    rows = []
    try:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            await mesh_request(stub, prefixes[0], 2)  # warm-up: channels, first forward passes
            for prefix, prompt in zip(prefixes[1:], prompts[1:], strict=True):
                engine_ttft, engine_rate = engine_request(engine, prompt, new_tokens)
                mesh_ttft, mesh_rate, stages = await mesh_request(stub, prefix, new_tokens)
                rows.append((engine_ttft, engine_rate, mesh_ttft, mesh_rate, stages))
    finally:
        await mesh.stop()
    return rows


def p50(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=None, help="checkpoint directory (default: kvmesh's default model)"
    )
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--transports", nargs="+", default=["shm", "grpc"])
    parser.add_argument("--payload-mib", type=int, default=64, help="part 2 payload")
    args = parser.parse_args()

    model = args.model or str(default_model_path())
    torch.set_num_threads(1)  # the workers run one torch thread each
    engine = Engine.from_pretrained(model)
    base = make_prefix(engine, args.prompt_tokens)
    # A different first line per request: same length, nothing reusable from the previous one.
    prefixes = [f"# {i:03d}\n{base}" for i in range(args.reps + 1)]
    layout = PromptLayout(engine.tokenizer)
    prompts = [layout.completion(p, "\n") for p in prefixes]
    engine.generate(prompts[0], 2)  # warm-up

    print(
        f"\n## Mesh vs engine in-process\n\n- Command: `python bench/mesh.py {' '.join(sys.argv[1:])}`".rstrip()
    )
    print(
        f"- Model: {model}; prompt {len(prompts[0])} tokens, {args.new_tokens} new tokens, {args.reps} requests"
    )
    print("- Workers: separate processes, one torch thread each. The engine baseline runs one thread too, in")
    print(
        "  the benchmark's process, one request right before each mesh request (paired: noise hits both).\n"
    )
    print(
        "| transport | engine TTFT p50 (ms) | mesh TTFT p50 (ms) | added TTFT p50, paired (ms) "
        "| engine tok/s | mesh tok/s | mesh / engine tok/s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    stage_rows = []
    for transport in args.transports:
        rows = asyncio.run(measure(engine, model, transport, prefixes, prompts, args.new_tokens))
        print(
            f"| {transport} | {p50([r[0] for r in rows]):.1f} | {p50([r[2] for r in rows]):.1f} | "
            f"{p50([r[2] - r[0] for r in rows]):+.1f} | {p50([r[1] for r in rows]):.0f} | "
            f"{p50([r[3] for r in rows]):.0f} | {p50([r[3] / r[1] for r in rows]):.2f} |"
        )
        stage_rows.append((transport, [r[4] for r in rows]))
    print("\nMesh stage medians (ms, from usage):\n")
    print("| transport | route | queue | prefill | transfer |")
    print("|---|---:|---:|---:|---:|")
    for transport, stages in stage_rows:
        cells = " | ".join(f"{p50([s[f] for s in stages]):.2f}" for f in STAGES)
        print(f"| {transport} | {cells} |")

    print(
        f"\n## KV transports vs one memory copy ({args.payload_mib} MiB, fresh reservation, 7B-class GQA blocks)\n"
    )
    setup = transport_bench.make_setup("llama8b", args.payload_mib << 20, "fresh")
    results = [
        transport_bench.measure_memcpy(setup.num_bytes, args.reps),
        transport_bench.measure_shm_cross_process(setup, args.reps),
        transport_bench.measure_grpc_loopback_cross_process(setup, args.reps),
    ]
    print("```")
    print(transport_bench.format_table(results))
    print("```")


if __name__ == "__main__":
    main()
