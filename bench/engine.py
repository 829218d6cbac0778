"""Engine speed against `transformers` on the same weights, in the same run; and KV bytes per token.

    python -m bench.engine [--quick] [--threads N] [--model llama|moe]

Writes a random Llama checkpoint sized like a small real model (8 layers, hidden 512, 8 query heads over 2
KV heads, vocab 4096) into a temporary folder, loads it in our engine and in `transformers`
(`LlamaForCausalLM`, float32, its default attention), and prints a markdown table of ratios for
bench/RESULTS.md. With `--model moe` the checkpoint is instead a random Qwen3-MoE (the architecture of
Qwen3-Coder-30B-A3B) that `transformers` itself writes, at the same width, with MOE_SHAPE's experts:

- prefill: one 1024-token prompt, last-token logits (ours: the chunked, paged prefill; theirs: one forward).
- decode: `generate_batch(ignore_eos=True)` vs `generate(do_sample=False)` with eos disabled, at batch 1, 8
  and 32, the same prompt lengths (left-padded for transformers). Decode time is the time to generate N
  tokens minus the time to generate 1 (which is prefill plus the first token), so prefill is not counted.

Every measure runs once to warm up, then the median of a few repeats is reported.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from kvmesh.engine.engine import Engine
from kvmesh.engine.kv_cache import KVLayout
from training.checkpoint import stdlib_corpus_files, train_code_tokenizer, write_random_checkpoint

MODEL_SHAPE = {
    "vocab_size": 4096,
    "hidden_size": 512,
    "intermediate_size": 1376,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
}
PREFILL_LEN = 1024
DECODE_BATCH_SIZES = (1, 8, 32)
DECODE_PROMPT_LENS = (64, 192)
"""Decode prompts have lengths spread over this range (so transformers has to pad)."""

MOE_SHAPE = {
    "num_experts": 16,
    "num_experts_per_tok": 4,
    "moe_intermediate_size": 256,
    "norm_topk_prob": True,
}
"""--model moe: experts of the random Qwen3-MoE (16 experts, top-4, as Qwen3-Coder-30B-A3B's 128 / top-8 thinned)."""

# 7B-class shapes whose KV footprint the GQA / MQA choice changes; fp16, as served.
KV_SHAPES = {
    "MHA (32 layers, 32 KV heads, head dim 128)": (32, 32, 128),
    "GQA (32 layers, 8 KV heads, head dim 128)": (32, 8, 128),
    "MQA (32 layers, 1 KV head, head dim 128)": (32, 1, 128),
}
# Real models' KV descriptions, from their published config.json; bf16, as served.
KV_MODELS = {
    "Qwen2.5-Coder-7B (dense, GQA: 28 layers, 4 KV heads x 128)": KVLayout(28, 1, 16, 4, 128, torch.bfloat16),
    "Qwen3-Coder-30B-A3B (MoE, GQA: 48 layers, 4 KV heads x 128)": KVLayout(
        48, 1, 16, 4, 128, torch.bfloat16
    ),
    "DeepSeek-Coder-V2-Lite (MoE, MLA: 27 layers, latent 512 + rope 64)": KVLayout(
        27, 1, 16, 1, 512 + 64, torch.bfloat16, latent=True
    ),
    "DeepSeek-V3 (MoE, MLA: 61 layers, latent 512 + rope 64)": KVLayout(
        61, 1, 16, 1, 512 + 64, torch.bfloat16, latent=True
    ),
}
SHIPPED_PROMPT_TOKENS = 4096
"""The prompt whose KV a prefill worker ships to a decode worker, in the table above."""


@dataclass(frozen=True)
class Settings:
    num_repeats: int
    num_new_tokens: int


def median_seconds(fn: Callable[[], object], num_repeats: int) -> float:
    """Run fn once to warm up, then return the median wall time of num_repeats runs."""
    fn()
    times = []
    for _ in range(num_repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_model_name() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    for line in lscpu.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def decode_prompts(batch_size: int, generator: torch.Generator) -> list[list[int]]:
    low, high = DECODE_PROMPT_LENS
    lengths = [low + (i * 37) % (high - low + 1) for i in range(batch_size)]
    return [random_ids(n, generator) for n in lengths]


def random_ids(num_tokens: int, generator: torch.Generator) -> list[int]:
    # Ids past the special tokens; the weights are random, so the text would not matter anyway.
    return torch.randint(16, MODEL_SHAPE["vocab_size"], (num_tokens,), generator=generator).tolist()


class Ours:
    def __init__(self, path: Path) -> None:
        self.engine = Engine.from_pretrained(path, dtype="float32")

    def prefill(self, token_ids: list[int]) -> None:
        # NOTE: the same prompt every repeat: without use_prefix_cache=False the repeats are cache hits.
        seq = self.engine.add_sequence(token_ids, use_prefix_cache=False)
        try:
            self.engine.prefill(seq)
        finally:
            self.engine.free(seq)

    def generate(self, prompts: list[list[int]], num_new_tokens: int) -> None:
        outputs = self.engine.generate_batch(prompts, num_new_tokens, ignore_eos=True)
        assert all(len(output) == num_new_tokens for output in outputs)


class Theirs:
    def __init__(self, path: Path) -> None:
        import transformers

        transformers.logging.set_verbosity_error()
        self.model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.model.generation_config.eos_token_id = None  # like ignore_eos=True: always run the full length
        self.model.generation_config.pad_token_id = 0

    def prefill(self, token_ids: list[int]) -> None:
        with torch.inference_mode():
            self.model(input_ids=torch.tensor([token_ids]), logits_to_keep=1)

    def generate(self, prompts: list[list[int]], num_new_tokens: int) -> None:
        width = max(len(p) for p in prompts)
        input_ids = torch.zeros(len(prompts), width, dtype=torch.long)
        attention_mask = torch.zeros(len(prompts), width, dtype=torch.long)
        for row, prompt in enumerate(prompts):  # left padding: every prompt ends at the last column
            input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt) :] = 1
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                do_sample=False,
                max_new_tokens=num_new_tokens,
            )
        assert output.shape[1] == width + num_new_tokens


def prefill_tokens_per_s(impl: Ours | Theirs, settings: Settings) -> float:
    token_ids = random_ids(PREFILL_LEN, torch.Generator().manual_seed(1))
    return PREFILL_LEN / median_seconds(lambda: impl.prefill(token_ids), settings.num_repeats)


def decode_tokens_per_s(impl: Ours | Theirs, batch_size: int, settings: Settings) -> float:
    prompts = decode_prompts(batch_size, torch.Generator().manual_seed(batch_size))
    n = settings.num_new_tokens
    full = median_seconds(lambda: impl.generate(prompts, n), settings.num_repeats)
    first = median_seconds(lambda: impl.generate(prompts, 1), settings.num_repeats)
    return batch_size * (n - 1) / max(full - first, 1e-9)


def kv_table() -> list[str]:
    rows = ["| shape | KV bytes per token (fp16) | per 8k-token context |", "|---|---:|---:|"]
    for name, (num_layers, num_kv_heads, head_dim) in KV_SHAPES.items():
        layout = KVLayout(num_layers, 1, 16, num_kv_heads, head_dim, torch.float16)
        per_token = layout.bytes_per_token
        rows.append(
            f"| {name} | {per_token:,} ({per_token / 1024:g} KiB) | {per_token * 8192 / 2**30:g} GiB |"
        )
    rows += [
        "",
        f"| model | KV bytes per token (bf16) | a {SHIPPED_PROMPT_TOKENS // 1024}k-token prompt, prefill -> decode |",
        "|---|---:|---:|",
    ]
    for name, layout in KV_MODELS.items():
        shipped = -(-SHIPPED_PROMPT_TOKENS // layout.block_size) * layout.bytes_per_block
        rows.append(f"| {name} | {layout.bytes_per_token:,} | {shipped / 2**20:.0f} MiB |")
    return rows


def write_random_moe_checkpoint(path: Path, tokenizer: object, seed: int = 0) -> Path:
    """A random Qwen3-MoE saved by transformers itself (per-expert tensors, as real checkpoints hold them)."""
    import transformers

    config = transformers.Qwen3MoeConfig(
        **MODEL_SHAPE,
        **MOE_SHAPE,
        head_dim=MODEL_SHAPE["hidden_size"] // MODEL_SHAPE["num_attention_heads"],
        max_position_embeddings=4096,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(seed)
    model = transformers.Qwen3MoeForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0 if "norm" in name else 0.0, 0.1 if "norm" in name else param.shape[-1] ** -0.5)
    model.save_pretrained(path)
    tokenizer.save(str(path / "tokenizer.json"))  # type: ignore[attr-defined]
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repeat and 16 new tokens: a smoke run")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="torch threads (default: all cores)"
    )
    parser.add_argument(
        "--model", choices=("llama", "moe"), default="llama", help="the random checkpoint to compare on"
    )
    args = parser.parse_args()
    settings = (
        Settings(num_repeats=1, num_new_tokens=16)
        if args.quick
        else Settings(num_repeats=3, num_new_tokens=64)
    )
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory(prefix="kvmesh-bench-") as tmp:
        tokenizer = train_code_tokenizer(stdlib_corpus_files(50), vocab_size=MODEL_SHAPE["vocab_size"])
        if args.model == "moe":
            path = write_random_moe_checkpoint(Path(tmp) / "model", tokenizer)
        else:
            path = write_random_checkpoint(Path(tmp) / "model", **MODEL_SHAPE, tokenizer=tokenizer, seed=0)
        ours, theirs = Ours(path), Theirs(path)
        num_params = sum(p.numel() for p in ours.engine.model.parameters())
        rows: list[tuple[str, float, float]] = []
        print(f"prefill {PREFILL_LEN} tokens ...", file=sys.stderr)
        rows.append(
            (
                f"prefill, {PREFILL_LEN}-token prompt",
                prefill_tokens_per_s(ours, settings),
                prefill_tokens_per_s(theirs, settings),
            )
        )
        decode: dict[int, float] = {}
        for batch_size in DECODE_BATCH_SIZES:
            print(f"decode batch {batch_size} ...", file=sys.stderr)
            decode[batch_size] = decode_tokens_per_s(ours, batch_size, settings)
            rows.append(
                (
                    f"decode, batch {batch_size}",
                    decode[batch_size],
                    decode_tokens_per_s(theirs, batch_size, settings),
                )
            )
        kv_bytes_per_token = ours.engine.kv_bytes_per_token
        chunk = ours.engine.engine_config.prefill_chunk_size

    import transformers

    shape = MODEL_SHAPE
    lines = [
        f"## Engine vs transformers (CPU, float32, {args.model})",
        "",
        f"- Machine: {cpu_model_name()}, {os.cpu_count()} cores; torch {torch.__version__} "
        f"({args.threads} threads), transformers {transformers.__version__}, Python {platform.python_version()}",
        f"- Command: `python -m bench.engine{' --quick' if args.quick else ''} --threads {args.threads}"
        f" --model {args.model}`",
        f"- Model: random {'Qwen3-MoE' if args.model == 'moe' else 'Llama'}"
        + (
            f" ({MOE_SHAPE['num_experts']} experts, top-{MOE_SHAPE['num_experts_per_tok']}, "
            f"expert width {MOE_SHAPE['moe_intermediate_size']})"
            if args.model == "moe"
            else ""
        )
        + f", {shape['num_hidden_layers']} layers, hidden {shape['hidden_size']}, "
        f"{shape['num_attention_heads']} query / {shape['num_key_value_heads']} KV heads, "
        f"vocab {shape['vocab_size']}, {num_params / 1e6:.1f}M parameters; "
        f"our KV: {kv_bytes_per_token:,} bytes per token (fp32)",
        f"- Prefill: last-token logits of one prompt; ours in chunks of {chunk}. Decode: prompts of "
        f"{DECODE_PROMPT_LENS[0]}-{DECODE_PROMPT_LENS[1]} tokens, {settings.num_new_tokens} new tokens each, "
        "time for N tokens minus time for 1. transformers: its default attention, left padding, eos off.",
        f"- Median of {settings.num_repeats} after a warm-up run.",
        "",
        "| measure | kvmesh (tokens/s) | transformers (tokens/s) | kvmesh / transformers |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {name} | {ours_tps:,.0f} | {theirs_tps:,.0f} | {ours_tps / theirs_tps:.2f} |"
        for name, ours_tps, theirs_tps in rows
    ]
    lines += [
        "",
        f"kvmesh decode throughput, batch {DECODE_BATCH_SIZES[-1]} / batch 1: "
        f"{decode[DECODE_BATCH_SIZES[-1]] / decode[1]:.1f}x",
        "",
        *kv_table(),
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
