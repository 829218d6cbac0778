"""Part cuda_ipc of `python -m bench.gpu`: the CUDA IPC KV transport between two processes on one GPU.

A second process (a decode worker's role) exports its KV pool; this one writes blocks into scattered
destination blocks of it, checked bit for bit, whole and layer by layer; then CUDA IPC bytes/s against
one device-to-device copy of the same bytes (the KV of a 4k-token prompt at Qwen2.5-Coder-7B's shape,
56 KiB per token), both measured in this run. Needs CUDA (no CPU smoke).
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
from typing import Any

import torch

from bench.gpu_common import CONTEXT_TOKENS, Settings, check, timed


def _ipc_layout(num_blocks: int, quick: bool) -> Any:
    from kvmesh.engine.kv_cache import KVLayout

    if quick:
        return KVLayout(4, num_blocks, 16, 2, 64, torch.bfloat16)
    return KVLayout(28, num_blocks, 16, 4, 128, torch.bfloat16)  # Qwen2.5-Coder-7B: 56 KiB per token


def _random_bits_(kv: torch.Tensor, seed: int) -> None:
    generator = torch.Generator(device=kv.device).manual_seed(seed)
    flat = kv.view(torch.int16).view(-1)
    flat.copy_(torch.randint(-(2**15), 2**15, flat.shape, generator=generator, device=kv.device))


def _decode_side(conn: Any, layout: Any) -> None:
    """The exporting process (a decode worker's role): export, then answer reads of its blocks."""
    from kvmesh.transport.cuda_ipc import ExportedKVPool

    pool, exported = ExportedKVPool.create(layout, "cuda")
    conn.send(exported)
    while (message := conn.recv()) is not None:
        kind, payload = message
        if kind == "destination":
            request_id, block_ids = payload
            conn.send(exported.destination(request_id, block_ids, "host", timeout_s=600))
        elif kind == "read":
            torch.cuda.synchronize()
            conn.send(pool.kv[:, :, list(payload)].cpu())
    del pool


def part_cuda_ipc(settings: Settings) -> dict[str, Any]:
    from kvmesh.engine.kv_cache import KVPool
    from kvmesh.transport import make_sender

    figures: dict[str, Any] = {}
    num_blocks = 64 if settings.quick else CONTEXT_TOKENS // 16
    layout = _ipc_layout(2 * num_blocks + 8, settings.quick)
    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    child = ctx.Process(target=_decode_side, args=(theirs, layout), daemon=True)
    child.start()
    try:
        ours.recv()  # the export, once
        source = KVPool(layout, "cuda")
        _random_bits_(source.kv, 7)
        sender = make_sender("cuda_ipc")

        def destination(block_ids: list[int]) -> Any:
            ours.send(("destination", ("bench", block_ids)))
            return ours.recv()

        # Correctness: scattered ids on both sides, then layer by layer.
        cases = [([5, 1, 9, 2], [60, 3, 11, 0], False), ([7, 7, 40, 2], [1, 63, 20, 50], True)]
        for src_ids, dst_ids, layerwise in cases:

            async def ready(layer: int) -> None:
                return None

            dest = destination(dst_ids)
            asyncio.run(sender.send(source, src_ids, dest, ready if layerwise else None))
            ours.send(("read", dst_ids))
            got = ours.recv()
            want = source.kv[:, :, src_ids].cpu()
            same = torch.equal(got.view(torch.int16), want.view(torch.int16))
            check(figures, f"cuda_ipc bit-exact into scattered blocks (layerwise={layerwise})", same)

        # Bandwidth: a fresh reservation's blocks, the KV of a 4k-token prompt.
        src_ids = list(range(num_blocks))
        dst_ids = list(range(num_blocks + 8, 2 * num_blocks + 8))
        dest = destination(dst_ids)
        num_bytes = num_blocks * layout.bytes_per_block
        loop = asyncio.new_event_loop()
        ipc_s = timed(settings, lambda: loop.run_until_complete(sender.send(source, src_ids, dest)), 10, 2)
        loop.close()
        src = source.kv[:, :, :num_blocks].contiguous()
        dst = torch.empty_like(src)
        copy_s = timed(settings, lambda: dst.copy_(src), 10, 2)
        figures.update(
            num_bytes=num_bytes,
            cuda_ipc_bytes_per_s=num_bytes / ipc_s,
            d2d_copy_bytes_per_s=num_bytes / copy_s,
            cuda_ipc_vs_copy=copy_s / ipc_s,
            goal_cuda_ipc_vs_copy=0.8,
        )
        sender.close()
    finally:
        ours.send(None)
        child.join(10)
        if child.is_alive():
            child.kill()
    return figures
