"""The Triton paged-attention kernel against `attention.paged_attention`, on random inputs.

On the CPU the kernel runs in Triton's interpreter, in a subprocess: TRITON_INTERPRET=1 must be set before
triton itself is imported (triton.language's own @jit helpers, tl.zeros and the like, are decorated then)
and the interpreter writes into the kernel module's globals, so it cannot be switched on for some tests of
one process only. `interpreted_results` runs this file as a script once, with the variable set in the
child's environment alone, over every case of INTERPRETED; each test then checks its case's result.
One case by hand: `TRITON_INTERPRET=1 python -m tests.engine.test_triton_attention out.json mixed-gqa4`.
test_triton_mla runs its own child the same way (`run_interpreted_child`, `_patch_interpreter`).

The `gpu` tests run the compiled kernel on CUDA in this process.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from kvmesh.engine.attention import build_attention_batch, paged_attention
from kvmesh.engine.triton_attention import triton_available, triton_paged_attention

ROOT = Path(__file__).resolve().parents[2]
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton is not installed")


@dataclass(frozen=True)
class Case:
    num_cached: tuple[int, ...]
    num_new: tuple[int, ...]
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    block_size: int = 16
    sliding_window: int | None = None
    dtype: torch.dtype = torch.float32
    tolerance: float = 1e-4
    """Largest absolute error allowed against paged_attention in float32 on the same inputs."""


MIXED = Case(num_cached=(40, 15, 0, 20, 30, 16, 3), num_new=(1, 1, 5, 17, 70, 1, 9))
"""Decodes (at and across block boundaries), short verifications and a 70-token chunk on 30 cached."""
UNEVEN = Case(num_cached=(33, 0, 12), num_new=(1, 20, 6), num_heads=8)
LONG_CONTEXT = Case(num_cached=(40, 130, 7), num_new=(1, 3, 40), num_kv_heads=1)
DECODES = Case(num_cached=(0, 15, 16, 47, 100), num_new=(1,) * 5)

INTERPRETED = {
    "mixed-mha": replace(MIXED, num_heads=4, num_kv_heads=4),
    "mixed-gqa4": replace(MIXED, num_heads=8, num_kv_heads=2),
    "mixed-gqa8": replace(MIXED, num_heads=16, num_kv_heads=2),
    "mixed-mqa8": replace(MIXED, num_heads=8, num_kv_heads=1),
    "mixed-gqa3": replace(MIXED, num_heads=6, num_kv_heads=2),  # a group that is not a power of two
    # Groups of 72 and 128: over 64 rows, so each kv head's group is split over two programs.
    "split-group-72": replace(UNEVEN, num_heads=144, num_kv_heads=2, head_dim=32),
    "split-group-128": replace(DECODES, num_heads=128, num_kv_heads=1, head_dim=32),
    "head-dim-80": replace(UNEVEN, head_dim=80),
    "head-dim-96": replace(UNEVEN, head_dim=96),
    "head-dim-192": replace(UNEVEN, head_dim=192),
    "window-1": replace(MIXED, num_heads=8, sliding_window=1),
    "window-7": replace(MIXED, num_heads=8, sliding_window=7),
    "window-20": replace(MIXED, num_heads=8, sliding_window=20),
    "block-4": replace(LONG_CONTEXT, block_size=4),
    "block-32": replace(LONG_CONTEXT, block_size=32),
    "block-128": replace(LONG_CONTEXT, block_size=128),
    "decodes-mha": replace(DECODES, num_heads=4, num_kv_heads=4),
    "decodes-mqa8": replace(DECODES, num_heads=8, num_kv_heads=1),
    "bfloat16": replace(MIXED, num_heads=8, head_dim=96, dtype=torch.bfloat16, tolerance=2e-2),
    "float16": replace(MIXED, num_heads=8, head_dim=96, dtype=torch.float16, tolerance=5e-3),
}


@dataclass
class Inputs:
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    kv: torch.Tensor
    """[layers, 2, num_blocks, block_size, kv heads, head dim]: the pool; attention uses layer 1."""
    tables: list[list[int]]


def make_inputs(case: Case, device: str = "cpu", seed: int = 0) -> Inputs:
    """Random q/k/v and pool in case.dtype, each sequence's blocks scattered over the pool at random."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [-(-(c + n) // case.block_size) for c, n in zip(case.num_cached, case.num_new, strict=True)]
    num_blocks = sum(sizes) + 7
    ids = random.Random(seed).sample(range(num_blocks), sum(sizes))
    tables = [ids[sum(sizes[:b]) : sum(sizes[: b + 1])] for b in range(len(sizes))]
    num_tokens, heads, kv_heads, dim = sum(case.num_new), case.num_heads, case.num_kv_heads, case.head_dim

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=case.dtype)

    # NOTE: q is a view into a fused qkv-like buffer, so its rows are not contiguous.
    qkv = rand(num_tokens, heads + 2 * kv_heads, dim)
    return Inputs(
        q=qkv[:, :heads],
        k=qkv[:, heads : heads + kv_heads],
        v=qkv[:, heads + kv_heads :],
        kv=rand(2, 2, num_blocks, case.block_size, kv_heads, dim),
        tables=tables,
    )


def _args(case: Case, inputs: Inputs) -> tuple:
    """(block_tables, num_cached, num_new, block_size, sliding_window, device) for both builders."""
    return (
        inputs.tables,
        list(case.num_cached),
        list(case.num_new),
        case.block_size,
        case.sliding_window,
        inputs.q.device,
    )


def reference(case: Case, inputs: Inputs, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """paged_attention in `dtype`, on a copy of the pool."""
    batch, _ = build_attention_batch(*_args(case, inputs))
    kv = inputs.kv.to(dtype, copy=True)
    q, k, v = (t.to(dtype) for t in (inputs.q, inputs.k, inputs.v))
    return paged_attention(q, k, v, kv[1, 0], kv[1, 1], batch, case.head_dim**-0.5)


def run_kernel(case: Case, inputs: Inputs) -> torch.Tensor:
    """Write the new K/V into the pool as paged_attention does, then run the kernel into a NaN-filled out."""
    batch, _ = build_attention_batch(*_args(case, inputs))
    k_cache, v_cache = inputs.kv[1, 0], inputs.kv[1, 1]
    flat = (-1, case.num_kv_heads, case.head_dim)
    k_cache.view(flat).index_copy_(0, batch.slot_mapping, inputs.k)
    v_cache.view(flat).index_copy_(0, batch.slot_mapping, inputs.v)
    meta = build_attention_batch(*_args(case, inputs), "triton")[0].paged
    out = torch.full_like(inputs.q, float("nan"))
    result = triton_paged_attention(inputs.q, k_cache, v_cache, meta, case.head_dim**-0.5, out=out)
    assert result is out and out.dtype == case.dtype
    return out


def max_error(case: Case, inputs: Inputs) -> float:
    """Largest absolute difference from paged_attention in float32; inf when a row was left unwritten."""
    expected = reference(case, inputs)
    out = run_kernel(case, inputs).float()
    return float("inf") if out.isnan().any() else (out - expected).abs().max().item()


def run_interpreted_child(
    module: str, output: Path, names: list[str], timeout: float = 240
) -> dict[str, dict]:
    """`python -m module output *names` with TRITON_INTERPRET=1 in the child's environment alone; the
    results it wrote to output (name -> result). The module's `__main__` patches the interpreter
    (`_patch_interpreter`) and writes one result per name."""
    result = subprocess.run(
        [sys.executable, "-m", module, str(output), *names],
        cwd=ROOT,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0 and output.exists(), result.stdout + result.stderr
    return json.loads(output.read_text())


@pytest.fixture(scope="module")
def interpreted_results(tmp_path_factory) -> dict[str, dict]:
    """Every INTERPRETED case run once in a child process under TRITON_INTERPRET=1: name -> result."""
    output = tmp_path_factory.mktemp("interpreted") / "results.json"
    return run_interpreted_child("tests.engine.test_triton_attention", output, list(INTERPRETED))


@needs_triton
@pytest.mark.parametrize("name", INTERPRETED)
def test_interpreted_kernel_matches_paged_attention(interpreted_results, name):
    result = interpreted_results[name]
    assert "error" not in result, result.get("error")
    assert result["max_error"] <= INTERPRETED[name].tolerance, f"{name}: {result} (inf: a row left unwritten)"


def test_metadata_rows_and_padding():
    batch, _ = build_attention_batch(
        [[5, 2], [7], [1, 3, 4]], [17, 0, 30], [3, 9, 1], 16, None, "cpu", "triton"
    )
    meta = batch.paged
    assert batch.groups == () and meta is not None
    assert meta.block_tables.dtype == torch.int32
    assert meta.block_tables.tolist() == [[5, 2, 0], [7, 0, 0], [1, 3, 4]]
    assert meta.query_start.tolist() == [0, 3, 12]
    assert meta.num_cached.tolist() == [17, 0, 30] and meta.num_new.tolist() == [3, 9, 1]
    assert meta.max_num_new == 9


GPU_MIXED = Case(
    num_cached=(*range(100, 2100, 100), 300, 1000, 512),
    num_new=((1,) * 20) + (17, 64, 1024),
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    dtype=torch.bfloat16,
    tolerance=2e-2,
)
"""20 decodes over 100..2000 tokens, a 17- and a 64-token verification, a 1024-token chunk on 512."""


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize(
    "case",
    [
        GPU_MIXED,
        replace(GPU_MIXED, sliding_window=256),
        replace(GPU_MIXED, num_heads=28, num_kv_heads=4, head_dim=80),
        replace(GPU_MIXED, num_heads=16, num_kv_heads=1, head_dim=256),
        replace(GPU_MIXED, dtype=torch.float16, tolerance=5e-3),
        replace(GPU_MIXED, num_heads=8, num_kv_heads=2, dtype=torch.float32, tolerance=1e-4),
    ],
    ids=["bf16-gqa4-128", "bf16-window", "bf16-gqa7-80", "bf16-mqa-256", "fp16", "fp32"],
)
def test_cuda_kernel_matches_paged_attention(case):
    inputs = make_inputs(case, device="cuda")
    assert max_error(case, inputs) <= case.tolerance


def _patch_interpreter() -> None:
    """Two gaps of triton 3.6's interpreter that the kernel runs into, closed in the child process only."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter

    # NOTE: a scalar is a 1-element array there, and a loop bound becomes int(array), which numpy >= 2.4
    # refuses (triton-lang/triton#9171, fixed upstream by #9172).
    patch_tensor = interpreter._patch_lang_tensor

    def patch_lang_tensor(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch_lang_tensor

    # NOTE: bfloat16 is stored as its uint16 bits there, and tl.dot multiplies the bits
    # (triton-lang/triton#11584): widen bf16 operands to float32 first. The kernel only loads, casts
    # and dots bf16 values (its arithmetic is float32), so this is all it needs.
    create_dot = interpreter.InterpreterBuilder.create_dot

    def widen(handle):
        if handle.dtype != tl.bfloat16:
            return handle
        return interpreter.TensorHandle((handle.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    def create_dot_widened(self, a, b, *rest):
        return create_dot(self, widen(a), widen(b), *rest)

    interpreter.InterpreterBuilder.create_dot = create_dot_widened


def write_case_results(output: str, names: list[str], cases: dict, max_error_of: Callable) -> None:
    """A child's body: patch the interpreter, then each named case's max error (or its traceback) into output."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    _patch_interpreter()
    results = {}
    for name in names:
        case, seed = cases[name], list(cases).index(name)
        try:
            results[name] = {"max_error": max_error_of(case, seed)}
        except Exception:
            results[name] = {"error": traceback.format_exc()}
    Path(output).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    write_case_results(
        sys.argv[1],
        sys.argv[2:],
        INTERPRETED,
        lambda case, seed: max_error(case, make_inputs(case, seed=seed)),
    )
