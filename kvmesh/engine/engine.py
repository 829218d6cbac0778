"""The inference engine: a model, its tokenizer and its paged KV pool, driven a batch at a time.

The protocol the workers build on:

    seq = engine.add_sequence(prompt_ids, params)      # no blocks yet
    engine.reserve(seq, len(seq))                       # optional: take every prompt block up front
    logits = engine.step([seq, ...])                    # each seq computes up to a chunk of its new tokens
    engine.append_token(seq, token)                     # -> FinishReason | None
    engine.truncate(seq, n)                             # roll back KV to n tokens (rejected drafts)
    engine.free(seq)                                    # blocks go back to the pool

`generate` and `generate_batch` are that loop, for callers that want the whole answer.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from pathlib import Path

import torch

from kvmesh.engine.attention import build_attention_batch
from kvmesh.engine.block_hash import hash_block, hash_blocks, model_fingerprint, namespace_hash
from kvmesh.engine.kv_cache import (
    KVLayout,
    KVPool,
    OutOfBlocks,
    PoolUsage,
    num_blocks_for_bytes,
    num_blocks_for_tokens,
)
from kvmesh.engine.loader import load_model, parse_dtype
from kvmesh.engine.model import CausalLM
from kvmesh.engine.model_config import ModelConfig
from kvmesh.engine.sampling import SamplingParams, sample_batch
from kvmesh.engine.sequence import FinishReason, Sequence, StopChecker
from kvmesh.engine.tokenizer import Tokenizer

DEFAULT_KV_CACHE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class EngineConfig:
    """How the engine pages and batches; the model's shape comes from the checkpoint."""

    block_size: int = 16
    """Tokens per KV block."""
    num_blocks: int | None = None
    """KV pool size in blocks; when None, kv_cache_bytes decides."""
    kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES
    """KV pool size in bytes, used when num_blocks is None."""
    prefill_chunk_size: int = 512
    """Most prompt tokens one sequence computes in one forward pass."""
    enable_prefix_caching: bool = True
    """Keep full blocks findable by hash after use, and reuse them for prompts that start the same way."""


class Engine:
    def __init__(
        self,
        model: CausalLM,
        tokenizer: Tokenizer,
        config: EngineConfig = EngineConfig(),
        make_pool_storage: Callable[[KVLayout], torch.Tensor] | None = None,
        model_fingerprint: str = "",
    ) -> None:
        """model_fingerprint names the weights in every block hash (`kvmesh.engine.block_hash.model_fingerprint`).
        make_pool_storage, when given, allocates the pool tensor for the layout the engine decides on
        (shared memory, so that another process can write KV straight into it)."""
        self.model = model
        self.tokenizer = tokenizer
        self.engine_config = config
        param = next(model.parameters())
        self.device = param.device
        self.dtype = param.dtype
        mc = model.config
        layout = KVLayout(
            mc.num_hidden_layers, 1, config.block_size, mc.num_key_value_heads, mc.head_dim, self.dtype
        )
        num_blocks = config.num_blocks or num_blocks_for_bytes(layout, config.kv_cache_bytes)
        if num_blocks < 1:
            raise ValueError(
                f"a KV budget of {config.kv_cache_bytes} bytes holds no block of {layout.bytes_per_block}"
            )
        layout = layout.with_blocks(num_blocks)
        storage = make_pool_storage(layout) if make_pool_storage else None
        self.pool = KVPool(layout, self.device, storage, config.enable_prefix_caching)
        self.model_fingerprint = model_fingerprint or model.config.fingerprint()
        self.stop_checker = StopChecker(tokenizer, mc.eos_token_ids, mc.max_position_embeddings)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: str | torch.dtype = "float32",
        device: str = "cpu",
        *,
        block_size: int = 16,
        num_blocks: int | None = None,
        kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES,
        prefill_chunk_size: int = 512,
        enable_prefix_caching: bool = True,
        make_pool_storage: Callable[[KVLayout], torch.Tensor] | None = None,
    ) -> Engine:
        """Load a local Hugging Face checkpoint directory (config.json, safetensors, tokenizer.json)."""
        path = Path(path)
        model = load_model(path, parse_dtype(dtype), device)
        tokenizer = Tokenizer.from_file(path / "tokenizer.json")
        config = EngineConfig(
            block_size, num_blocks, kv_cache_bytes, prefill_chunk_size, enable_prefix_caching
        )
        return cls(model, tokenizer, config, make_pool_storage, model_fingerprint(path))

    # ---- what the engine reports -------------------------------------------------------------

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def kv_bytes_per_token(self) -> int:
        return self.pool.layout.bytes_per_token

    @property
    def block_size(self) -> int:
        return self.pool.layout.block_size

    def pool_usage(self) -> PoolUsage:
        return self.pool.usage()

    # ---- the sequence protocol ---------------------------------------------------------------

    def add_sequence(
        self,
        prompt_token_ids: Seq[int],
        params: SamplingParams = SamplingParams(),
        *,
        cache_salt: str = "",
        use_prefix_cache: bool = True,
    ) -> Sequence:
        """A new sequence. It starts with the blocks of the longest cached prefix of its prompt (counted in
        `seq.num_cached_tokens`), never the whole prompt: the last prompt token is always computed, for its
        logits. Raises ValueError when the prompt does not fit the context."""
        limit = self.config.max_position_embeddings
        if len(prompt_token_ids) >= limit:
            raise ValueError(f"prompt has {len(prompt_token_ids)} tokens; the model's context is {limit}")
        seq = Sequence(list(prompt_token_ids), params, self.device)
        seq.namespace = namespace_hash(self.model_fingerprint, cache_salt)
        if use_prefix_cache:
            num_blocks = (len(seq) - 1) // self.block_size
            hashes = hash_blocks(
                seq.namespace, seq.token_ids[: num_blocks * self.block_size], self.block_size
            )
            seq.block_table = self.pool.allocator.match(hashes, self.block_size)
            seq.block_hashes = hashes[: len(seq.block_table)]
            seq.num_computed_tokens = seq.num_cached_tokens = len(seq.block_table) * self.block_size
        return seq

    def num_blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks `seq` must still take for its KV to cover `num_tokens` tokens."""
        return max(0, num_blocks_for_tokens(num_tokens, self.block_size) - len(seq.block_table))

    def can_reserve(self, seq: Sequence, num_tokens: int) -> bool:
        return self.pool.allocator.can_allocate(self.num_blocks_needed(seq, num_tokens))

    def reserve(self, seq: Sequence, num_tokens: int) -> None:
        """Grow seq's block table to cover `num_tokens` tokens. Raises OutOfBlocks, taking nothing."""
        needed = self.num_blocks_needed(seq, num_tokens)
        if needed:
            seq.block_table.extend(self.pool.allocator.allocate(needed))

    def step(self, seqs: list[Sequence], *, all_logits: bool = False) -> list[torch.Tensor]:
        """One forward pass over a batch: each sequence computes up to a prefill chunk of its uncomputed tokens.

        Returns, per sequence, the float32 logits of its last computed token ([V]), or of every token
        computed in this pass ([n, V]) with all_logits (speculative verification). Raises OutOfBlocks
        before running anything when the pool cannot hold the new tokens.
        """
        chunk = self.engine_config.prefill_chunk_size
        num_new = [min(seq.num_uncomputed_tokens, chunk) for seq in seqs]
        if min(num_new) < 1:
            raise ValueError("every sequence in a step needs at least one uncomputed token")
        needed = sum(
            self.num_blocks_needed(s, s.num_computed_tokens + n) for s, n in zip(seqs, num_new, strict=True)
        )
        if not self.pool.allocator.can_allocate(needed):
            raise OutOfBlocks(needed, self.pool.allocator.num_free)
        for seq, n in zip(seqs, num_new, strict=True):
            self.reserve(seq, seq.num_computed_tokens + n)

        input_ids = [
            t
            for seq, n in zip(seqs, num_new, strict=True)
            for t in seq.token_ids[seq.num_computed_tokens :][:n]
        ]
        batch, positions = build_attention_batch(
            [seq.block_table for seq in seqs],
            [seq.num_computed_tokens for seq in seqs],
            num_new,
            self.block_size,
            self.config.sliding_window,
            self.device,
        )
        with torch.inference_mode():
            hidden = self.model(torch.tensor(input_ids, device=self.device), positions, self.pool, batch)
            if all_logits:
                out = list(torch.split(self.model.logits(hidden), num_new))
            else:
                ends = torch.tensor(num_new, device=self.device).cumsum(0)
                out = list(self.model.logits(hidden[ends - 1]).unbind(0))
        for seq, n in zip(seqs, num_new, strict=True):
            seq.num_computed_tokens += n
            self._cache_full_blocks(seq)
        return out

    def _cache_full_blocks(self, seq: Sequence) -> None:
        """Hash the blocks of seq that became full and computed, and make them findable."""
        block_size = self.block_size
        while len(seq.block_hashes) < seq.num_computed_tokens // block_size:
            index = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else seq.namespace
            block_hash = hash_block(parent, seq.token_ids[index * block_size : (index + 1) * block_size])
            seq.block_hashes.append(block_hash)
            self.pool.allocator.cache_block(seq.block_table[index], block_hash)

    def sample(self, seqs: list[Sequence], logits: list[torch.Tensor]) -> list[int]:
        """One next token per sequence from its last-token logits."""
        return sample_batch(torch.stack(logits), [s.params for s in seqs], [s.generator for s in seqs])

    def append_token(self, seq: Sequence, token_id: int) -> FinishReason | None:
        """Add a generated token (its KV is computed by the next step); returns why seq stops, if it does."""
        seq.token_ids.append(token_id)
        return self.stop_checker.check(seq)

    def truncate(self, seq: Sequence, num_tokens: int) -> None:
        """Roll seq back to its first `num_tokens` tokens: later tokens and their KV are dropped, and
        blocks no longer needed return to the pool. The kept tokens' KV is untouched."""
        if num_tokens > len(seq.token_ids):
            raise ValueError(f"cannot truncate a {len(seq)}-token sequence to {num_tokens}")
        del seq.token_ids[num_tokens:]
        seq.num_computed_tokens = min(seq.num_computed_tokens, num_tokens)
        allocator = self.pool.allocator
        keep = num_blocks_for_tokens(num_tokens, self.block_size)
        if keep < len(seq.block_table):
            allocator.free(seq.block_table[keep:])
            del seq.block_table[keep:]
        num_full = num_tokens // self.block_size
        if num_full < len(seq.block_hashes):
            # The block the cut falls in will be rewritten: it must stop being findable by its old hash,
            # and a block someone else also reads gets a private copy first.
            partial = seq.block_table[num_full] if num_full < keep else None
            if partial is not None and allocator.ref_count(partial) > 1:
                [private] = allocator.allocate(1)
                self.pool.kv[:, :, private].copy_(self.pool.kv[:, :, partial])
                allocator.free([partial])
                seq.block_table[num_full] = private
            elif partial is not None:
                allocator.uncache_block(partial)
            del seq.block_hashes[num_full:]
        seq.finish_reason = None

    def free(self, seq: Sequence) -> None:
        """Return all of seq's blocks to the pool. Safe to call twice."""
        if seq.block_table:
            self.pool.allocator.free(seq.block_table)
            seq.block_table = []
        seq.num_computed_tokens = 0

    # ---- whole answers ----------------------------------------------------------------------

    def prefill(self, seq: Sequence) -> torch.Tensor:
        """Compute all of seq's uncomputed tokens, a chunk per pass; returns the last token's logits [V]."""
        logits = self.step([seq])[0]
        while seq.num_uncomputed_tokens:
            logits = self.step([seq])[0]
        return logits

    def logits(self, token_ids: Seq[int]) -> torch.Tensor:
        """[len(token_ids), V] float32 logits of a prompt, computed through the paged, chunked path."""
        seq = self.add_sequence(token_ids, use_prefix_cache=False)
        try:
            parts = []
            while seq.num_uncomputed_tokens:
                parts.append(self.step([seq], all_logits=True)[0])
            return torch.cat(parts)
        finally:
            self.free(seq)

    def generate(self, token_ids: Seq[int], max_new_tokens: int, **options: object) -> list[int]:
        """Generate after a prompt; returns only the new token ids (greedy unless options say otherwise).

        options are SamplingParams fields: ignore_eos, temperature, top_p, top_k, seed, stop_token_ids,
        stop_strings. A stop or end-of-sequence token ends the output and is included in it.
        """
        return self.generate_batch([token_ids], max_new_tokens, **options)[0]

    def generate_batch(
        self, prompts: Seq[Seq[int]], max_new_tokens: int, **options: object
    ) -> list[list[int]]:
        """Generate for several prompts at once: each is prefilled alone, then all decode in one batch."""
        params = SamplingParams.from_options(max_new_tokens, **options)
        seqs = [self.add_sequence(prompt, params) for prompt in prompts]
        try:
            if max_new_tokens == 0:
                return [[] for _ in seqs]
            running = []
            for seq in seqs:
                token = self.sample([seq], [self.prefill(seq)])[0]
                if self.append_token(seq, token) is None:
                    running.append(seq)
            while running:
                tokens = self.sample(running, self.step(running))
                running = [
                    seq for seq, t in zip(running, tokens, strict=True) if self.append_token(seq, t) is None
                ]
            return [seq.output_token_ids for seq in seqs]
        finally:
            for seq in seqs:
                self.free(seq)
