"""Every GPU check of issue 17 in one run of at most 8 minutes; a short table last, full figures in JSON.

    python -m bench.gpu [--out PATH] [--budget-s 450] [--parts NAME ...] [--device cuda|cpu] [--quick]

Without CUDA (and --device cuda, the default) it prints "no CUDA: nothing measured" and exits 0.
--device cpu --quick runs the parts that can run on a CPU at small shapes: a smoke test of this script.

Each part runs in its own child process under a time box (a hang or a CUDA fault costs that part only),
so a failed part is reported and the run goes on. The parts, correctness first:

1. cuda_ipc: a second process exports its pool; blocks go into scattered destination blocks, checked
   bit for bit; then CUDA IPC bytes/s against one device-to-device copy of the same bytes (the KV of a
   4k-token prompt at Qwen2.5-Coder-7B's shape, 56 KiB per token), both in this run.
2. logits: the default model's logits on the GPU (float32, TF32 off) against the CPU engine and against
   transformers on the GPU, same weights; bfloat16 against float32 for scale.
3. speculative: a speculative edit on the GPU equals plain greedy, token for token.
4. engine_7b: random bf16 weights at Qwen2.5-Coder-7B's shape made on the device: copy bandwidth and the
   bf16 matmul rate; decode step time at batch 1 and 32 with 4k-token contexts against the floor
   (weights + KV bytes read / memory bandwidth, where bandwidth = 2 x bytes copied per second: a copy reads
   and writes each byte); prefill tokens/s of a 4k prompt against the matmul rate (model FLOPs
   utilisation); verifying K draft tokens in one pass against a one-token step, K = 1..64; decode tokens/s
   of transformers' generate on the same weights.
5. mesh_ttft: the four roles as processes on this host (workers on the device, KV over cuda_ipc), TTFT
   p50 of a ~1k-token prompt through the mesh against the engine in this process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

PARTS: dict[str, float] = {
    "cuda_ipc": 60.0,
    "logits": 50.0,
    "speculative": 50.0,
    "engine_7b": 170.0,
    "mesh_ttft": 110.0,
}
"""Each part's time box in seconds (the run's budget trims the last ones)."""
CPU_PARTS = ("logits", "speculative", "engine_7b", "mesh_ttft")
"""The parts that also run on a CPU (--device cpu)."""
CONTEXT_TOKENS = 4096
VERIFY_KS = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class Settings:
    device: str
    quick: bool

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()


def timed(settings: Settings, fn: Callable[[], object], reps: int, warmup: int = 1) -> float:
    """Median seconds of fn over reps runs, device synchronized around each."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        settings.sync()
        started = time.perf_counter()
        fn()
        settings.sync()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def check(figures: dict[str, Any], name: str, passed: bool, detail: str = "") -> None:
    figures.setdefault("checks", []).append({"name": name, "passed": bool(passed), "detail": detail})


# ---- 1. CUDA IPC --------------------------------------------------------------------------------------


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


# ---- 2. logits, 3. speculative edits -------------------------------------------------------------------


def part_logits(settings: Settings) -> dict[str, Any]:
    from kvmesh import default_model_path
    from kvmesh.engine.engine import Engine

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    figures: dict[str, Any] = {}
    path = default_model_path()
    cpu = Engine.from_pretrained(path)
    ids = cpu.tokenizer.encode(Path(json.__file__).read_text())[: 128 if settings.quick else 512]
    reference = cpu.logits(ids)
    device = Engine.from_pretrained(path, device=settings.device)
    ours = device.logits(ids).float().cpu()
    figures["max_abs_diff_vs_cpu"] = (ours - reference).abs().max().item()
    check(figures, "device float32 logits == CPU engine (atol 1e-3)", figures["max_abs_diff_vs_cpu"] < 1e-3)
    import transformers

    transformers.logging.set_verbosity_error()
    hf = (
        transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        .to(settings.device)
        .eval()
    )
    with torch.inference_mode():
        theirs = hf(input_ids=torch.tensor([ids], device=settings.device)).logits[0].float().cpu()
    figures["max_abs_diff_vs_transformers"] = (ours - theirs).abs().max().item()
    check(
        figures,
        "device float32 logits == transformers (atol 1e-3)",
        figures["max_abs_diff_vs_transformers"] < 1e-3,
    )
    if settings.device.startswith("cuda"):
        half = Engine.from_pretrained(path, dtype="bfloat16", device=settings.device)
        bf16 = half.logits(ids).float().cpu()
        figures["bf16_max_abs_diff_vs_fp32"] = (bf16 - ours).abs().max().item()
        figures["bf16_argmax_agreement"] = (bf16.argmax(-1) == ours.argmax(-1)).float().mean().item()
    return figures


EDIT_ORIGINAL = '''\
def parse_header(line):
    """Split a header line into its main value and a dict of parameters."""
    parts = line.split(";")
    key = parts[0].strip().lower()
    params = {}
    for part in parts[1:]:
        if "=" not in part:
            continue
        name, value = part.split("=", 1)
        params[name.strip().lower()] = value.strip()
    return key, params
'''


def part_speculative(settings: Settings) -> dict[str, Any]:
    from gateway.layout import PromptLayout
    from kvmesh import default_model_path
    from kvmesh.engine.engine import Engine
    from kvmesh.engine.generate import generate_speculative
    from kvmesh.engine.speculative import DraftCursor

    figures: dict[str, Any] = {}
    engine = Engine.from_pretrained(default_model_path(), device=settings.device)
    snippet = "        params[name.strip().lower()] = value.strip().strip('\"')\n"
    prompt = PromptLayout(engine.tokenizer).edit(EDIT_ORIGINAL, snippet)
    max_tokens = 40 if settings.quick else 300
    engine.generate(prompt.token_ids, 2)  # warm-up
    started = time.perf_counter()
    plain = engine.generate(prompt.token_ids, max_tokens)
    plain_s = time.perf_counter() - started
    started = time.perf_counter()
    cursor = DraftCursor.for_edit(prompt.draft_token_ids, prompt.token_ids)
    speculative, stats = generate_speculative(engine, prompt.token_ids, cursor, max_tokens)
    spec_s = time.perf_counter() - started
    figures.update(
        num_tokens=len(plain),
        plain_s=plain_s,
        speculative_s=spec_s,
        accepted_prediction_tokens=stats.accepted_prediction_tokens,
        rejected_prediction_tokens=stats.rejected_prediction_tokens,
    )
    check(figures, "speculative edit == plain greedy", speculative == plain, f"{len(plain)} tokens")
    return figures


# ---- 4. the engine at Qwen2.5-Coder-7B's shape --------------------------------------------------------


def model_config(quick: bool) -> Any:
    from kvmesh.engine.model_config import ModelConfig, RopeConfig

    config = ModelConfig(
        architecture="qwen2",
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        head_dim=128,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope=RopeConfig(theta=1_000_000.0),
        attention_bias=True,
        o_proj_bias=False,
        tie_word_embeddings=False,
        sliding_window=None,
        bos_token_id=None,
        eos_token_ids=(151643,),
    )
    if quick:
        small = {"vocab_size": 4096, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2}
        config = replace(config, **small, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    return config


def random_model(config: Any, dtype: torch.dtype, device: str, seed: int = 0) -> Any:
    """The model with random weights made on the device (no checkpoint, nothing on the host)."""
    from kvmesh.engine.loader import build_model

    with torch.device("meta"):
        model = build_model(config)
    generator = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for name, param in model.named_parameters():
        keep = name.endswith(model.keep_float32) if model.keep_float32 else False
        tensor = torch.empty(param.shape, dtype=torch.float32 if keep else dtype, device=device)
        if "norm" in name:
            tensor.fill_(1.0)
        else:
            tensor.normal_(0.0, 0.02, generator=generator)
        state[name] = tensor
    model.load_state_dict(state, strict=False, assign=True)
    model.rotary = model.make_rotary()
    return model.to(device).eval()


def machine_limits(settings: Settings, dtype: torch.dtype, reps: int) -> tuple[float, float]:
    """(bytes copied per second device to device, dtype matmul FLOP/s), measured now."""
    num_elements = (64 << 20 if settings.quick else 1 << 30) // 2
    src = torch.empty(num_elements, dtype=torch.bfloat16, device=settings.device)
    dst = torch.empty_like(src)
    copy_s = timed(settings, lambda: dst.copy_(src), reps, 2)
    n = 1024 if settings.quick else 8192
    x = torch.randn(n, n, dtype=dtype, device=settings.device)
    matmul_s = timed(settings, lambda: x @ x, reps, 2)
    return num_elements * 2 / copy_s, 2 * n**3 / matmul_s


def part_engine_7b(settings: Settings, deadline: float) -> dict[str, Any]:
    from kvmesh import default_model_path
    from kvmesh.engine.config import EngineConfig
    from kvmesh.engine.engine import Engine
    from kvmesh.engine.tokenizer import Tokenizer

    figures: dict[str, Any] = {}
    device, quick = settings.device, settings.quick
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    context = 256 if quick else CONTEXT_TOKENS
    batch_sizes = (1, 4) if quick else (1, 32)
    reps = 3 if quick else 10

    copy_bytes_per_s, matmul_flops = machine_limits(settings, dtype, reps)
    figures.update(copy_bytes_per_s=copy_bytes_per_s, memory_bytes_per_s=2 * copy_bytes_per_s)
    figures.update(matmul_flops_per_s=matmul_flops, matmul_dtype=str(dtype))

    config = model_config(quick)
    model = random_model(config, dtype, device)
    params = dict(model.named_parameters())
    num_params = sum(p.numel() for p in params.values())
    embed = params["model.embed_tokens.weight"]
    weight_bytes = (
        sum(p.numel() * p.element_size() for p in params.values()) - embed.numel() * embed.element_size()
    )
    tokenizer = Tokenizer.from_file(default_model_path() / "tokenizer.json")
    num_tokens = max(batch_sizes) * (context + 80) + 2 * context
    engine_config = EngineConfig(
        block_size=16,
        num_blocks=num_tokens // 16 + 64,
        prefill_chunk_size=context,
        max_num_batched_tokens=context,
        max_num_seqs=max(batch_sizes),
        enable_prefix_caching=False,
    )
    engine = Engine(model, tokenizer, engine_config, model_fingerprint="bench-7b")
    engine.pool.kv.normal_(0.0, 1.0)  # KV the steps attend over; its values do not change the cost
    kv_per_token = engine.kv_bytes_per_token
    figures.update(
        model=f"qwen2 {config.num_hidden_layers}L hidden {config.hidden_size}",
        num_params=num_params,
        weight_bytes_read_per_step=weight_bytes,
        kv_bytes_per_token=kv_per_token,
    )
    generator = torch.Generator().manual_seed(0)

    def ids(count: int) -> list[int]:
        return torch.randint(16, config.vocab_size, (count,), generator=generator).tolist()

    # Decode steps over 4k-token contexts: the contexts' KV is taken as computed (the pool holds random
    # values), so only the step is timed, not a prefill of 32 x 4k tokens.
    for batch in batch_sizes:
        if time.monotonic() > deadline:
            break
        seqs = []
        for _ in range(batch):
            seq = engine.add_sequence(ids(context + 1), use_prefix_cache=False)
            engine.reserve(seq, context + 64)
            seq.num_computed_tokens = context
            seqs.append(seq)

        def step(seqs: list = seqs) -> None:
            engine.step(seqs)
            for seq in seqs:
                seq.token_ids.append(17)

        step_s = timed(settings, step, reps, 3)
        floor_s = (weight_bytes + batch * context * kv_per_token) / (2 * copy_bytes_per_s)
        figures[f"decode_b{batch}_step_ms"] = step_s * 1000
        figures[f"decode_b{batch}_floor_ms"] = floor_s * 1000
        figures[f"decode_b{batch}_vs_floor"] = step_s / floor_s
        for seq in seqs:
            engine.free(seq)
    figures["goal_decode_b1_vs_floor"], figures["goal_decode_b32_vs_floor"] = 1.3, 1.6

    # Prefill of a 4k-token prompt, against the matmul rate.
    if time.monotonic() < deadline:
        prompt = ids(context)

        def prefill() -> None:
            seq = engine.add_sequence(prompt, use_prefix_cache=False)
            try:
                engine.prefill(seq)
            finally:
                engine.free(seq)

        prefill_s = timed(settings, prefill, 2 if quick else 3, 1)
        attention_flops = (
            2.0 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * context**2
        )
        flops = 2.0 * (num_params - embed.numel()) * context + attention_flops
        figures.update(
            prefill_tokens=context,
            prefill_tokens_per_s=context / prefill_s,
            prefill_flops_per_s=flops / prefill_s,
            prefill_vs_matmul=flops / prefill_s / matmul_flops,
            goal_prefill_vs_matmul=0.5,
        )

    # Verifying K draft tokens in one pass, against a one-token step, at a 4k context.
    if time.monotonic() < deadline:
        seq = engine.add_sequence(ids(context + 1), use_prefix_cache=False)
        engine.reserve(seq, context + 1 + max(VERIFY_KS))
        seq.num_computed_tokens = context
        del seq.token_ids[context:]
        verify: dict[str, float] = {}
        for k in VERIFY_KS:

            def verify_pass(k: int = k) -> None:
                seq.token_ids.extend([17] * k)
                engine.step([seq], all_logits=True)
                engine.truncate(seq, context)

            verify[str(k)] = timed(settings, verify_pass, reps, 2) * 1000
        engine.free(seq)
        figures["verify_ms_by_k"] = verify
        figures["verify_cost_vs_one_token_by_k"] = {k: ms / verify["1"] for k, ms in verify.items()}

    # transformers' generate on the same weights, and ours, decode tokens/s at batch 1.
    if time.monotonic() < deadline:
        figures.update(_versus_transformers(settings, engine, model, config, ids(128)))
    return figures


def _versus_transformers(settings: Settings, engine: Any, model: Any, config: Any, prompt: list[int]) -> dict:
    import transformers

    transformers.logging.set_verbosity_error()
    hf_config = transformers.Qwen2Config(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope.theta,
        tie_word_embeddings=False,
    )
    dtype = next(model.parameters()).dtype
    with torch.device(settings.device):
        hf = transformers.Qwen2ForCausalLM(hf_config).to(dtype).eval()
    missing, unexpected = hf.load_state_dict(dict(model.named_parameters()), strict=False, assign=True)
    if [m for m in missing if "rotary" not in m] or unexpected:
        raise RuntimeError(
            f"weights do not map onto transformers: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    new_tokens = 16 if settings.quick else 64
    input_ids = torch.tensor([prompt], device=settings.device)

    def theirs(n: int) -> None:
        with torch.inference_mode():
            hf.generate(input_ids=input_ids, do_sample=False, max_new_tokens=n, min_new_tokens=n)

    def ours(n: int) -> None:
        engine.generate(prompt, n, ignore_eos=True)

    rates = {}
    for name, run in (("ours", ours), ("transformers", theirs)):
        full = timed(settings, lambda run=run: run(new_tokens), 2, 1)
        first = timed(settings, lambda run=run: run(1), 2, 1)
        rates[name] = (new_tokens - 1) / max(full - first, 1e-9)
    return {
        "decode_b1_tokens_per_s": rates["ours"],
        "transformers_decode_b1_tokens_per_s": rates["transformers"],
        "decode_b1_vs_transformers": rates["ours"] / rates["transformers"],
        "goal_decode_b1_vs_transformers": 1.5,
    }


# ---- 5. the mesh's TTFT -------------------------------------------------------------------------------


def part_mesh_ttft(settings: Settings) -> dict[str, Any]:
    import grpc

    from bench.mesh import engine_request, make_prefix, mesh_request
    from gateway.layout import PromptLayout
    from kvmesh import default_model_path
    from kvmesh.cli.launcher import LocalMesh
    from kvmesh.engine.engine import Engine
    from kvmesh.v1 import gateway_pb2_grpc

    figures: dict[str, Any] = {}
    model = str(default_model_path())
    cuda = settings.device.startswith("cuda")
    transports = "cuda_ipc,grpc" if cuda else "shm,grpc"
    reps = 3 if settings.quick else 9
    torch.set_num_threads(1)  # a core per role, the engine baseline too
    engine = Engine.from_pretrained(model, device=settings.device)
    base = make_prefix(engine, 256 if settings.quick else 1024)
    prefixes = [f"# {i:03d}\n{base}" for i in range(reps + 1)]
    layout = PromptLayout(engine.tokenizer)
    prompts = [layout.completion(p, "\n") for p in prefixes]
    engine.generate(prompts[0], 2)
    environ = {**os.environ, "KVMESH_DEVICE": settings.device, "KVMESH_TRANSPORTS": transports}

    async def run() -> list[tuple[float, float, str]]:
        mesh = LocalMesh(port=0, model_path=model, environ=environ, startup_timeout_s=90)
        address = await mesh.start()
        rows = []
        try:
            async with grpc.aio.insecure_channel(address) as channel:
                stub = gateway_pb2_grpc.GatewayStub(channel)
                await mesh_request(stub, prefixes[0], 2)
                for prefix, prompt in zip(prefixes[1:], prompts[1:], strict=True):
                    engine_ttft, _ = engine_request(engine, prompt, 2)
                    mesh_ttft, _, stages = await mesh_request(stub, prefix, 2)
                    rows.append((engine_ttft, mesh_ttft, json.dumps(stages)))
        finally:
            await mesh.stop()
        return rows

    rows = asyncio.run(run())
    added = [m - e for e, m, _ in rows]
    figures.update(
        prompt_tokens=len(prompts[0]),
        transports=transports,
        engine_ttft_p50_ms=statistics.median(e for e, _, _ in rows),
        mesh_ttft_p50_ms=statistics.median(m for _, m, _ in rows),
        added_ttft_p50_ms=statistics.median(added),
        stage_ms=[json.loads(s) for _, _, s in rows],
        goal_added_ttft_p50_ms=3.0,
    )
    return figures


# ---- the run ------------------------------------------------------------------------------------------


def run_part(name: str, settings: Settings, box_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + box_s * 0.85  # leave the part time to report what it has
    functions: dict[str, Callable[[], dict[str, Any]]] = {
        "cuda_ipc": lambda: part_cuda_ipc(settings),
        "logits": lambda: part_logits(settings),
        "speculative": lambda: part_speculative(settings),
        "engine_7b": lambda: part_engine_7b(settings, deadline),
        "mesh_ttft": lambda: part_mesh_ttft(settings),
    }
    return functions[name]()


def child_main(name: str, settings: Settings, box_s: float, out: Path) -> None:
    started = time.perf_counter()
    try:
        result = {"status": "ok", "figures": run_part(name, settings, box_s)}
        failed = [c["name"] for c in result["figures"].get("checks", []) if not c["passed"]]
        if failed:
            result["status"] = "FAILED: " + "; ".join(failed)
    except Exception as error:  # noqa: BLE001 (a part's failure is reported, the run goes on)
        result = {"status": f"error: {type(error).__name__}: {error}", "traceback": traceback.format_exc()}
    result["seconds"] = time.perf_counter() - started
    out.write_text(json.dumps(result, default=str))


def spawn_part(name: str, settings: Settings, box_s: float) -> dict[str, Any]:
    """Run one part in a child process, killed at its time box."""
    with tempfile.TemporaryDirectory(prefix="kvmesh-gpu-bench-") as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, "-m", "bench.gpu", "--child", name, "--child-out", str(out)]
        command += ["--device", settings.device, "--box-s", str(box_s)] + (
            ["--quick"] if settings.quick else []
        )
        started = time.perf_counter()
        try:
            done = subprocess.run(command, timeout=box_s, capture_output=True, text=True)
        except subprocess.TimeoutExpired as expired:
            tail = (expired.stderr or b"")[-2000:]
            tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
            return {"status": f"timed out after {box_s:.0f} s", "seconds": box_s, "stderr_tail": tail}
        if out.is_file():
            result = json.loads(out.read_text())
        else:
            result = {"status": f"died (exit {done.returncode})", "seconds": time.perf_counter() - started}
        if done.returncode != 0 or result["status"] != "ok":
            result["stderr_tail"] = done.stderr[-2000:]
        return result


def headline(name: str, result: dict[str, Any]) -> str:
    f = result.get("figures", {})
    gb = 1e9

    def get(key: str, fmt: str) -> str:
        return format(f[key], fmt) if key in f else "-"

    if name == "cuda_ipc":
        return (
            f"IPC {get('cuda_ipc_bytes_per_s', '.3g')} B/s vs copy {get('d2d_copy_bytes_per_s', '.3g')} B/s "
            f"= {get('cuda_ipc_vs_copy', '.2f')} (goal >= 0.8)"
        )
    if name == "logits":
        return f"max abs diff vs CPU {get('max_abs_diff_vs_cpu', '.2e')}, vs transformers {get('max_abs_diff_vs_transformers', '.2e')}"
    if name == "speculative":
        return f"{get('num_tokens', 'd')} tokens, {get('accepted_prediction_tokens', 'd')} accepted; {get('plain_s', '.2f')} s plain vs {get('speculative_s', '.2f')} s"
    if name == "engine_7b":
        verify = f.get("verify_cost_vs_one_token_by_k", {})
        big = max(
            (int(k[8:-8]) for k in f if k.startswith("decode_b") and k.endswith("_step_ms")), default=32
        )
        parts = [
            f"b1 {get('decode_b1_step_ms', '.2f')} ms = {get('decode_b1_vs_floor', '.2f')}x floor (<= 1.3)",
            f"b{big} {get(f'decode_b{big}_step_ms', '.2f')} ms = {get(f'decode_b{big}_vs_floor', '.2f')}x floor"
            " (<= 1.6)",
            f"prefill {get('prefill_tokens_per_s', ',.0f')} tok/s = {get('prefill_vs_matmul', '.2f')} of matmul"
            " (>= 0.5)",
            f"verify K=16/64: {verify.get('16', float('nan')):.2f}x/{verify.get('64', float('nan')):.2f}x",
            f"vs transformers {get('decode_b1_vs_transformers', '.2f')}x (>= 1.5)",
            f"copy {float(f.get('copy_bytes_per_s', 0)) / gb:.0f} GB/s, "
            f"matmul {float(f.get('matmul_flops_per_s', 0)) / 1e12:.0f} TFLOP/s",
        ]
        return "; ".join(parts)
    if name == "mesh_ttft":
        return (
            f"{get('prompt_tokens', 'd')}-token prompt: engine {get('engine_ttft_p50_ms', '.1f')} ms, mesh "
            f"{get('mesh_ttft_p50_ms', '.1f')} ms, added {get('added_ttft_p50_ms', '.1f')} ms (goal <= 3)"
        )
    return ""


def machine(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--out", default=None, help="JSON file (default: $OUT/gpu_bench.json, else ./gpu_bench.json)"
    )
    parser.add_argument("--budget-s", type=float, default=450.0, help="the whole run's time, seconds")
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    parser.add_argument("--device", default="cuda", help='"cuda" (default) or "cpu" (a smoke run)')
    parser.add_argument("--quick", action="store_true", help="small shapes and few repeats")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    parser.add_argument("--box-s", type=float, default=60.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    settings = Settings(args.device, args.quick)
    if args.child:
        child_main(args.child, settings, args.box_s, Path(args.child_out))
        return
    out = Path(args.out or os.path.join(os.environ.get("OUT", "."), "gpu_bench.json"))
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        print("no CUDA: nothing measured (run with --device cpu --quick for a smoke run on the CPU)")
        out.write_text(json.dumps({"cuda": False, "machine": machine("cpu"), "parts": {}}, indent=2))
        return
    parts = [p for p in args.parts if cuda or p in CPU_PARTS]
    run_started = time.monotonic()
    results: dict[str, Any] = {}
    for name in parts:
        left = args.budget_s - (time.monotonic() - run_started)
        box = min(PARTS[name], left)
        if box < 10:
            results[name] = {"status": "skipped: the run's budget is spent", "seconds": 0.0}
            continue
        print(f"[bench.gpu] {name} (time box {box:.0f} s) ...", file=sys.stderr, flush=True)
        results[name] = spawn_part(name, settings, box)
        print(f"[bench.gpu] {name}: {results[name]['status']}", file=sys.stderr, flush=True)
        out.write_text(json.dumps({"machine": machine(args.device), "parts": results}, indent=2, default=str))
    total = time.monotonic() - run_started
    report = {
        "machine": machine(args.device),
        "command": " ".join(sys.argv),
        "seconds": total,
        "parts": results,
    }
    out.write_text(json.dumps(report, indent=2, default=str))
    print(
        f"\n## bench.gpu on {report['machine'].get('gpu', args.device)} ({total:.0f} s; figures in {out})\n"
    )
    print("| part | status | s | figures |")
    print("|---|---|---:|---|")
    for name, result in results.items():
        status = result["status"].replace("|", "/")[:80]
        print(f"| {name} | {status} | {result.get('seconds', 0):.0f} | {headline(name, result)} |")


if __name__ == "__main__":
    main()
