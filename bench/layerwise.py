"""Layer-wise KV transfer on CPU: time from a prompt's submission until its blocks are in the destination,
shipping after the compute vs layer by layer during the last chunk (shm and the gRPC stream's encoding).

    python -m bench.layerwise [--tokens 1024] [--chunk 256] [--reps 5]

A random model with 8 layers, 8 KV heads of 128 (64 KiB of float32 KV per token), so the last chunk's
compute and the transfer take comparable time. Reports medians and the ratio layer-wise / after.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import torch

from kvmesh import default_model_path
from kvmesh.engine.config import EngineConfig
from kvmesh.engine.engine import Engine
from kvmesh.engine.loop import EngineLoop
from kvmesh.engine.model import CausalLM
from kvmesh.engine.model_config import ModelConfig, RopeConfig
from kvmesh.engine.tokenizer import Tokenizer
from kvmesh.transport import SharedKVPool, ShmSender, iter_chunks
from kvmesh.transport.layerwise import LayerProgress


def make_bench_engine(num_tokens: int, chunk: int) -> Engine:
    tokenizer = Tokenizer.from_file(default_model_path() / "tokenizer.json")  # the shipped model's
    config = ModelConfig(
        architecture="llama",
        vocab_size=tokenizer.vocab_size,
        hidden_size=1024,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=num_tokens + 64,
        rms_norm_eps=1e-6,
        rope=RopeConfig(theta=10000.0),
        attention_bias=False,
        o_proj_bias=False,
        tie_word_embeddings=False,
        sliding_window=None,
        bos_token_id=0,
        eos_token_ids=(0,),
    )
    torch.manual_seed(0)
    model = CausalLM(config).eval()
    engine_config = EngineConfig(
        block_size=16,
        num_blocks=num_tokens // 16 * 2 + 8,
        prefill_chunk_size=chunk,
        enable_prefix_caching=False,
        max_num_batched_tokens=chunk,
    )
    return Engine(model, tokenizer, engine_config)


async def one_run(
    engine: Engine,
    loop: EngineLoop,
    progress: LayerProgress,
    transport: str,
    layerwise: bool,
    prompt: list[int],
    dest_pool: SharedKVPool,
    sender: ShmSender,
) -> float:
    started = time.perf_counter()
    seq = engine.add_sequence(prompt)
    seq.prefill_only = True
    watch = progress.watch(seq)

    async def compute() -> None:
        stream = await loop.submit(seq)
        await stream.outputs.get()
        watch.complete()

    computing = asyncio.ensure_future(compute())
    if layerwise:
        await watch.final_pass()
        layer_ready = watch.layer_ready
    else:
        await computing
        layer_ready = None
    block_ids = list(seq.block_table)
    if transport == "shm":
        dst_ids = list(range(len(block_ids)))
        await sender.send(
            engine.pool, block_ids, dest_pool.destination(f"r{time.time_ns()}", dst_ids, "h"), layer_ready
        )
    else:
        encoder = iter_chunks(engine.pool, block_ids)
        if layer_ready is None:
            for _ in encoder:
                pass
        else:
            async for _ in encoder.achunks(layer_ready):
                pass
    await computing
    elapsed = time.perf_counter() - started
    progress.unwatch(watch)
    loop.release_soon(seq)
    return elapsed


async def main_async(args: argparse.Namespace) -> None:
    engine = make_bench_engine(args.tokens, args.chunk)
    loop = EngineLoop(engine)
    progress = LayerProgress(engine, loop)
    task = loop.start()
    _, dest = SharedKVPool.create(engine.pool.layout)
    sender = ShmSender()
    prompt = [(7 * i + 3) % 250 + 10 for i in range(args.tokens)]
    kv_mib = args.tokens * engine.pool.layout.bytes_per_token / 2**20
    print(
        f"prompt {args.tokens} tokens, chunk {args.chunk}, {kv_mib:.0f} MiB of KV, torch threads {torch.get_num_threads()}"
    )
    print(f"{'transport':<10} {'after compute ms':>17} {'layer-wise ms':>14} {'ratio':>6}")
    try:
        for transport in ("shm", "grpc"):
            times: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(args.reps):
                for layerwise in (False, True):
                    times[layerwise].append(
                        await one_run(engine, loop, progress, transport, layerwise, prompt, dest, sender)
                    )
            after, during = statistics.median(times[False]) * 1e3, statistics.median(times[True]) * 1e3
            print(f"{transport:<10} {after:>17.1f} {during:>14.1f} {during / after:>6.2f}")
    finally:
        task.cancel()
        sender.close()
        dest.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
