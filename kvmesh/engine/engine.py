"""The inference engine: a model, its tokenizer and its paged KV pool; it runs the forward pass a
scheduler (`kvmesh.engine.scheduler`) composed.

The sequence protocol the scheduler and the workers build on:

    seq = engine.add_sequence(prompt_ids, params)      # takes the blocks of its longest cached prefix
    engine.reserve(seq, len(seq))                       # grow its block table (all-or-nothing)
    logits = engine.run(batch)                          # one forward pass over a scheduled batch
    engine.append_token(seq, token)                     # -> FinishReason | None
    engine.truncate(seq, n)                             # roll back KV to n tokens (rejected drafts)
    engine.free(seq)                                    # blocks go back to the pool

`step`, `prefill` and `logits` are the same pass for one-off callers (tests, references, warm-up);
`generate` and `generate_batch` run the scheduler to completion (`kvmesh.engine.generate`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from collections.abc import Sequence as Seq
from pathlib import Path

import torch

from kvmesh.engine.attention import build_attention_batch
from kvmesh.engine.batch import Batch, ScheduledSeq
from kvmesh.engine.block_hash import hash_block, hash_blocks, model_fingerprint, namespace_hash
from kvmesh.engine.config import EngineConfig
from kvmesh.engine.cuda_graphs import DecodeGraphs
from kvmesh.engine.kv_cache import (
    KVLayout,
    KVPool,
    OutOfBlocks,
    PoolUsage,
    kv_layout_for,
    num_blocks_for_bytes,
    num_blocks_for_tokens,
)
from kvmesh.engine.loader import LanguageModel, load_model, parse_dtype
from kvmesh.engine.model_config import ModelConfig
from kvmesh.engine.sampling import SamplingParams, sample_batch
from kvmesh.engine.sequence import FinishReason, Sequence, StopChecker
from kvmesh.engine.tokenizer import Tokenizer
from kvmesh.engine.triton_attention import triton_available


def choose_attention_backend(config: EngineConfig, device: torch.device, layout: KVLayout) -> str:
    """The attention backend for an engine's pool: "auto" resolves to "triton" on CUDA with triton
    installed, else "sdpa". An explicit "triton" that cannot run is refused, saying why."""
    why_not = None
    if not triton_available():
        why_not = "triton is not installed"
    elif device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        why_not = (
            f"the kernel runs on CUDA (this engine is on {device}; TRITON_INTERPRET=1 runs its interpreter)"
        )
    elif layout.block_size & (layout.block_size - 1):
        why_not = f"the kernel needs a power-of-two block size (got {layout.block_size})"
    if config.attention_backend == "triton" and why_not:
        raise ValueError(f"attention_backend 'triton' cannot run: {why_not}")
    if config.attention_backend == "auto":
        return "triton" if why_not is None and device.type == "cuda" else "sdpa"
    return config.attention_backend


class Engine:
    def __init__(
        self,
        model: LanguageModel,
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
        layout = kv_layout_for(mc, config.block_size, self.dtype)
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
        self.attention_backend = choose_attention_backend(config, self.device, layout)
        self.decode_graphs: DecodeGraphs | None = None
        """Static-buffer decode passes (`kvmesh.engine.cuda_graphs`); with config.cuda_graphs, captured."""
        if config.cuda_graphs:
            self.decode_graphs = DecodeGraphs(self, capture=True)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: str | torch.dtype = "float32",
        device: str = "cpu",
        config: EngineConfig = EngineConfig(),
        make_pool_storage: Callable[[KVLayout], torch.Tensor] | None = None,
    ) -> Engine:
        """Load a local Hugging Face checkpoint directory (config.json, safetensors, tokenizer.json)."""
        path = Path(path)
        model = load_model(path, parse_dtype(dtype), device)
        tokenizer = Tokenizer.from_file(path / "tokenizer.json")
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
        seq.use_prefix_cache = use_prefix_cache
        seq.num_cached_tokens = self.match_prefix(seq)
        return seq

    def match_prefix(self, seq: Sequence) -> int:
        """Give a sequence that holds no blocks those of the longest cached prefix of its tokens (never all
        of them: the last token is always computed, for its logits); returns the tokens matched."""
        if seq.block_table:
            raise ValueError(f"sequence {seq.seq_id} already holds blocks")
        if not seq.use_prefix_cache:
            return 0
        num_blocks = (len(seq) - 1) // self.block_size
        hashes = hash_blocks(seq.namespace, seq.token_ids[: num_blocks * self.block_size], self.block_size)
        seq.block_table = self.pool.allocator.match(hashes, self.block_size)
        seq.block_hashes = hashes[: len(seq.block_table)]
        seq.num_computed_tokens = len(seq.block_table) * self.block_size
        return seq.num_computed_tokens

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

    def run(self, batch: Batch) -> list[torch.Tensor]:
        """The batch's forward pass. Every sequence's blocks must already cover its new tokens (the
        scheduler reserved them). Returns, per item, float32 logits of its last `num_logits` tokens
        ([num_logits, V]; [0, V] when it needs none)."""
        if not batch.items:
            return []
        seqs = batch.seqs
        num_new = [item.num_tokens for item in batch.items]
        for seq, n in zip(seqs, num_new, strict=True):
            if n < 1 or seq.num_computed_tokens + n > len(seq):
                raise ValueError(f"sequence {seq.seq_id} has no {n} uncomputed tokens")
            if self.num_blocks_needed(seq, seq.num_computed_tokens + n):
                raise ValueError(f"sequence {seq.seq_id} has no blocks reserved for {n} new tokens")
        graphs = self.decode_graphs
        decodes_only = num_new == [1] * len(seqs) and all(item.num_logits == 1 for item in batch.items)
        if graphs is not None and decodes_only and graphs.size_for(len(seqs)):
            return self._computed(seqs, num_new, list(graphs.run(seqs).split(1)))
        input_ids = [
            t
            for seq, n in zip(seqs, num_new, strict=True)
            for t in seq.token_ids[seq.num_computed_tokens : seq.num_computed_tokens + n]
        ]
        attention, positions = build_attention_batch(
            [seq.block_table for seq in seqs],
            [seq.num_computed_tokens for seq in seqs],
            num_new,
            self.block_size,
            self.config.sliding_window,
            self.device,
            self.attention_backend,
        )
        ends = torch.tensor(num_new).cumsum(0).tolist()
        rows = [
            i for item, end in zip(batch.items, ends, strict=True) for i in range(end - item.num_logits, end)
        ]
        with torch.inference_mode():
            hidden = self.model(torch.tensor(input_ids, device=self.device), positions, self.pool, attention)
            logits = self.model.logits(hidden[torch.tensor(rows, dtype=torch.int64, device=self.device)])
        return self._computed(seqs, num_new, list(torch.split(logits, [i.num_logits for i in batch.items])))

    def _computed(
        self, seqs: list[Sequence], num_new: list[int], out: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """After a pass: each sequence's new tokens are computed (and its full blocks findable); returns out."""
        for seq, n in zip(seqs, num_new, strict=True):
            seq.num_computed_tokens += n
            seq.num_forward_passes += 1
            self._cache_full_blocks(seq)
        return out

    def step(self, seqs: list[Sequence], *, all_logits: bool = False) -> list[torch.Tensor]:
        """One forward pass in which each sequence computes up to a prefill chunk of its uncomputed tokens,
        its blocks reserved first; for callers without a scheduler (references, tests, warm-up).

        Returns, per sequence, the logits of its last computed token ([V]), or of every token computed in
        this pass ([n, V]) with all_logits. Raises OutOfBlocks, having changed nothing, when the pool
        cannot hold the new tokens.
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
        items = [
            ScheduledSeq(seq, n, num_logits=n if all_logits else 1)
            for seq, n in zip(seqs, num_new, strict=True)
        ]
        logits = self.run(Batch(items))
        return logits if all_logits else [rows[-1] for rows in logits]

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
        seq.block_hashes = []
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
        """Generate for several prompts at once, through the scheduler (`kvmesh.engine.generate`)."""
        from kvmesh.engine.generate import generate_batch  # NOTE: generate builds on this module

        return [tokens for tokens, _ in generate_batch(self, prompts, max_new_tokens, **options)]
