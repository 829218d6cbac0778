"""Sparse mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE): a router picks k experts per token, and
the experts run batched, one matmul chain per active expert over all the tokens routed to it.

Parameter names follow Hugging Face's per-expert checkpoints (`mlp.gate.weight`,
`mlp.experts.{e}.gate_proj.weight`, ...), so a state dict loads as saved (Mixtral's `w1/w2/w3` names are
renamed by the loader).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvmesh.engine.model_config import MoEConfig


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


def run_experts(
    x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, modules: nn.ModuleList
) -> torch.Tensor:
    """sum_j weights[t, j] * modules[experts[t, j]](x[t]) for every token t, grouped by expert.

    x: [T, hidden]; weights, experts: [T, k]. The T*k (token, expert) pairs are sorted by expert so each
    active expert sees one contiguous [n_e, hidden] slice: one matmul chain per active expert, never a
    Python loop over tokens.
    """
    top_k = experts.shape[1]
    flat_experts = experts.reshape(-1)
    order = torch.argsort(flat_experts, stable=True)  # [T*k] pair indices, grouped by expert
    token_of_pair = order // top_k
    # NOTE: one host sync per layer for the group sizes; the slices below need them as Python ints.
    counts = torch.bincount(flat_experts, minlength=len(modules)).tolist()
    routed = x.index_select(0, token_of_pair)  # [T*k, hidden]
    outputs = torch.empty_like(routed)
    start = 0
    for expert, count in enumerate(counts):
        if count:
            outputs[start : start + count] = modules[expert](routed[start : start + count])
            start += count
    outputs = outputs * weights.reshape(-1)[order, None].to(outputs.dtype)
    return torch.zeros_like(x).index_add_(0, token_of_pair, outputs)


class SparseMoE(nn.Module):
    """Router + experts (+ Qwen2-MoE's shared expert, scaled by sigmoid(shared_expert_gate(x)))."""

    def __init__(self, hidden_size: int, moe: MoEConfig) -> None:
        super().__init__()
        self.moe = moe
        self.gate = nn.Linear(hidden_size, moe.num_experts, bias=False)
        self.experts = nn.ModuleList(
            SwiGLU(hidden_size, moe.expert_intermediate_size) for _ in range(moe.num_experts)
        )
        if moe.shared_expert_intermediate_size:
            self.shared_expert = SwiGLU(hidden_size, moe.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, hidden] -> (weights [T, k] float32, expert ids [T, k])."""
        return softmax_top_k(self.gate(x), self.moe.num_experts_per_tok, self.moe.norm_topk_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = self.route(x)
        out = run_experts(x, weights, experts, self.experts)
        if self.moe.shared_expert_intermediate_size:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out
