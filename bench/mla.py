"""Multi-latent attention vs GQA: decode tokens/s at batch 32 over long contexts, same width and layers.

    python -m bench.mla [--context 1024] [--batch 32] [--steps 16] [--threads 2]

Two random checkpoints saved by transformers, of the same width and depth as bench/engine.py's model
(8 layers, hidden 512, 8 query heads, vocab 4096), dense MLPs (first_k_dense_replace covers every layer, so
the DeepSeek config's expert settings are unused): a DeepSeek-V2 with multi-latent attention
(kv_lora_rank 128 + rope 32: one 160-value latent per token and layer, DeepSeek-Coder-V2-Lite's 512 + 64
thinned) and a Llama with GQA (2 KV heads x 64: 256 values per token and layer for K and V). Both are
loaded by our engine; --batch sequences of --context random tokens are prefilled (not timed), then
--steps decode passes of the whole batch are timed, median of 3 runs. The baseline is the GQA model in the
same run; the ratio is MLA / GQA. KV bytes per token are printed beside (what MLA saves is the point: more
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


def decode_tokens_per_s(path: Path, args: argparse.Namespace) -> tuple[float, int]:
    """(decode tokens/s of the batch, KV bytes per token) for the checkpoint at path."""
    blocks = args.batch * (args.context + args.steps * 4 + 32) // 16 + 64
    engine = Engine.from_pretrained(path, config=EngineConfig(num_blocks=blocks, max_num_batched_tokens=4096))
    generator = torch.Generator().manual_seed(0)
    runs = []
    for _ in range(3):
        scheduler = Scheduler(engine)
        params = SamplingParams(max_new_tokens=args.steps * 4, ignore_eos=True)
        seqs = [
            engine.add_sequence(
                torch.randint(16, 4000, (args.context,), generator=generator).tolist(), params
            )
            for _ in range(args.batch)
        ]
        for seq in seqs:
            scheduler.add(seq)
        while any(s.num_uncomputed_tokens > 1 or not s.output_token_ids for s in seqs):  # prefill, untimed
            batch = scheduler.schedule()
            scheduler.postprocess(batch, engine.run(batch))
        started = time.perf_counter()
        for _ in range(args.steps):
            batch = scheduler.schedule()
            scheduler.postprocess(batch, engine.run(batch))
        runs.append(args.batch * args.steps / (time.perf_counter() - started))
        for seq in seqs:
            scheduler.abort(seq)
    return statistics.median(runs), engine.kv_bytes_per_token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=1024, help="tokens of context per sequence")
    parser.add_argument("--batch", type=int, default=32, help="sequences decoding together")
    parser.add_argument("--steps", type=int, default=16, help="timed decode passes")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_code_tokenizer(stdlib_corpus_files(50), vocab_size=MODEL_SHAPE["vocab_size"])
        gqa = write_random_checkpoint(Path(tmp) / "gqa", **MODEL_SHAPE, tokenizer=tokenizer, seed=0)
        mla = write_random_mla_checkpoint(Path(tmp) / "mla", tokenizer)
        gqa_rate, gqa_bytes = decode_tokens_per_s(gqa, args)
        mla_rate, mla_bytes = decode_tokens_per_s(mla, args)
    print(f"- Machine: {cpu_model_name()}, torch {torch.__version__} ({args.threads} threads)")
    print(
        f"- Command: `python -m bench.mla --context {args.context} --batch {args.batch} --steps {args.steps}`"
    )
    print("| attention | KV bytes per token (fp32) | decode tokens/s | vs GQA |")
    print("|---|---:|---:|---:|")
    print(f"| GQA (2 KV heads x 64) | {gqa_bytes:,} | {gqa_rate:,.0f} | 1.00 |")
    print(f"| MLA (latent 128 + rope 32) | {mla_bytes:,} | {mla_rate:,.0f} | {mla_rate / gqa_rate:.2f} |")


if __name__ == "__main__":
    main()
