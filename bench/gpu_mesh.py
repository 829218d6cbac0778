"""Parts mesh_ttft and layerwise_ttft of `python -m bench.gpu`: TTFT through the four roles as processes.

The roles run as `kvmesh serve` processes on this host (kvmesh.cli.launcher.LocalMesh), the workers on the
run's device with the KV over cuda_ipc (shm on a CPU), gRPC as the fallback; TTFT is seen by the client,
request sent to first token received, with the default model and 2 new tokens.

- mesh_ttft: (1) cold: TTFT p50 of a ~1k-token prompt (a fresh first line each time, so nothing is
  cached) through the mesh against the engine in this process, request by request, alternating.
  (2) warm keystroke: after one request with a fresh ~1k-token prefix, each request adds one typed
  character to the previous prefix: a prefix-cache hit on the decode worker, which prefills the few
  new tokens itself. The same on the engine in this process, whose prefix cache holds the previous
  keystroke's prompt. TTFT p50 of both and of the difference, paired.
- layerwise_ttft: two meshes at once, the decode worker asking for layer-wise KV transfer in one
  (KVMESH_LAYERWISE_TRANSFER=1: each layer's blocks leave as soon as the last prompt chunk computed that
  layer) and not in the other (=0: the blocks leave after the whole prompt). A ~4k-token prompt with a
  fresh first line, forced through the prefill worker (KVMESH_DISAGG_MIN_TOKENS=1), goes to each mesh
  in turn (the order alternates, so the machine's noise hits both alike); TTFT p50 of each, and on/off.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch

from bench.gpu_common import CONTEXT_TOKENS, Settings, check

KEYSTROKE_PAUSE_S = 0.2
"""Untimed pause before each keystroke: a typist's pace; lets the decode worker's KV events reach the
cache store, so the gateway routes the keystroke as the cache hit it is."""


@dataclass(frozen=True)
class Reply:
    """One completion through the mesh, as the client saw it."""

    ttft_ms: float
    prompt_tokens: int
    cached_tokens: int
    prefilled_tokens: int
    transport: str
    """How the KV came from the prefill worker; empty: the decode worker prefilled the prompt itself."""
    transfer_bytes: int
    stage_ms: dict[str, float]


async def complete(stub: Any, prefix: str, new_tokens: int = 2) -> Reply:
    """One completion through the mesh (bench.mesh.timed_completion), with its usage's cache and transfer
    fields."""
    from bench.mesh import STAGES, timed_completion

    first_s, _, _, usage = await timed_completion(stub, prefix, new_tokens)
    return Reply(
        ttft_ms=first_s * 1000,
        prompt_tokens=usage.prompt_tokens,
        cached_tokens=usage.cached_tokens,
        prefilled_tokens=usage.prefilled_tokens,
        transport=usage.transport,
        transfer_bytes=usage.transfer_bytes,
        stage_ms={f: getattr(usage.stage_ms, f) for f in STAGES},
    )


def engine_ttft_ms(engine: Any, prompt: list[int]) -> float:
    """TTFT of the engine in this process: prefill (what its prefix cache does not hold) + one token."""
    started = time.perf_counter()
    engine.generate(prompt, 1, ignore_eos=True)
    return (time.perf_counter() - started) * 1000


def mesh_environ(settings: Settings, **variables: str) -> tuple[dict[str, str], str]:
    """(the roles' environment, the workers' KV transports): every role gets the same variables, each
    reads only its own options' (kvmesh.cli.options)."""
    transports = "cuda_ipc,grpc" if settings.cuda else "shm,grpc"
    environ = {**os.environ, "KVMESH_DEVICE": settings.device, "KVMESH_TRANSPORTS": transports}
    return {**environ, **variables}, transports


def typed_text(engine: Any, base: str, num_tokens: int, count: int) -> str:
    """The count characters that follow base (make_prefix's cut of num_tokens tokens) in its source: what
    a typist would type next."""
    from bench.mesh import make_prefix

    longer = make_prefix(engine, num_tokens + 4 * count + 16)
    follow = longer[len(base) :] if longer.startswith(base) else ""
    return (follow + "x" * count)[:count]


def p50(values: list[float]) -> float:
    return statistics.median(values)


# ---- mesh_ttft: a cold prompt and a warm keystroke, through the mesh and in-process --------------------


def part_mesh_ttft(settings: Settings, deadline: float) -> dict[str, Any]:
    import grpc

    from bench.mesh import make_prefix
    from gateway.layout import PromptLayout
    from kvmesh import default_model_path
    from kvmesh.cli.launcher import LocalMesh
    from kvmesh.engine.engine import Engine
    from kvmesh.v1 import gateway_pb2_grpc

    figures: dict[str, Any] = {}
    model = str(default_model_path())
    reps = 3 if settings.quick else 9
    num_keystrokes = 5 if settings.quick else 12
    prompt_tokens = 256 if settings.quick else 1024
    torch.set_num_threads(1)  # a core per role, the engine baseline too
    engine = Engine.from_pretrained(model, device=settings.device)
    layout = PromptLayout(engine.tokenizer)
    base = make_prefix(engine, prompt_tokens)
    prefixes = [f"# {i:03d}\n{base}" for i in range(reps + 1)]
    prompts = [layout.completion(p, "\n") for p in prefixes]
    # Keystrokes: a fresh first line (nothing cached from the cold requests), then one character at a time.
    typed = typed_text(engine, base, prompt_tokens, num_keystrokes)
    keys = [f"# key\n{base}{typed[:i]}" for i in range(num_keystrokes + 1)]
    key_prompts = [layout.completion(k, "\n") for k in keys]
    engine.generate(prompts[0], 2)
    environ, transports = mesh_environ(settings)

    async def run() -> tuple[list[tuple[float, Reply]], list[tuple[float, Reply]]]:
        mesh = LocalMesh(port=0, model_path=model, environ=environ, startup_timeout_s=90)
        address = await mesh.start()
        cold, warm = [], []
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                stub = gateway_pb2_grpc.GatewayStub(channel)
                await complete(stub, prefixes[0])
                for prefix, prompt in zip(prefixes[1:], prompts[1:], strict=True):
                    engine_ms = engine_ttft_ms(engine, prompt)
                    cold.append((engine_ms, await complete(stub, prefix)))
                # The first keystroke's prompt, untimed, fills both caches; each timed one then finds the
                # previous one's prompt cached, and so on.
                engine_ttft_ms(engine, key_prompts[0])
                await complete(stub, keys[0])
                for key, prompt in zip(keys[1:], key_prompts[1:], strict=True):
                    if time.monotonic() > deadline:
                        break
                    await asyncio.sleep(KEYSTROKE_PAUSE_S)
                    engine_ms = engine_ttft_ms(engine, prompt)
                    warm.append((engine_ms, await complete(stub, key)))
        finally:
            await mesh.stop()
        return cold, warm

    cold, warm = asyncio.run(run())
    figures.update(
        prompt_tokens=len(prompts[0]),
        transports=transports,
        engine_ttft_p50_ms=p50([e for e, _ in cold]),
        mesh_ttft_p50_ms=p50([m.ttft_ms for _, m in cold]),
        added_ttft_p50_ms=p50([m.ttft_ms - e for e, m in cold]),
        mesh_transports_used=sorted({m.transport for _, m in cold}),
        stage_ms=[m.stage_ms for _, m in cold],
        goal_added_ttft_p50_ms=3.0,
    )
    if warm:
        figures.update(
            warm_keystroke_prompt_tokens=warm[-1][1].prompt_tokens,
            warm_keystroke_typed=typed[: len(warm)],
            warm_keystroke_engine_ttft_p50_ms=p50([e for e, _ in warm]),
            warm_keystroke_mesh_ttft_p50_ms=p50([m.ttft_ms for _, m in warm]),
            warm_keystroke_added_ttft_p50_ms=p50([m.ttft_ms - e for e, m in warm]),
            warm_keystroke_mesh_cached_tokens=[m.cached_tokens for _, m in warm],
            warm_keystroke_mesh_prefilled_tokens=[m.prefilled_tokens for _, m in warm],
            warm_keystroke_mesh_transports=sorted({m.transport for _, m in warm}),
            warm_keystroke_stage_ms=[m.stage_ms for _, m in warm],
        )
        # A keystroke changes the prompt's last prefix token or two: all but its last partial block or two
        # must come from the decode worker's cache, and no KV may come from the prefill worker.
        hits = [m.cached_tokens >= m.prompt_tokens - 48 and not m.transport for _, m in warm]
        check(
            figures,
            "warm keystrokes are prefix-cache hits on the decode worker",
            all(hits),
            f"{sum(hits)}/{len(hits)}",
        )
    return figures


# ---- layerwise_ttft: a long prompt through the prefill worker, layer-wise transfer on and off ------------


def part_layerwise_ttft(settings: Settings, deadline: float) -> dict[str, Any]:
    import grpc

    from bench.mesh import make_prefix
    from kvmesh import default_model_path
    from kvmesh.cli.launcher import LocalMesh
    from kvmesh.engine.engine import Engine
    from kvmesh.v1 import gateway_pb2_grpc

    figures: dict[str, Any] = {}
    model = str(default_model_path())
    reps = 3 if settings.quick else 7
    # --quick: two chunks of the workers' 512 (--prefill-chunk-size), so there is a last chunk to overlap.
    num_tokens = 1024 if settings.quick else CONTEXT_TOKENS
    base = make_prefix(Engine.from_pretrained(model), num_tokens)  # the tokenizer's cut, on the CPU
    modes = {"on": "1", "off": "0"}
    environs = {}
    for mode, flag in modes.items():
        environs[mode], transports = mesh_environ(
            settings, KVMESH_LAYERWISE_TRANSFER=flag, KVMESH_DISAGG_MIN_TOKENS="1"
        )

    async def run() -> dict[str, list[Reply]]:
        meshes = {
            mode: LocalMesh(port=0, model_path=model, environ=environs[mode], startup_timeout_s=90)
            for mode in modes
        }
        replies: dict[str, list[Reply]] = {mode: [] for mode in modes}
        try:
            started = await asyncio.gather(*(m.start() for m in meshes.values()), return_exceptions=True)
            for address in started:
                if isinstance(address, BaseException):
                    raise address
            addresses = dict(zip(modes, started, strict=True))
            channels = {mode: grpc.aio.insecure_channel(addresses[mode]) for mode in modes}
            try:
                stubs = {mode: gateway_pb2_grpc.GatewayStub(channels[mode]) for mode in modes}
                number = 0
                for mode in modes:  # warm-up: channels, first forward passes, the transports' first use
                    await complete(stubs[mode], f"# {number:03d}\n{base}")
                    number += 1
                for rep in range(reps):
                    if time.monotonic() > deadline:
                        break
                    for mode in list(modes)[:: 1 if rep % 2 == 0 else -1]:
                        replies[mode].append(await complete(stubs[mode], f"# {number:03d}\n{base}"))
                        number += 1
            finally:
                await asyncio.gather(*(c.close() for c in channels.values()))
        finally:
            await asyncio.gather(*(m.stop() for m in meshes.values()))
        return replies

    replies = asyncio.run(run())
    on, off = replies["on"], replies["off"]
    figures.update(prompt_tokens=on[0].prompt_tokens if on else None, transports=transports, reps=len(on))
    for mode, rows in replies.items():
        if not rows:
            continue
        figures[f"layerwise_{mode}_ttft_p50_ms"] = p50([r.ttft_ms for r in rows])
        figures[f"layerwise_{mode}_transports_used"] = sorted({r.transport for r in rows})
        figures[f"layerwise_{mode}_stage_p50_ms"] = {
            s: p50([r.stage_ms[s] for r in rows]) for s in rows[0].stage_ms
        }
        figures[f"layerwise_{mode}_rows"] = [asdict(r) for r in rows]
    if on and off:
        figures["layerwise_on_vs_off"] = (
            figures["layerwise_on_ttft_p50_ms"] / figures["layerwise_off_ttft_p50_ms"]
        )
        figures["layerwise_saved_ttft_p50_ms"] = p50(
            [b.ttft_ms - a.ttft_ms for a, b in zip(on, off, strict=False)]
        )
    through = [r.transport in transports.split(",") and r.transfer_bytes > 0 for r in on + off]
    check(
        figures,
        "every long prompt was prefilled by the prefill worker and its KV transferred",
        bool(through) and all(through),
        f"{sum(through)}/{len(through)}",
    )
    return figures
