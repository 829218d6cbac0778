"""The Triton paged-attention kernel against `attention.paged_attention`, on random inputs.

On the CPU the kernel runs in Triton's interpreter, in a subprocess: TRITON_INTERPRET=1 must be set before
triton itself is imported (triton.language's own @jit helpers, tl.zeros and the like, are decorated then)
and the interpreter writes into the kernel module's globals, so it cannot be switched on for some tests of
one process only. `interpreted_results` runs this file as a script once, with the variable set in the
child's environment alone, over every case of INTERPRETED; each test then checks its case's result.
One case by hand: `TRITON_INTERPRET=1 python -m tests.engine.test_triton_attention out.json mixed-gqa4`.

The `gpu` tests run the compiled kernel on CUDA in this process.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import traceback
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from kvmesh.engine.attention import build_attention_batch, paged_attention
from kvmesh.engine.triton_attention import build_paged_metadata, triton_available, triton_paged_attention

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
    meta = build_paged_metadata(*_args(case, inputs))
    out = torch.full_like(inputs.q, float("nan"))
    result = triton_paged_attention(inputs.q, k_cache, v_cache, meta, case.head_dim**-0.5, out=out)
    assert result is out and out.dtype == case.dtype
    return out


def max_error(case: Case, inputs: Inputs) -> float:
    """Largest absolute difference from paged_attention in float32; inf when a row was left unwritten."""
    expected = reference(case, inputs)
    out = run_kernel(case, inputs).float()
    return float("inf") if out.isnan().any() else (out - expected).abs().max().item()


def engine_checks() -> dict[str, dict]:
    """The engine with attention_backend "triton" against "sdpa" on the same tiny random model: a batch of
    prompts generated greedily (prompt chunks, decodes and the two mixed in passes), one prompt's logits,
    and a speculative edit (drafts verified many tokens a pass). Run in the interpreter's child."""
    from kvmesh.engine.cuda_graphs import DecodeGraphs
    from kvmesh.engine.generate import generate_speculative
    from tests.factories import make_engine, random_ids

    options = {"max_num_batched_tokens": 24, "prefill_chunk_size": 16}
    sdpa = make_engine(attention_backend="sdpa", **options)
    kernel = make_engine(attention_backend="triton", **options)
    assert kernel.attention_backend == "triton" and sdpa.attention_backend == "sdpa"
    prompts = [random_ids(n, seed=seed) for seed, n in enumerate((5, 23, 41, 2), start=1)]
    expected = sdpa.generate_batch(prompts, 8, ignore_eos=True)
    generated = kernel.generate_batch(prompts, 8, ignore_eos=True)
    logits_error = (kernel.logits(prompts[2]) - sdpa.logits(prompts[2])).abs().max().item()
    draft = expected[1][:3] + [7, 9] + expected[1][5:]  # two wrong tokens: a rejection, then a resumption
    edited, stats = generate_speculative(kernel, prompts[1], draft, 8, ignore_eos=True)
    # Decode passes on static buffers (what a CUDA graph replays), without the capture: 3 and 5 sequences run
    # padded to the sizes 4 and 8, the padding rows on a scratch block.
    buffered = make_engine(attention_backend="triton", max_num_seqs=8, **options)
    buffered.decode_graphs = DecodeGraphs(buffered, (1, 2, 4, 8), capture=False)
    more = [*prompts, random_ids(9, seed=7)]
    static = [
        buffered.generate_batch(prompts[:3], 8, ignore_eos=True),
        buffered.generate_batch(more, 8, ignore_eos=True),
    ]
    static_expected = [
        sdpa.generate_batch(prompts[:3], 8, ignore_eos=True),
        sdpa.generate_batch(more, 8, ignore_eos=True),
    ]
    return {
        "engine-decode-buffers": {
            "equal": static == static_expected,
            "got": static,
            "blocks_used_after": buffered.pool.allocator.num_used,
        },
        "engine-greedy-batch": {"equal": generated == expected, "expected": expected, "got": generated},
        "engine-logits": {"max_error": logits_error},
        "engine-speculative": {
            "equal": edited == expected[1],
            "got": edited,
            "accepted": stats.accepted_prediction_tokens,
            "passes": stats.forward_passes,
        },
    }


ENGINE_CHECKS = ("engine-greedy-batch", "engine-logits", "engine-speculative", "engine-decode-buffers")


@pytest.fixture(scope="module")
def interpreted_results(tmp_path_factory) -> dict[str, dict]:
    """Every INTERPRETED case run once in a child process under TRITON_INTERPRET=1: name -> result."""
    output = tmp_path_factory.mktemp("interpreted") / "results.json"
    result = subprocess.run(
        [sys.executable, "-m", "tests.engine.test_triton_attention", str(output), *INTERPRETED, "engine"],
        cwd=ROOT,
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0 and output.exists(), result.stdout + result.stderr
    return json.loads(output.read_text())


@needs_triton
@pytest.mark.parametrize("name", INTERPRETED)
def test_interpreted_kernel_matches_paged_attention(interpreted_results, name):
    result = interpreted_results[name]
    assert "error" not in result, result.get("error")
    assert result["max_error"] <= INTERPRETED[name].tolerance, f"{name}: {result} (inf: a row left unwritten)"


@needs_triton
def test_the_engine_on_the_kernel_generates_what_it_generates_on_sdpa(interpreted_results):
    greedy, logits = interpreted_results["engine-greedy-batch"], interpreted_results["engine-logits"]
    assert "error" not in greedy, greedy.get("error")
    assert greedy["equal"], greedy
    assert logits["max_error"] < 1e-4, logits


@needs_triton
def test_decode_passes_on_static_buffers_generate_what_sdpa_generates(interpreted_results):
    """The CUDA graph path's buffers and padding, run eagerly: what the graph replays, minus the capture."""
    result = interpreted_results["engine-decode-buffers"]
    assert "error" not in result, result.get("error")
    assert result["equal"], result
    assert result["blocks_used_after"] == 1  # the scratch block; every sequence's blocks went back


@needs_triton
def test_a_speculative_edit_on_the_kernel_equals_plain_greedy(interpreted_results):
    result = interpreted_results["engine-speculative"]
    assert result["equal"], result
    assert result["accepted"] >= 3, result
    assert result["passes"] < 2 + 8  # two prompt chunks, then fewer passes than tokens


def test_an_engine_refuses_a_triton_backend_it_cannot_run():
    from tests.factories import make_engine

    with pytest.raises(ValueError, match="TRITON_INTERPRET=1 runs its interpreter|triton is not installed"):
        make_engine(attention_backend="triton")
    assert make_engine().attention_backend == "sdpa"  # auto on a CPU
    with pytest.raises(ValueError, match="decode graphs need the triton attention backend"):
        make_engine(cuda_graphs=True)


def test_metadata_rows_and_padding():
    meta = build_paged_metadata([[5, 2], [7], [1, 3, 4]], [17, 0, 30], [3, 9, 1], 16, None, "cpu")
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


@pytest.mark.gpu
@needs_triton
def test_a_cuda_engine_chooses_the_kernel_and_generates_what_sdpa_generates():
    from kvmesh.engine.config import EngineConfig
    from kvmesh.engine.engine import Engine
    from tests.factories import make_model, make_tokenizer, random_ids

    def engine(backend: str) -> Engine:
        config = EngineConfig(block_size=16, num_blocks=64, attention_backend=backend)
        return Engine(make_model().to("cuda"), make_tokenizer(), config)

    kernel, sdpa = engine("auto"), engine("sdpa")
    assert kernel.attention_backend == "triton"
    prompts = [random_ids(n, seed=seed) for seed, n in enumerate((5, 40, 130), start=1)]
    assert kernel.generate_batch(prompts, 16, ignore_eos=True) == sdpa.generate_batch(
        prompts, 16, ignore_eos=True
    )


@pytest.mark.gpu
@needs_triton
def test_decode_passes_replayed_as_cuda_graphs_generate_what_eager_passes_generate():
    from kvmesh.engine.config import EngineConfig
    from kvmesh.engine.engine import Engine
    from tests.factories import make_model, make_tokenizer, random_ids

    def engine(cuda_graphs: bool) -> Engine:
        config = EngineConfig(block_size=16, num_blocks=128, max_num_seqs=8, cuda_graphs=cuda_graphs)
        return Engine(make_model().to("cuda", torch.bfloat16), make_tokenizer(), config)

    graphs, eager = engine(True), engine(False)
    assert graphs.decode_graphs is not None and sorted(graphs.decode_graphs.graphs) == [1, 2, 4, 8]
    for num in (1, 3, 8):  # exact, padded, the largest size
        prompts = [random_ids(7 + 11 * i, seed=i) for i in range(num)]
        assert graphs.generate_batch(prompts, 24, ignore_eos=True) == eager.generate_batch(
            prompts, 24, ignore_eos=True
        )
    assert graphs.pool.allocator.num_used == 1  # the scratch block


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


def _run_interpreted(output: str, names: list[str]) -> None:
    """The child of `interpreted_results`: each named case's max error (or its traceback) into output."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    _patch_interpreter()
    results = {}
    if "engine" in names:
        names.remove("engine")
        try:
            results.update(engine_checks())
        except Exception:
            results.update({name: {"error": traceback.format_exc()} for name in ENGINE_CHECKS})
    for name in names:
        case, seed = INTERPRETED[name], list(INTERPRETED).index(name)
        try:
            results[name] = {"max_error": max_error(case, make_inputs(case, seed=seed))}
        except Exception:
            results[name] = {"error": traceback.format_exc()}
    Path(output).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    _run_interpreted(sys.argv[1], sys.argv[2:])
