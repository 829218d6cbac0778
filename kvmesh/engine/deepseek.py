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

from kvmesh.engine.attention import AttentionBatch
from kvmesh.engine.kv_cache import KVPool
from kvmesh.engine.mla import LatentRotary, MultiLatentAttention
from kvmesh.engine.model import RMSNorm
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


class DeepseekDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.self_attn = MultiLatentAttention(config, layer_index)
        moe = config.moe
        self.mlp: nn.Module = (
            DeepseekMoE(config.hidden_size, moe)
            if moe is not None and layer_index in moe.sparse_layers
            else SwiGLU(config.hidden_size, config.intermediate_size)
        )
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pool: KVPool, batch: AttentionBatch
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, pool, batch)
        return x + self.mlp(self.post_attention_layernorm(x))


class DeepseekDecoder(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DeepseekDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DeepseekForCausalLM(nn.Module):
    """The decoder plus its LM head; `forward` returns final hidden states, `logits` projects chosen rows."""

    keep_float32 = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")
    """Parameters that stay float32 in any model dtype (transformers keeps the router in float32)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DeepseekDecoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = self.make_rotary()

    def make_rotary(self) -> LatentRotary:
        """The rotary tables (buffers computed from the config, not weights)."""
        mla = self.config.mla
        assert mla is not None
        return LatentRotary(self.config.rope, mla.qk_rope_head_dim, self.config.max_position_embeddings)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, pool: KVPool, batch: AttentionBatch
    ) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, hidden]; writes the T tokens' latents into the pool."""
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary(positions)
        for layer in self.model.layers:
            x = layer(x, cos, sin, pool, batch)
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> [N, vocab] float32."""
        return self.lm_head(hidden).float()
