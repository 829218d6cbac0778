"""The whole engine on the Triton attention backend against the same engine on SDPA: a Llama-family model
(greedy batches mixing prompt chunks and decodes, logits, a speculative edit, decode passes on the static
buffers a CUDA graph replays) and a DeepSeek model with multi-latent attention (greedy batches, logits).

On the CPU the kernel runs in Triton's interpreter, in a child process (see test_triton_attention.py for
why): `interpreted_results` runs `engine_checks` there once and each test reads its part. The `gpu` tests
run the compiled kernel, and the CUDA graphs, in this process.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch

from kvmesh.engine.config import EngineConfig
from kvmesh.engine.engine import Engine
from tests.engine.test_triton_attention import _patch_interpreter, needs_triton, run_interpreted_child
from tests.factories import make_engine, make_model, make_tokenizer, random_ids


def deepseek_engine(backend: str, **options: Any) -> Engine:
    """A tiny random DeepSeek-V3 (MLA with q_lora, routed + shared experts) on a latent pool."""
    from kvmesh.engine.deepseek import DeepseekForCausalLM
    from tests.engine.test_mla import make_config

    torch.manual_seed(0)
    model = DeepseekForCausalLM(make_config(16))
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0 if "norm" in name else 0.0, 0.1 if "norm" in name else param.shape[-1] ** -0.5)
    config = EngineConfig(block_size=4, num_blocks=256, attention_backend=backend, **options)
    return Engine(model.eval(), make_tokenizer(), config)


def engine_checks() -> dict[str, dict]:
    """Every check's result, by name; run in the interpreter's child."""
    from kvmesh.engine.cuda_graphs import DecodeGraphs
    from kvmesh.engine.generate import generate_speculative

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
    static = [buffered.generate_batch(batch, 8, ignore_eos=True) for batch in (prompts[:3], more)]
    static_expected = [sdpa.generate_batch(batch, 8, ignore_eos=True) for batch in (prompts[:3], more)]
    # Multi-latent attention: every token (chunks too) in latent space through the kernel.
    mla_sdpa, mla_kernel = deepseek_engine("sdpa", **options), deepseek_engine("triton", **options)
    mla_prompts = [random_ids(n, vocab_size=32, seed=seed) for seed, n in enumerate((3, 19, 30), start=1)]
    mla_expected = mla_sdpa.generate_batch(mla_prompts, 8, ignore_eos=True)
    mla_generated = mla_kernel.generate_batch(mla_prompts, 8, ignore_eos=True)
    mla_logits_error = (
        (mla_kernel.logits(mla_prompts[2]) - mla_sdpa.logits(mla_prompts[2])).abs().max().item()
    )
    return {
        "greedy-batch": {"equal": generated == expected, "expected": expected, "got": generated},
        "logits": {"max_error": logits_error},
        "speculative": {
            "equal": edited == expected[1],
            "got": edited,
            "accepted": stats.accepted_prediction_tokens,
            "passes": stats.forward_passes,
        },
        "decode-buffers": {
            "equal": static == static_expected,
            "got": static,
            "blocks_used_after": buffered.pool.allocator.num_used,
        },
        "mla-greedy-batch": {
            "equal": mla_generated == mla_expected,
            "backend": mla_kernel.attention_backend,
            "expected": mla_expected,
            "got": mla_generated,
        },
        "mla-logits": {"max_error": mla_logits_error},
    }


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    output = tmp_path_factory.mktemp("interpreted-engine") / "results.json"
    found = run_interpreted_child("tests.engine.test_triton_engine", output, ["all"])
    assert "error" not in found, found.get("error")
    return found


@needs_triton
def test_the_engine_on_the_kernel_generates_what_it_generates_on_sdpa(results):
    assert results["greedy-batch"]["equal"], results["greedy-batch"]
    assert results["logits"]["max_error"] < 1e-4, results["logits"]


@needs_triton
def test_a_speculative_edit_on_the_kernel_equals_plain_greedy(results):
    result = results["speculative"]
    assert result["equal"], result
    assert result["accepted"] >= 3, result
    assert result["passes"] < 2 + 8  # two prompt chunks, then fewer passes than tokens


@needs_triton
def test_decode_passes_on_static_buffers_generate_what_sdpa_generates(results):
    """The CUDA graph path's buffers and padding, run eagerly: what the graph replays, minus the capture."""
    result = results["decode-buffers"]
    assert result["equal"], result
    assert result["blocks_used_after"] == 1  # the scratch block; every sequence's blocks went back


@needs_triton
def test_multi_latent_attention_on_the_kernel_generates_what_it_generates_on_sdpa(results):
    result = results["mla-greedy-batch"]
    assert result["backend"] == "triton" and result["equal"], result
    assert results["mla-logits"]["max_error"] < 1e-4, results["mla-logits"]


def test_an_engine_refuses_a_triton_backend_it_cannot_run():
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1 runs its interpreter|triton is not installed"):
        make_engine(attention_backend="triton")
    assert make_engine().attention_backend == "sdpa"  # auto on a CPU
    with pytest.raises(ValueError, match="decode graphs need the triton attention backend"):
        make_engine(cuda_graphs=True)


@pytest.mark.gpu
@needs_triton
def test_a_cuda_engine_chooses_the_kernel_and_generates_what_sdpa_generates():
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


@pytest.mark.gpu
@needs_triton
def test_a_cuda_mla_engine_on_the_kernel_generates_what_sdpa_generates():
    def engine(backend: str) -> Engine:
        mla = deepseek_engine(backend)
        return Engine(mla.model.to("cuda"), mla.tokenizer, mla.engine_config)

    kernel, sdpa = engine("auto"), engine("sdpa")
    assert kernel.attention_backend == "triton"
    prompts = [random_ids(n, vocab_size=32, seed=seed) for seed, n in enumerate((3, 40, 90), start=1)]
    assert kernel.generate_batch(prompts, 16, ignore_eos=True) == sdpa.generate_batch(
        prompts, 16, ignore_eos=True
    )


def _run_interpreted(output: str) -> None:
    """The child of `results`: engine_checks' results (or the traceback) into output."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"
    _patch_interpreter()
    try:
        found = engine_checks()
    except Exception:
        found = {"error": traceback.format_exc()}
    Path(output).write_text(json.dumps(found, indent=1))


if __name__ == "__main__":
    _run_interpreted(sys.argv[1])
