"""Every GPU check of issue 17 in one run of at most 8 minutes; a short table last, full figures in JSON.

    python -m bench.gpu [--out PATH] [--budget-s 450] [--parts NAME ...] [--device cuda|cpu] [--quick]

Without CUDA (and --device cuda, the default) it prints "no CUDA: nothing measured" and exits 0.
--device cpu --quick runs the parts that can run on a CPU at small shapes: a smoke test of this script.

Each part runs in its own child process under a time box (a hang or a CUDA fault costs that part only),
so a failed part is reported and the run goes on. This module is the runner; the parts live in
bench/gpu_ipc.py, bench/gpu_engine.py and bench/gpu_mesh.py (shared helpers: bench/gpu_common.py).
The parts, correctness first:

1. cuda_ipc: a second process exports its pool; blocks go into scattered destination blocks, checked
   bit for bit; then CUDA IPC bytes/s against one device-to-device copy of the same bytes (the KV of a
   4k-token prompt at Qwen2.5-Coder-7B's shape, 56 KiB per token), both in this run.
2. logits: the default model's logits on the GPU (float32, TF32 off) against the CPU engine and against
   transformers on the GPU, same weights; bfloat16 against float32 for scale.
3. speculative: a speculative edit on the GPU equals plain greedy, token for token.
4. engine_7b: random bf16 weights at Qwen2.5-Coder-7B's shape made on the device: copy bandwidth and the
   bf16 matmul rate; decode step time at batch 1 and 32 with 4k-token contexts against the floor
   (weights + KV bytes read / memory bandwidth, where bandwidth = 2 x bytes copied per second: a copy reads
   and writes each byte), on the engine's attention backend (the Triton kernel on CUDA), on SDPA, and with
   decode passes replayed as CUDA graphs; prefill tokens/s of a 4k prompt against the matmul rate (model
   FLOPs utilisation); verifying K draft tokens in one pass against a one-token step, K = 1..64; decode
   tokens/s of transformers' generate on the same weights.
5. mesh_ttft: the four roles as processes on this host (workers on the device, KV over cuda_ipc), TTFT
   p50 of a ~1k-token prompt through the mesh against the engine in this process; then a warm keystroke's
   TTFT (the previous prompt plus one typed character: a prefix-cache hit on the decode worker) through
   the mesh against the same on the engine in this process, whose prefix cache is warm too.
6. layerwise_ttft: TTFT p50 of a ~4k-token prompt forced through the prefill worker, with the decode
   worker's layer-wise KV transfer on (each layer leaves as soon as the last chunk computed it) and off,
   two meshes side by side, requests alternating; and the ratio on/off.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.gpu_common import Settings
from bench.gpu_engine import part_engine_7b, part_logits, part_speculative
from bench.gpu_ipc import part_cuda_ipc
from bench.gpu_mesh import part_layerwise_ttft, part_mesh_ttft

PARTS: dict[str, float] = {
    "cuda_ipc": 50.0,
    "logits": 40.0,
    "speculative": 40.0,
    "mesh_ttft": 90.0,
    "layerwise_ttft": 80.0,
    "engine_7b": 150.0,
}
"""Each part's time box in seconds, in running order; they add up to the default budget (450 s), and
engine_7b, last, stops its own measurements at its deadline and reports what it has."""
CPU_PARTS = ("logits", "speculative", "engine_7b", "mesh_ttft", "layerwise_ttft")
"""The parts that also run on a CPU (--device cpu)."""


# ---- the run ------------------------------------------------------------------------------------------


def run_part(name: str, settings: Settings, box_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + box_s * 0.85  # leave the part time to report what it has
    functions: dict[str, Callable[[], dict[str, Any]]] = {
        "cuda_ipc": lambda: part_cuda_ipc(settings),
        "logits": lambda: part_logits(settings),
        "speculative": lambda: part_speculative(settings),
        "engine_7b": lambda: part_engine_7b(settings, deadline),
        "mesh_ttft": lambda: part_mesh_ttft(settings, deadline),
        "layerwise_ttft": lambda: part_layerwise_ttft(settings, deadline),
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
            f" (<= 1.6; {get('attention_backend', 's')}; sdpa {get(f'sdpa_decode_b{big}_step_ms', '.2f')} ms)",
            f"CUDA graphs: b1 {get('graphs_decode_b1_step_ms', '.2f')} ms, b{big}"
            f" {get(f'graphs_decode_b{big}_step_ms', '.2f')} ms",
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
            f"{get('mesh_ttft_p50_ms', '.1f')} ms, added {get('added_ttft_p50_ms', '.1f')} ms (goal <= 3); "
            f"warm keystroke: engine {get('warm_keystroke_engine_ttft_p50_ms', '.1f')} ms, mesh "
            f"{get('warm_keystroke_mesh_ttft_p50_ms', '.1f')} ms, added "
            f"{get('warm_keystroke_added_ttft_p50_ms', '.1f')} ms"
        )
    if name == "layerwise_ttft":
        return (
            f"{get('prompt_tokens', 'd')}-token prompt via the prefill worker "
            f"({','.join(f.get('layerwise_on_transports_used', ['-']))}): "
            f"layer-wise on {get('layerwise_on_ttft_p50_ms', '.1f')} ms, off "
            f"{get('layerwise_off_ttft_p50_ms', '.1f')} ms, on/off {get('layerwise_on_vs_off', '.2f')}"
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
