"""`triton_latent_attention` (MLA's absorbed attention on the paged latent cache) against dense math.

The reference gathers each sequence's latents and attends in float64 as `MultiLatentAttention.attend_absorbed`
does before W_uv: scores = q_latent . latent, causal softmax, times the latents' first kv_lora_rank dims
(`test_the_reference_is_attend_absorbed_before_w_uv` ties the two). As in test_triton_attention, the kernel
runs on the CPU in Triton's interpreter in one child process over every case of INTERPRETED (its helpers
are imported from there); by hand: `TRITON_INTERPRET=1 python -m tests.engine.test_triton_mla out.json
mixed-16`. The `gpu` tests run the compiled kernel on CUDA at DeepSeek-V2-Lite's and V3's shapes.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass, replace

import pytest
import torch

from kvmesh.engine.attention import build_attention_batch
from kvmesh.engine.triton_attention import (
    triton_latent_attention,
    triton_paged_attention,
)
from tests.engine.test_triton_attention import needs_triton, run_interpreted_child, write_case_results


@dataclass(frozen=True)
class LatentCase:
    num_cached: tuple[int, ...]
    num_new: tuple[int, ...]
    num_heads: int = 16
    kv_lora_rank: int = 64
    rope_dim: int = 32
    block_size: int = 16
    dtype: torch.dtype = torch.float32
    tolerance: float = 1e-4
    """Largest absolute error allowed against the float64 reference on the same inputs. bfloat16 gets 3e-2:
    outputs reach about 3.5, so rounding them alone costs 8e-3, and p is rounded too for the PV dot."""
    separate_v: bool = False
    """Call triton_paged_attention with the value as a copy of the latents' prefix, not a view of them."""

    @property
    def latent_dim(self) -> int:
        return self.kv_lora_rank + self.rope_dim


SCALE = 192**-0.5
"""DeepSeek's softmax scale without yarn: (qk_nope_head_dim 128 + qk_rope_head_dim 64) ** -0.5."""

MIXED = LatentCase(num_cached=(40, 15, 0, 20, 30, 16, 3), num_new=(1, 1, 5, 17, 3, 1, 9))
"""Decodes at and across block boundaries, verifications, a 17-token prompt chunk on 20 cached."""
SHORT = LatentCase(num_cached=(0, 15, 16, 47), num_new=(1, 3, 1, 2))

INTERPRETED = {
    "mixed-16": MIXED,
    "mixed-40": replace(MIXED, num_heads=40),  # a group that is not a power of two
    "mixed-16-r128": replace(MIXED, kv_lora_rank=128, rope_dim=64),
    "mixed-40-r128": replace(MIXED, num_heads=40, kv_lora_rank=128, rope_dim=64),
    "short-80": replace(SHORT, num_heads=80),  # 64 rows a program: 2 programs per query
    "block-4": replace(MIXED, num_heads=40, block_size=4),
    "bfloat16-16": replace(MIXED, dtype=torch.bfloat16, tolerance=3e-2),
    "bfloat16-40-r128": replace(
        MIXED, num_heads=40, kv_lora_rank=128, rope_dim=64, dtype=torch.bfloat16, tolerance=3e-2
    ),
    "separate-v": replace(MIXED, num_heads=40, kv_lora_rank=128, rope_dim=64, separate_v=True),
    # DeepSeek's 512 + 64: at most 32 rows a program, 40 heads split 32 + 8, fp32 in 16-key tiles.
    "r512-16-bfloat16": replace(MIXED, kv_lora_rank=512, rope_dim=64, dtype=torch.bfloat16, tolerance=3e-2),
    "r512-40": replace(SHORT, num_heads=40, kv_lora_rank=512, rope_dim=64),
}


@dataclass
class LatentInputs:
    q: torch.Tensor
    """[T, heads, latent_dim]: a view of a wider buffer, so its rows are not contiguous."""
    pool: torch.Tensor
    """[layers, 1, num_blocks, block_size, 1, latent_dim] as KVPool lays out a latent pool; layer 1 is used."""
    tables: list[list[int]]

    @property
    def cache(self) -> torch.Tensor:
        """[num_blocks, block_size, latent_dim], like `KVPool.latent(1)`."""
        return self.pool[1, 0, :, :, 0]


def make_latent_inputs(case: LatentCase, device: str = "cpu", seed: int = 0) -> LatentInputs:
    """Random queries and latent pool in case.dtype, each sequence's blocks scattered over the pool."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [-(-(c + n) // case.block_size) for c, n in zip(case.num_cached, case.num_new, strict=True)]
    num_blocks = sum(sizes) + 5
    ids = random.Random(seed).sample(range(num_blocks), sum(sizes))
    tables = [ids[sum(sizes[:b]) : sum(sizes[: b + 1])] for b in range(len(sizes))]

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(device=device, dtype=case.dtype)

    q = rand(sum(case.num_new), case.num_heads + 3, case.latent_dim)[:, 2 : 2 + case.num_heads]
    return LatentInputs(q=q, pool=rand(2, 1, num_blocks, case.block_size, 1, case.latent_dim), tables=tables)


def latent_reference(
    case: LatentCase, inputs: LatentInputs, dtype: torch.dtype = torch.float64, scale: float = SCALE
) -> torch.Tensor:
    """Per sequence: its latents gathered in order, each head's causal softmax of scale * q . latent over
    them, times their first kv_lora_rank dims. [T, heads, kv_lora_rank] in `dtype`."""
    flat = inputs.cache.reshape(-1, case.latent_dim).to(dtype)
    q = inputs.q.to(dtype)
    outs, row = [], 0
    for table, cached, new in zip(inputs.tables, case.num_cached, case.num_new, strict=True):
        positions = torch.arange(cached + new, device=q.device)
        slots = torch.tensor(table, device=q.device)[positions // case.block_size] * case.block_size
        latents = flat[slots + positions % case.block_size]  # [ctx, latent_dim]
        scores = torch.einsum("nhd,kd->nhk", q[row : row + new], latents) * scale
        visible = positions[None, :] <= (cached + torch.arange(new, device=q.device))[:, None]  # [new, ctx]
        scores = scores.masked_fill(~visible[:, None], float("-inf"))
        outs.append(scores.softmax(-1) @ latents[:, : case.kv_lora_rank])
        row += new
    return torch.cat(outs)


def paged_meta(tables, num_cached, num_new, block_size, device):  # noqa: ANN001, ANN201
    """The kernel's metadata for the sequences, as the engine builds it."""
    batch, _ = build_attention_batch(
        tables, list(num_cached), list(num_new), block_size, None, device, "triton"
    )
    return batch.paged


def run_latent_kernel(case: LatentCase, inputs: LatentInputs) -> torch.Tensor:
    """The kernel into a NaN-filled out: [T, heads, kv_lora_rank] in case.dtype."""
    meta = paged_meta(inputs.tables, case.num_cached, case.num_new, case.block_size, inputs.q.device)
    rank = case.kv_lora_rank
    out = inputs.q.new_full((inputs.q.shape[0], case.num_heads, rank), float("nan"))
    if case.separate_v:
        cache = inputs.cache[:, :, None]
        result = triton_paged_attention(inputs.q, cache, cache[..., :rank].clone(), meta, SCALE, out=out)
    else:
        result = triton_latent_attention(inputs.q, inputs.cache, rank, meta, SCALE, out=out)
    assert result is out
    return out


def latent_max_error(case: LatentCase, inputs: LatentInputs, reference_dtype=torch.float64) -> float:
    """Largest absolute difference from the reference; inf when a row was left unwritten."""
    expected = latent_reference(case, inputs, reference_dtype)
    out = run_latent_kernel(case, inputs).to(expected.dtype)
    return float("inf") if out.isnan().any() else (out - expected).abs().max().item()


@pytest.fixture(scope="module")
def interpreted_results(tmp_path_factory) -> dict[str, dict]:
    """Every INTERPRETED case run once in a child process under TRITON_INTERPRET=1: name -> result."""
    output = tmp_path_factory.mktemp("interpreted-mla") / "results.json"
    return run_interpreted_child("tests.engine.test_triton_mla", output, list(INTERPRETED))


@needs_triton
@pytest.mark.parametrize("name", INTERPRETED)
def test_interpreted_latent_kernel_matches_dense_latent_attention(interpreted_results, name):
    result = interpreted_results[name]
    assert "error" not in result, result.get("error")
    assert result["max_error"] <= INTERPRETED[name].tolerance, f"{name}: {result} (inf: a row left unwritten)"


@pytest.mark.usefixtures("single_thread")
def test_the_reference_is_attend_absorbed_before_w_uv():
    """latent_reference on q_latent = [W_uk^T q_nope ; q_pe], times W_uv, is the model's absorbed path."""
    from kvmesh.engine.attention import build_attention_batch
    from tests.engine.test_mla import make_attention, make_config

    config = make_config(16)
    attention, _ = make_attention(config, seed=5)
    mla = attention.mla
    case = LatentCase(
        num_cached=(0, 5, 17, 3),
        num_new=(1, 1, 1, 6),
        num_heads=attention.num_heads,
        kv_lora_rank=mla.kv_lora_rank,
        rope_dim=mla.qk_rope_head_dim,
        block_size=4,
    )
    inputs = make_latent_inputs(case, seed=6)
    q = torch.randn(sum(case.num_new), case.num_heads, mla.qk_nope_head_dim + mla.qk_rope_head_dim)
    w_uk, w_uv = attention.up_projections()
    with torch.no_grad():
        q_nope, q_pe = q.split([mla.qk_nope_head_dim, mla.qk_rope_head_dim], dim=-1)
        q_latent = torch.cat([torch.einsum("thn,hnr->thr", q_nope, w_uk), q_pe], dim=-1)
        latent_out = latent_reference(case, replace(inputs, q=q_latent), torch.float32, mla.softmax_scale)
        expected = torch.einsum("thr,hvr->thv", latent_out, w_uv)
        batch, _ = build_attention_batch(
            inputs.tables, list(case.num_cached), list(case.num_new), case.block_size, None, "cpu"
        )
        assert len(batch.groups) == 2  # the decodes, and the 6-token query
        for group in batch.groups:
            absorbed = attention.attend_absorbed(q, inputs.cache, group)
            assert (absorbed - expected[group.out_row]).abs().max().item() < 1e-5


GPU_MIXED = LatentCase(
    num_cached=(*range(100, 2100, 100), 300, 1000, 512),
    num_new=((1,) * 20) + (4, 17, 256),
    kv_lora_rank=512,
    rope_dim=64,
    dtype=torch.bfloat16,
    tolerance=3e-2,
)
"""20 decodes over 100..2000 tokens, a 4- and a 17-token verification, a 256-token chunk on 512."""


@pytest.mark.gpu
@needs_triton
@pytest.mark.parametrize(
    "case",
    [
        GPU_MIXED,  # DeepSeek-V2-Lite: 16 heads, kv_lora_rank 512 + rope 64
        replace(GPU_MIXED, num_heads=128),  # DeepSeek-V3
        replace(GPU_MIXED, num_heads=128, separate_v=True),
        replace(GPU_MIXED, num_cached=(4000, 1, 63, 64), num_new=(1, 1, 1, 1), num_heads=128),
        replace(GPU_MIXED, num_heads=40, dtype=torch.float32, tolerance=1e-4),
    ],
    ids=["v2-lite-16", "v3-128", "v3-128-separate-v", "v3-128-decodes", "fp32-40"],
)
def test_cuda_latent_kernel_matches_dense_latent_attention(case):
    inputs = make_latent_inputs(case, device="cuda")
    assert latent_max_error(case, inputs, reference_dtype=torch.float32) <= case.tolerance


def test_the_kernel_refuses_mismatched_shapes():
    """Checked before the kernel is built, so this runs without triton."""
    case = replace(SHORT, num_heads=4)
    inputs = make_latent_inputs(case)
    meta = paged_meta(inputs.tables, case.num_cached, case.num_new, 16, "cpu")
    cache = inputs.cache[:, :, None]
    wider = torch.cat([cache, cache], dim=-1)
    with pytest.raises(ValueError, match="does not match k_cache"):
        triton_paged_attention(inputs.q, cache, wider, meta, SCALE)  # a value wider than the key
    with pytest.raises(ValueError, match="does not match k_cache"):
        triton_paged_attention(inputs.q, cache, cache[:-1, :, :, :64], meta, SCALE)
    with pytest.raises(ValueError, match="expected"):
        triton_latent_attention(inputs.q, inputs.cache, 64, meta, SCALE, out=torch.empty_like(inputs.q))


if __name__ == "__main__":
    write_case_results(
        sys.argv[1],
        sys.argv[2:],
        INTERPRETED,
        lambda case, seed: latent_max_error(case, make_latent_inputs(case, seed=seed)),
    )
