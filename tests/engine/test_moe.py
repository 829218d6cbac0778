"""The sparse MLP: grouped experts equal a per-token reference, and the router picks exactly the experts
transformers picks (bit-for-bit in float32) on the same checkpoint and the same hidden states."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kvmesh.engine import moe as moe_module
from kvmesh.engine.loader import load_model
from kvmesh.engine.model_config import CheckpointError, MoEConfig
from kvmesh.engine.moe import SparseMoE, stack_expert_weights

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("single_thread")


def make_moe(num_experts: int, top_k: int, shared: int = 0, seed: int = 0) -> SparseMoE:
    torch.manual_seed(seed)
    moe = SparseMoE(16, MoEConfig(num_experts, top_k, 12, top_k > 1, shared, (0,)))
    with torch.no_grad():
        for param in moe.parameters():
            param.normal_(0, 0.3)
    return moe.eval()


def expert_forward(moe: SparseMoE, expert: int, x: torch.Tensor) -> torch.Tensor:
    """One expert's SwiGLU from its slices of the stacked weights."""
    gate, up = (x @ moe.experts.gate_up_proj[expert].t()).chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up) @ moe.experts.down_proj[expert].t()


def per_token_reference(moe: SparseMoE, x: torch.Tensor) -> torch.Tensor:
    weights, experts = moe.route(x)
    rows = []
    for t in range(x.shape[0]):
        row = sum(w * expert_forward(moe, int(e), x[t]) for w, e in zip(weights[t], experts[t], strict=True))
        if moe.moe.shared_expert_intermediate_size:
            row = row + torch.sigmoid(moe.shared_expert_gate(x[t])) * moe.shared_expert(x[t])
        rows.append(row)
    return torch.stack(rows)


@pytest.mark.parametrize("grouped_mm", [True, False], ids=["grouped-mm", "loop-over-experts"])
@pytest.mark.parametrize(("num_experts", "top_k", "shared"), [(5, 3, 0), (3, 1, 0), (7, 2, 10)])
def test_grouped_experts_equal_a_per_token_loop(
    num_experts: int, top_k: int, shared: int, grouped_mm: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if grouped_mm and moe_module.GROUPED_MM is None:
        pytest.skip(f"torch {torch.__version__} has no grouped_mm")
    monkeypatch.setattr(moe_module, "_grouped_mm_works", lambda _rows: grouped_mm)
    moe = make_moe(num_experts, top_k, shared)
    x = torch.randn(37, 16)
    with torch.no_grad():
        assert torch.allclose(moe(x), per_token_reference(moe, x), atol=1e-5)


def test_an_expert_no_token_chose_adds_nothing_and_one_token_works() -> None:
    moe = make_moe(6, 1)
    x = torch.randn(1, 16)  # one token: five of six experts get no rows
    with torch.no_grad():
        assert torch.allclose(moe(x), per_token_reference(moe, x), atol=1e-5)


def test_per_expert_weights_stack_into_gate_up_and_down() -> None:
    gate, up, down = torch.randn(3, 4, 6), torch.randn(3, 4, 6), torch.randn(3, 6, 4)
    state = {"lm_head.weight": torch.ones(2)}
    for e in range(3):
        prefix = f"model.layers.1.mlp.experts.{e}"
        state |= {f"{prefix}.gate_proj.weight": gate[e], f"{prefix}.up_proj.weight": up[e]}
        state[f"{prefix}.down_proj.weight"] = down[e]
    stacked = stack_expert_weights(state)
    assert set(stacked) == {
        "lm_head.weight",
        "model.layers.1.mlp.experts.gate_up_proj",
        "model.layers.1.mlp.experts.down_proj",
    }
    assert torch.equal(stacked["model.layers.1.mlp.experts.gate_up_proj"], torch.cat([gate, up], dim=1))
    assert torch.equal(stacked["model.layers.1.mlp.experts.down_proj"], down)


def test_a_missing_expert_or_projection_is_refused_by_name() -> None:
    weight = torch.zeros(4, 6)
    gap = {f"m.experts.{e}.{p}.weight": weight for e in (0, 2) for p in ("gate_proj", "up_proj", "down_proj")}
    with pytest.raises(CheckpointError, match=r"m\.experts: experts are numbered \[0, 2\]"):
        stack_expert_weights(gap)
    lacking = {f"m.experts.0.{p}.weight": weight for p in ("gate_proj", "down_proj")}
    with pytest.raises(CheckpointError, match=r"m\.experts\.0: no up_proj weight"):
        stack_expert_weights(lacking)


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
