"""How an engine pages KV and batches work: the one declaration of these settings, passed down from the
worker's config (`kvmesh.mesh.worker_config.ModelSettings.engine`) or built by offline callers."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_KV_CACHE_BYTES = 256 * 1024 * 1024
ATTENTION_BACKENDS = ("auto", "sdpa", "triton")


@dataclass(frozen=True)
class EngineConfig:
    """The KV pool and the scheduler's limits; the model's shape comes from the checkpoint."""

    block_size: int = 16
    """Tokens per KV block."""
    num_blocks: int | None = None
    """KV pool size in blocks; when None, kv_cache_bytes decides."""
    kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES
    """KV pool size in bytes, used when num_blocks is None."""
    prefill_chunk_size: int = 512
    """Most prompt tokens one sequence computes in one forward pass, in tokens."""
    enable_prefix_caching: bool = True
    """Keep full blocks findable by hash after use, and reuse them for prompts that start the same way."""
    max_num_seqs: int = 32
    """Most sequences running at once, and so in one forward pass."""
    max_num_batched_tokens: int = 2048
    """Token budget of one forward pass: decodes, draft tokens to verify and prompt chunks together. A
    small budget keeps running streams' inter-token gaps short while prompts prefill beside them."""
    attention_backend: str = "auto"
    """"sdpa" (gather each sequence's blocks, then torch's SDPA per group of query lengths), "triton" (one
    kernel reads the pool in place: CUDA, K/V pools), or "auto": triton on CUDA when it can, else sdpa."""
    cuda_graphs: bool = False
    """Capture decode passes as CUDA graphs, one per batch size up to max_num_seqs, and replay them
    (`kvmesh.engine.cuda_graphs`); needs CUDA and the triton backend. Off by default until measured on a GPU."""

    def __post_init__(self) -> None:
        for name in ("block_size", "prefill_chunk_size", "max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if self.kv_cache_bytes < 1:
            raise ValueError(f"kv_cache_bytes must be >= 1, got {self.kv_cache_bytes}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {self.attention_backend!r}"
            )
