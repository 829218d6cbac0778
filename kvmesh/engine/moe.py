"""Sparse mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE): a router picks k experts per token, and
the experts run batched: each layer's expert weights are stacked, and its (token, expert) pairs, sorted by
expert, go through one grouped matrix product per projection (torch's grouped_mm; a loop over the active
experts where it cannot run).

Checkpoints hold a module per expert (`mlp.experts.{e}.gate_proj.weight`, ...; Mixtral's `w1/w2/w3` are
renamed by the loader); `stack_expert_weights` stacks them into `Experts`' two weights at load time.
"""

from __future__ import annotations

import functools
import re

import torch
import torch.nn.functional as F
from torch import nn

from kvmesh.engine.model_config import CheckpointError, MoEConfig


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): the dense MLP, and each expert."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def softmax_top_k(
    router_logits: torch.Tensor, top_k: int, normalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax (in float32) over experts, then the k most probable: (weights [T, k] float32, experts [T, k]).

    NOTE: the choice must be bit-for-bit transformers' (softmax in float32 of the logits in the model's
    dtype, torch.topk's order): a different expert on a near-tie is a different model.
    """
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
"""torch's grouped matrix product (one kernel for every group; torch >= 2.9), or None."""

EXPERT_WEIGHT = re.compile(
    r"^(?P<prefix>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$"
)
"""A checkpoint's per-expert weight: `model.layers.3.mlp.experts.7.up_proj.weight`."""


class Experts(nn.Module):
    """A layer's experts as two stacked weights, so they run as one grouped matrix product each.

    gate_up_proj: [experts, 2 x width, hidden] (each expert's gate rows, then its up rows);
    down_proj: [experts, hidden, width]. Checkpoints store a module per expert: `stack_expert_weights`
    turns their tensors into these at load time.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """sum_j weights[t, j] * expert[experts[t, j]](x[t]) for every token t, grouped by expert.

        x: [T, hidden]; weights, experts: [T, k]. The T*k (token, expert) pairs are sorted by expert, so
        each expert's tokens are one contiguous slice of a grouped matrix product: never a Python loop over
        tokens.
        """
        top_k = experts.shape[1]
        flat_experts = experts.reshape(-1)
        order = torch.argsort(flat_experts, stable=True)  # [T*k] pair indices, grouped by expert
        token_of_pair = order // top_k
        # NOTE: scatter_add_, not bincount: bincount on CUDA reads its input's max on the host, which a CUDA
        # graph capture cannot do.
        counts = torch.zeros(self.gate_up_proj.shape[0], dtype=torch.int64, device=x.device)
        counts.scatter_add_(0, flat_experts, torch.ones_like(flat_experts))
        routed = x.index_select(0, token_of_pair)  # [T*k, hidden]
        gate, up = self._grouped(routed, self.gate_up_proj, counts).chunk(2, dim=-1)
        outputs = self._grouped(F.silu(gate) * up, self.down_proj, counts)
        outputs = outputs * weights.reshape(-1)[order, None].to(outputs.dtype)
        return torch.zeros_like(x).index_add_(0, token_of_pair, outputs)

    @staticmethod
    def _grouped(rows: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """rows [N, in] sorted by expert (counts[e] rows each) times each expert's weight [out, in]^T."""
        if _grouped_mm_works(rows):
            offsets = torch.cumsum(counts, 0, dtype=torch.int32)
            return GROUPED_MM(rows, weight.transpose(1, 2), offs=offsets)
        # NOTE: one host sync for the group sizes; the slices need them as Python ints.
        out = rows.new_empty(rows.shape[0], weight.shape[1])
        start = 0
        for expert, count in enumerate(counts.tolist()):
            if count:
                torch.mm(rows[start : start + count], weight[expert].t(), out=out[start : start + count])
                start += count
        return out


def _grouped_mm_works(rows: torch.Tensor) -> bool:
    """torch's grouped product runs on CPU in any float dtype, and on CUDA in bfloat16 on sm80 and later."""
    return _grouped_mm_runs_on(rows.device, rows.dtype)


@functools.cache
def _grouped_mm_runs_on(device: torch.device, dtype: torch.dtype) -> bool:
    """Cached: asked by every sparse layer of every forward pass."""
    if GROUPED_MM is None:
        return False
    if device.type == "cpu":
        return True
    return (
        device.type == "cuda"
        and dtype == torch.bfloat16
        and torch.cuda.get_device_capability(device) >= (8, 0)
    )


def stack_expert_weights(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with per-expert weights (`...experts.{e}.gate_proj.weight`, up, down) replaced by the
    stacked `...experts.gate_up_proj` and `...experts.down_proj` of `Experts`; other entries unchanged.

    Raises CheckpointError when a layer's experts are not numbered 0..n-1 or one lacks a projection.
    """
    per_layer: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        match = EXPERT_WEIGHT.match(name)
        if match is None:
            out[name] = tensor
            continue
        layer = per_layer.setdefault(match["prefix"], {})
        layer.setdefault(int(match["expert"]), {})[match["proj"]] = tensor
    for prefix, experts in per_layer.items():
        if sorted(experts) != list(range(len(experts))):
            raise CheckpointError(
                f"{prefix}: experts are numbered {sorted(experts)}, expected 0..{len(experts) - 1}"
            )
        for expert, projections in experts.items():
            lacking = {"gate_proj", "up_proj", "down_proj"} - projections.keys()
            if lacking:
                raise CheckpointError(f"{prefix}.{expert}: no {', '.join(sorted(lacking))} weight")
        ordered = [experts[e] for e in range(len(experts))]
        out[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([e["gate_proj"], e["up_proj"]]) for e in ordered]
        )
        out[f"{prefix}.down_proj"] = torch.stack([e["down_proj"] for e in ordered])
    return out


class SparseMoE(nn.Module):
    """Router + experts (+ Qwen2-MoE's shared expert, scaled by sigmoid(shared_expert_gate(x)))."""

    def __init__(self, hidden_size: int, moe: MoEConfig) -> None:
        super().__init__()
        self.moe = moe
        self.gate = nn.Linear(hidden_size, moe.num_experts, bias=False)
        self.experts = Experts(moe.num_experts, hidden_size, moe.expert_intermediate_size)
        if moe.shared_expert_intermediate_size:
            self.shared_expert = SwiGLU(hidden_size, moe.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, hidden] -> (weights [T, k] float32, expert ids [T, k])."""
        return softmax_top_k(self.gate(x), self.moe.num_experts_per_tok, self.moe.norm_topk_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = self.route(x)
        out = self.experts(x, weights, experts)
        if self.moe.shared_expert_intermediate_size:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out
