"""The sparse MLP: grouped experts equal a per-token reference, and the router picks exactly the experts
transformers picks (bit-for-bit in float32) on the same checkpoint and the same hidden states."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kvmesh.engine.loader import load_model
from kvmesh.engine.model_config import MoEConfig
from kvmesh.engine.moe import SparseMoE

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("single_thread")


def make_moe(num_experts: int, top_k: int, shared: int = 0, seed: int = 0) -> SparseMoE:
    torch.manual_seed(seed)
    moe = SparseMoE(16, MoEConfig(num_experts, top_k, 12, top_k > 1, shared, (0,)))
    with torch.no_grad():
        for param in moe.parameters():
            param.normal_(0, 0.3)
    return moe.eval()


def per_token_reference(moe: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    weights, experts = moe.route(x)
    rows = []
    for t in range(x.shape[0]):
        row = sum(w * moe.experts[int(e)](x[t]) for w, e in zip(weights[t], experts[t], strict=True))
        if moe.moe.shared_expert_intermediate_size:
            row = row + torch.sigmoid(moe.shared_expert_gate(x[t])) * moe.shared_expert(x[t])
        rows.append(row)
    return torch.stack(rows)


@pytest.mark.parametrize(("num_experts", "top_k", "shared"), [(5, 3, 0), (3, 1, 0), (7, 2, 10)])
def test_grouped_experts_equal_a_per_token_loop(num_experts: int, top_k: int, shared: int) -> None:
    moe = make_moe(num_experts, top_k, shared)
    x = torch.randn(37, 16)
    with torch.no_grad():
        assert torch.allclose(moe(x), per_token_reference(moe, x), atol=1e-5)


def test_each_active_expert_runs_once_per_layer() -> None:
    moe = make_moe(6, 2)
    calls: list[int] = []
    for expert in moe.experts:
        expert.register_forward_hook(lambda _m, args, _out: calls.append(args[0].shape[0]))
    x = torch.randn(50, 16)
    with torch.no_grad():
        _, experts = moe.route(x)
        moe(x)
    assert len(calls) == len(experts.unique())
    assert sum(calls) == 50 * 2


ROUTED = {
    "qwen3_moe": {"num_experts": 7, "num_experts_per_tok": 3, "moe_intermediate_size": 24},
    "mixtral": {"num_local_experts": 5, "num_experts_per_tok": 2},
    "qwen2_moe": {
        "num_experts": 5,
        "num_experts_per_tok": 1,
        "moe_intermediate_size": 24,
        "shared_expert_intermediate_size": 32,
    },
}


@pytest.mark.parametrize("arch", ROUTED)
def test_router_picks_transformers_experts_bit_for_bit(
    arch: str, tmp_path: Path, make_hf_checkpoint: Any, code_prompt: Any
) -> None:
    path = make_hf_checkpoint(tmp_path, arch, **ROUTED[arch])
    reference = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager").eval()
    captured: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for layer in reference.model.layers:
        layer.mlp.gate.register_forward_hook(
            lambda _m, args, out: captured.append((args[0].reshape(-1, args[0].shape[-1]), out[1], out[2]))
        )
    with torch.no_grad():
        reference(input_ids=torch.tensor([code_prompt(40)]))
    ours = load_model(path)
    assert len(captured) == len(ours.model.layers)
    for layer, (hidden, their_weights, their_experts) in zip(ours.model.layers, captured, strict=True):
        with torch.no_grad():
            weights, experts = layer.mlp.route(hidden)
        assert torch.equal(experts, their_experts)
        assert torch.equal(weights.to(their_weights.dtype), their_weights)
