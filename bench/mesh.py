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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import transports as transport_bench  # noqa: E402

from gateway.layout import PromptLayout  # noqa: E402
from kvmesh import default_model_path  # noqa: E402
from kvmesh.engine import Engine  # noqa: E402
from kvmesh.launcher import LocalMesh  # noqa: E402
from kvmesh.v1 import gateway_pb2, gateway_pb2_grpc  # noqa: E402


def make_prefix(engine: Engine, num_tokens: int) -> str:
    """Real Python source, cut to about num_tokens tokens of the model's tokenizer."""
    source = Path(torch.__file__).with_name("functional.py").read_text()
    ids = engine.tokenizer.encode(source)[:num_tokens]
    return engine.tokenizer.decode(ids)


def engine_baseline(
    engine: Engine, prompts: list[list[int]], new_tokens: int
) -> tuple[list[float], list[float]]:
    ttfts, rates = [], []
    for prompt in prompts:
        started = time.perf_counter()
        engine.generate(prompt, 1, ignore_eos=True)
        ttfts.append((time.perf_counter() - started) * 1000)
        started = time.perf_counter()
        engine.generate(prompt, new_tokens, ignore_eos=True)
        total = time.perf_counter() - started
        rates.append((new_tokens - 1) / (total - ttfts[-1] / 1000))
    return ttfts, rates


async def mesh_run(
    address: str, prefixes: list[str], new_tokens: int
) -> tuple[list[float], list[float], list[dict[str, float]]]:
    ttfts, rates, stages = [], [], []
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        for prefix in prefixes:
            request = gateway_pb2.CompleteRequest(prefix=prefix, suffix="\n")
            request.sampling.max_tokens = new_tokens
            request.sampling.ignore_eos = True
            started = time.perf_counter()
            first = None
            num_tokens = 0
            async for chunk in stub.Complete(request, timeout=120):
                if chunk.token_ids and first is None:
                    first = time.perf_counter()
                num_tokens += len(chunk.token_ids)
                if chunk.HasField("usage"):
                    stage = chunk.usage.stage_ms
                    stages.append(
                        {f: getattr(stage, f) for f in ("route_ms", "queue_ms", "prefill_ms", "transfer_ms")}
                    )
            ended = time.perf_counter()
            assert first is not None and num_tokens == new_tokens, num_tokens
            ttfts.append((first - started) * 1000)
            rates.append((num_tokens - 1) / (ended - first))
    return ttfts, rates, stages


async def measure_mesh(
    model: str, transport: str, prefixes: list[str], new_tokens: int
) -> tuple[list[float], list[float], list[dict[str, float]]]:
    mesh = LocalMesh(port=0, model_path=model, transport=transport)
    address = await mesh.start()
    try:
        await mesh_run(address, prefixes[:1], 2)  # warm-up: channels, first forward passes
        return await mesh_run(address, prefixes[1:], new_tokens)
    finally:
        await mesh.stop()


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
    # A different first character per request: same length, nothing reusable from the previous one.
    prefixes = [f"# {i:03d}\n{base}" for i in range(args.reps + 1)]
    layout = PromptLayout(engine.tokenizer)
    prompts = [layout.completion(p, "\n") for p in prefixes]
    num_prompt_tokens = len(prompts[0])

    engine_ttft, engine_rate = engine_baseline(engine, prompts[1:], args.new_tokens)
    rows = [("engine in-process", engine_ttft, engine_rate, None)]
    for transport in args.transports:
        ttft, rate, stages = asyncio.run(measure_mesh(model, transport, prefixes, args.new_tokens))
        rows.append((f"mesh, {transport} transport", ttft, rate, stages))

    print(
        f"\n## Mesh vs engine in-process\n\n- Command: `python bench/mesh.py {' '.join(sys.argv[1:])}`".rstrip()
    )
    print(
        f"- Model: {model}; prompt {num_prompt_tokens} tokens, {args.new_tokens} new tokens, {args.reps} requests each"
    )
    print("- Workers: separate processes, one torch thread each; the baseline runs one thread too.\n")
    print("| path | TTFT p50 (ms) | TTFT added vs engine (ms) | decode tokens/s p50 | tokens/s vs engine |")
    print("|---|---:|---:|---:|---:|")
    for name, ttft, rate, _ in rows:
        print(
            f"| {name} | {p50(ttft):.1f} | {p50(ttft) - p50(engine_ttft):+.1f} | {p50(rate):.0f} | "
            f"{p50(rate) / p50(engine_rate):.2f} |"
        )
    print("\nMesh stage medians (ms, from usage):\n")
    print("| path | route | queue | prefill | transfer |")
    print("|---|---:|---:|---:|---:|")
    for name, _, _, stages in rows[1:]:
        assert stages is not None
        cells = " | ".join(
            f"{p50([s[f] for s in stages]):.2f}"
            for f in ("route_ms", "queue_ms", "prefill_ms", "transfer_ms")
        )
        print(f"| {name} | {cells} |")

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
