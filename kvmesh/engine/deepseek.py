"""DeepSeek-V2/V3: multi-latent attention (`kvmesh.engine.mla`) and a mixture of routed plus always-on
shared experts, after `first_k_dense_replace` dense layers.

Routing, as transformers' DeepseekV2/V3TopkRouter (float32 router, whatever the model's dtype):

- V2: softmax scores; 'greedy' takes the top k; 'group_limited_greedy' first keeps the top_k_groups groups
  by their best score. Weights are the chosen scores, never renormalised.
- V3: sigmoid scores; e_score_correction_bias is added to choose (groups ranked by the sum of their two
  best, then the top k) but never to weight; weights are the chosen raw scores, renormalised when
  norm_topk_prob.

Both then multiply by routed_scaling_factor. Same interface as `kvmesh.engine.model.CausalLM`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvmesh.engine.mla import LatentRotary, MultiLatentAttention
from kvmesh.engine.model import CausalLM, DecoderLayer
from kvmesh.engine.model_config import ModelConfig, MoEConfig
from kvmesh.engine.moe import Experts, SwiGLU


class DeepseekRouter(nn.Module):
    """`mlp.gate`: weight [experts, hidden] (and V3's e_score_correction_bias [experts]), kept in float32."""

    def __init__(self, hidden_size: int, moe: MoEConfig) -> None:
        super().__init__()
        self.moe = moe
        self.weight = nn.Parameter(torch.empty(moe.num_experts, hidden_size))
        if moe.scoring == "sigmoid":
            self.e_score_correction_bias = nn.Parameter(torch.zeros(moe.num_experts), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, hidden] -> (weights [T, k] float32, expert ids [T, k])."""
        moe = self.moe
        logits = F.linear(x.float(), self.weight.float())
        if moe.scoring == "softmax":
            scores = logits.softmax(dim=-1)
            choice = self._keep_groups(scores, scores.view(len(x), moe.num_groups, -1).amax(-1), 0.0)
            weights, experts = torch.topk(choice, moe.num_experts_per_tok, dim=-1, sorted=False)
        else:
            scores = logits.sigmoid()
            choice = scores + self.e_score_correction_bias.float()
            group_scores = choice.view(len(x), moe.num_groups, -1).topk(2, dim=-1)[0].sum(-1)
            choice = self._keep_groups(choice, group_scores, float("-inf"))
            experts = torch.topk(choice, moe.num_experts_per_tok, dim=-1, sorted=False)[1]
            weights = scores.gather(1, experts)
            if moe.norm_topk_prob:
                weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * moe.routed_scaling_factor, experts

    def _keep_groups(self, choice: torch.Tensor, group_scores: torch.Tensor, fill: float) -> torch.Tensor:
        """choice [T, E] with every expert outside each token's top_k_groups groups set to `fill`."""
        moe = self.moe
        if moe.num_groups == 1:
            return choice
        kept = torch.topk(group_scores, moe.top_k_groups, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, kept, True)
        expert_mask = group_mask.repeat_interleave(moe.num_experts // moe.num_groups, dim=1)
        return choice.masked_fill(~expert_mask, fill)


class DeepseekMoE(nn.Module):
    """Routed experts (batched by expert) plus the shared experts every token goes through."""

    def __init__(self, hidden_size: int, moe: MoEConfig) -> None:
        super().__init__()
        self.gate = DeepseekRouter(hidden_size, moe)
        self.experts = Experts(moe.num_experts, hidden_size, moe.expert_intermediate_size)
        self.has_shared = moe.shared_expert_intermediate_size > 0
        if self.has_shared:
            self.shared_experts = SwiGLU(hidden_size, moe.shared_expert_intermediate_size)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.gate(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = self.gate(x)
        out = self.experts(x, weights, experts)
        return out + self.shared_experts(x) if self.has_shared else out


def deepseek_layer(config: ModelConfig, layer_index: int) -> DecoderLayer:
    """A DeepSeek layer: multi-latent attention, and routed + shared experts or (first_k_dense_replace) a
    dense SwiGLU MLP."""
    moe = config.moe
    mlp: nn.Module = (
        DeepseekMoE(config.hidden_size, moe)
        if moe is not None and layer_index in moe.sparse_layers
        else SwiGLU(config.hidden_size, config.intermediate_size)
    )
    return DecoderLayer(config, MultiLatentAttention(config, layer_index), mlp)


class DeepseekForCausalLM(CausalLM):
    """`CausalLM` with DeepSeek's layers and its decoupled rope tables."""

    keep_float32 = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")
    """Parameters that stay float32 in any model dtype (transformers keeps the router in float32)."""
    make_layer = staticmethod(deepseek_layer)

    def make_rotary(self) -> nn.Module:
        mla = self.config.mla
        assert mla is not None
        return LatentRotary(self.config.rope, mla.qk_rope_head_dim, self.config.max_position_embeddings)

    def rotary_at(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 tables whatever the model's dtype: apply_latent_rope rotates in float32."""
        return self.rotary(positions)
