"""Multi-latent attention vs GQA: decode tokens/s at batch 32 over long contexts, same width and layers.

    python -m bench.mla [--context 1024] [--batch 32] [--steps 16] [--rounds 5] [--threads 2]

Two random checkpoints saved by transformers, of the same width and depth as bench/engine.py's model
(8 layers, hidden 512, 8 query heads, vocab 4096), dense MLPs (first_k_dense_replace covers every layer, so
the DeepSeek config's expert settings are unused): a DeepSeek-V2 with multi-latent attention
(kv_lora_rank 128 + rope 32: one 160-value latent per token and layer, DeepSeek-Coder-V2-Lite's 512 + 64
thinned) and a Llama with GQA (2 KV heads x 64: 256 values per token and layer for K and V). Both are
loaded by our engine; --batch sequences of --context random tokens are prefilled in each (not timed), then
--rounds rounds each time a window of --steps decode passes of the whole batch on both models, the order
alternating. The baseline is the GQA model in the same run; the ratio is the median of the rounds'
MLA / GQA (paired: the machine's drift hits both). KV bytes per token are printed beside (what MLA saves is the point: more
cached prefixes, larger batches, less to ship).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.engine import MODEL_SHAPE, cpu_model_name
from kvmesh.engine.config import EngineConfig
from kvmesh.engine.engine import Engine
from kvmesh.engine.sampling import SamplingParams
from kvmesh.engine.scheduler import Scheduler
from training.checkpoint import stdlib_corpus_files, train_code_tokenizer, write_random_checkpoint

MLA_SHAPE = {"kv_lora_rank": 128, "qk_rope_head_dim": 32, "qk_nope_head_dim": 64, "v_head_dim": 64}


def write_random_mla_checkpoint(path: Path, tokenizer: object, seed: int = 0) -> Path:
    """A random dense DeepSeek-V2 (MLA, no experts) saved by transformers itself."""
    import transformers

    shape = {k: v for k, v in MODEL_SHAPE.items() if k != "num_key_value_heads"}
    config = transformers.DeepseekV2Config(
        **shape,
        **MLA_SHAPE,
        num_key_value_heads=MODEL_SHAPE["num_attention_heads"],
        q_lora_rank=None,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=256,
        first_k_dense_replace=MODEL_SHAPE["num_hidden_layers"],
        max_position_embeddings=8192,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(seed)
    model = transformers.DeepseekV2ForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0 if "norm" in name else 0.0, 0.1 if "norm" in name else param.shape[-1] ** -0.5)
    model.save_pretrained(path)
    tokenizer.save(str(path / "tokenizer.json"))  # type: ignore[attr-defined]
    return path


class PrefilledBatch:
    """A checkpoint's engine with --batch sequences of --context random tokens prefilled (untimed)."""

    def __init__(self, path: Path, args: argparse.Namespace) -> None:
        blocks = args.batch * (args.context + args.steps * (args.rounds + 1) + 32) // 16 + 64
        config = EngineConfig(num_blocks=blocks, max_num_batched_tokens=4096)
        self.engine = Engine.from_pretrained(path, config=config)
        self.scheduler = Scheduler(self.engine)
        self.steps = args.steps
        generator = torch.Generator().manual_seed(0)
        params = SamplingParams(max_new_tokens=args.steps * (args.rounds + 1), ignore_eos=True)
        self.seqs = [
            self.engine.add_sequence(
                torch.randint(16, 4000, (args.context,), generator=generator).tolist(), params
            )
            for _ in range(args.batch)
        ]
        for seq in self.seqs:
            self.scheduler.add(seq)
        while any(s.num_uncomputed_tokens > 1 or not s.output_token_ids for s in self.seqs):
            self.pass_()

    def pass_(self) -> None:
        batch = self.scheduler.schedule()
        self.scheduler.postprocess(batch, self.engine.run(batch))

    def window(self) -> float:
        """Decode tokens/s of the whole batch over --steps passes."""
        started = time.perf_counter()
        for _ in range(self.steps):
            self.pass_()
        return len(self.seqs) * self.steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=1024, help="tokens of context per sequence")
    parser.add_argument("--batch", type=int, default=32, help="sequences decoding together")
    parser.add_argument("--steps", type=int, default=16, help="decode passes per timed window")
    parser.add_argument("--rounds", type=int, default=5, help="paired windows (GQA, MLA) timed")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_code_tokenizer(stdlib_corpus_files(50), vocab_size=MODEL_SHAPE["vocab_size"])
        gqa = write_random_checkpoint(Path(tmp) / "gqa", **MODEL_SHAPE, tokenizer=tokenizer, seed=0)
        mla = write_random_mla_checkpoint(Path(tmp) / "mla", tokenizer)
        gqa_batch, mla_batch = PrefilledBatch(gqa, args), PrefilledBatch(mla, args)
        gqa_batch.pass_(), mla_batch.pass_()  # warm-up
        rates: list[tuple[float, float]] = []
        for round_ in range(args.rounds):  # paired windows, the order alternating: noise hits both alike
            order = [gqa_batch, mla_batch] if round_ % 2 == 0 else [mla_batch, gqa_batch]
            window = {id(b): b.window() for b in order}
            rates.append((window[id(gqa_batch)], window[id(mla_batch)]))
        gqa_bytes, mla_bytes = gqa_batch.engine.kv_bytes_per_token, mla_batch.engine.kv_bytes_per_token
    gqa_rate = statistics.median(g for g, _ in rates)
    mla_rate = statistics.median(m for _, m in rates)
    ratio = statistics.median(m / g for g, m in rates)
    spread = f"{min(m / g for g, m in rates):.2f}-{max(m / g for g, m in rates):.2f}"
    print(f"- Machine: {cpu_model_name()}, torch {torch.__version__} ({args.threads} threads)")
    print(
        f"- Command: `python -m bench.mla --context {args.context} --batch {args.batch} --steps {args.steps}"
        f" --rounds {args.rounds}`; MLA / GQA per round: median {ratio:.2f}, range {spread}"
    )
    print("| attention | KV bytes per token (fp32) | decode tokens/s | vs GQA |")
    print("|---|---:|---:|---:|")
    print(f"| GQA (2 KV heads x 64) | {gqa_bytes:,} | {gqa_rate:,.0f} | 1.00 |")
    print(f"| MLA (latent 128 + rope 32) | {mla_bytes:,} | {mla_rate:,.0f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
