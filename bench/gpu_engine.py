"""Parts logits, speculative and engine_7b of `python -m bench.gpu`: the engine itself on the device.

- logits: the default model's logits on the device (float32, TF32 off) against the CPU engine and against
  transformers on the device, same weights; bfloat16 against float32 for scale (CUDA only).
- speculative: a speculative edit on the device equals plain greedy, token for token.
- engine_7b: random bf16 weights at Qwen2.5-Coder-7B's shape made on the device: copy bandwidth and the
  bf16 matmul rate; decode step time at batch 1 and 32 with 4k-token contexts against the floor
  (weights + KV bytes read / memory bandwidth, where bandwidth = 2 x bytes copied per second: a copy reads
  and writes each byte); prefill tokens/s of a 4k prompt against the matmul rate (model FLOPs
  utilisation); verifying K draft tokens in one pass against a one-token step, K = 1..64; decode tokens/s
  of transformers' generate on the same weights (`versus_transformers`).

With --quick the 7B shape shrinks to a 2-layer model of hidden size 256 (a smoke test, not a figure).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from bench.gpu_common import CONTEXT_TOKENS, Settings, check, timed

VERIFY_KS = (1, 2, 4, 8, 16, 32, 64)
"""Draft lengths whose one-pass verification is timed against a one-token step."""


# ---- logits, speculative edits ------------------------------------------------------------------------


def part_logits(settings: Settings) -> dict[str, Any]:
    from kvmesh import default_model_path
    from kvmesh.engine.engine import Engine

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    figures: dict[str, Any] = {}
    path = default_model_path()
    cpu = Engine.from_pretrained(path)
    ids = cpu.tokenizer.encode(Path(json.__file__).read_text())[: 128 if settings.quick else 512]
    reference = cpu.logits(ids)
    device = Engine.from_pretrained(path, device=settings.device)
    ours = device.logits(ids).float().cpu()
    figures["max_abs_diff_vs_cpu"] = (ours - reference).abs().max().item()
    check(figures, "device float32 logits == CPU engine (atol 1e-3)", figures["max_abs_diff_vs_cpu"] < 1e-3)
    import transformers

    transformers.logging.set_verbosity_error()
    hf = (
        transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        .to(settings.device)
        .eval()
    )
    with torch.inference_mode():
        theirs = hf(input_ids=torch.tensor([ids], device=settings.device)).logits[0].float().cpu()
    figures["max_abs_diff_vs_transformers"] = (ours - theirs).abs().max().item()
    check(
        figures,
        "device float32 logits == transformers (atol 1e-3)",
        figures["max_abs_diff_vs_transformers"] < 1e-3,
    )
    if settings.device.startswith("cuda"):
        half = Engine.from_pretrained(path, dtype="bfloat16", device=settings.device)
        bf16 = half.logits(ids).float().cpu()
        figures["bf16_max_abs_diff_vs_fp32"] = (bf16 - ours).abs().max().item()
        figures["bf16_argmax_agreement"] = (bf16.argmax(-1) == ours.argmax(-1)).float().mean().item()
    return figures


EDIT_ORIGINAL = '''\
def parse_header(line):
    """Split a header line into its main value and a dict of parameters."""
    parts = line.split(";")
    key = parts[0].strip().lower()
    params = {}
    for part in parts[1:]:
        if "=" not in part:
            continue
        name, value = part.split("=", 1)
        params[name.strip().lower()] = value.strip()
    return key, params
'''


def part_speculative(settings: Settings) -> dict[str, Any]:
    from gateway.layout import PromptLayout
    from kvmesh import default_model_path
    from kvmesh.engine.engine import Engine
    from kvmesh.engine.generate import generate_speculative
    from kvmesh.engine.speculative import DraftCursor

    figures: dict[str, Any] = {}
    engine = Engine.from_pretrained(default_model_path(), device=settings.device)
    snippet = "        params[name.strip().lower()] = value.strip().strip('\"')\n"
    prompt = PromptLayout(engine.tokenizer).edit(EDIT_ORIGINAL, snippet)
    max_tokens = 40 if settings.quick else 300
    engine.generate(prompt.token_ids, 2)  # warm-up
    started = time.perf_counter()
    plain = engine.generate(prompt.token_ids, max_tokens)
    plain_s = time.perf_counter() - started
    started = time.perf_counter()
    cursor = DraftCursor.for_edit(prompt.draft_token_ids, prompt.token_ids)
    speculative, stats = generate_speculative(engine, prompt.token_ids, cursor, max_tokens)
    spec_s = time.perf_counter() - started
    figures.update(
        num_tokens=len(plain),
        plain_s=plain_s,
        speculative_s=spec_s,
        accepted_prediction_tokens=stats.accepted_prediction_tokens,
        rejected_prediction_tokens=stats.rejected_prediction_tokens,
    )
    check(figures, "speculative edit == plain greedy", speculative == plain, f"{len(plain)} tokens")
    return figures


# ---- engine_7b: the engine at Qwen2.5-Coder-7B's shape -------------------------------------------------


def model_config(quick: bool) -> Any:
    from kvmesh.engine.model_config import ModelConfig, RopeConfig

    config = ModelConfig(
        architecture="qwen2",
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        head_dim=128,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope=RopeConfig(theta=1_000_000.0),
        attention_bias=True,
        o_proj_bias=False,
        tie_word_embeddings=False,
        sliding_window=None,
        bos_token_id=None,
        eos_token_ids=(151643,),
    )
    if quick:
        small = {"vocab_size": 4096, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2}
        config = replace(config, **small, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
    return config


def random_model(config: Any, dtype: torch.dtype, device: str, seed: int = 0) -> Any:
    """The model with random weights made on the device (no checkpoint, nothing on the host)."""
    from kvmesh.engine.loader import build_model

    with torch.device("meta"):
        model = build_model(config)
    generator = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for name, param in model.named_parameters():
        keep = name.endswith(model.keep_float32) if model.keep_float32 else False
        tensor = torch.empty(param.shape, dtype=torch.float32 if keep else dtype, device=device)
        if "norm" in name:
            tensor.fill_(1.0)
        else:
            tensor.normal_(0.0, 0.02, generator=generator)
        state[name] = tensor
    model.load_state_dict(state, strict=False, assign=True)
    model.rotary = model.make_rotary()
    return model.to(device).eval()


def machine_limits(settings: Settings, dtype: torch.dtype, reps: int) -> tuple[float, float]:
    """(bytes copied per second device to device, dtype matmul FLOP/s), measured now."""
    num_elements = (64 << 20 if settings.quick else 1 << 30) // 2
    src = torch.empty(num_elements, dtype=torch.bfloat16, device=settings.device)
    dst = torch.empty_like(src)
    copy_s = timed(settings, lambda: dst.copy_(src), reps, 2)
    n = 1024 if settings.quick else 8192
    x = torch.randn(n, n, dtype=dtype, device=settings.device)
    matmul_s = timed(settings, lambda: x @ x, reps, 2)
    return num_elements * 2 / copy_s, 2 * n**3 / matmul_s


def part_engine_7b(settings: Settings, deadline: float) -> dict[str, Any]:
    from kvmesh import default_model_path
    from kvmesh.engine.config import EngineConfig
    from kvmesh.engine.engine import Engine
    from kvmesh.engine.tokenizer import Tokenizer

    figures: dict[str, Any] = {}
    device, quick = settings.device, settings.quick
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    context = 256 if quick else CONTEXT_TOKENS
    batch_sizes = (1, 4) if quick else (1, 32)
    reps = 3 if quick else 10

    copy_bytes_per_s, matmul_flops = machine_limits(settings, dtype, reps)
    figures.update(copy_bytes_per_s=copy_bytes_per_s, memory_bytes_per_s=2 * copy_bytes_per_s)
    figures.update(matmul_flops_per_s=matmul_flops, matmul_dtype=str(dtype))

    config = model_config(quick)
    model = random_model(config, dtype, device)
    params = dict(model.named_parameters())
    num_params = sum(p.numel() for p in params.values())
    embed = params["model.embed_tokens.weight"]
    weight_bytes = (
        sum(p.numel() * p.element_size() for p in params.values()) - embed.numel() * embed.element_size()
    )
    tokenizer = Tokenizer.from_file(default_model_path() / "tokenizer.json")
    num_tokens = max(batch_sizes) * (context + 80) + 2 * context
    engine_config = EngineConfig(
        block_size=16,
        num_blocks=num_tokens // 16 + 64,
        prefill_chunk_size=context,
        max_num_batched_tokens=context,
        max_num_seqs=max(batch_sizes),
        enable_prefix_caching=False,
    )
    engine = Engine(model, tokenizer, engine_config, model_fingerprint="bench-7b")
    engine.pool.kv.normal_(0.0, 1.0)  # KV the steps attend over; its values do not change the cost
    kv_per_token = engine.kv_bytes_per_token
    figures.update(
        model=f"qwen2 {config.num_hidden_layers}L hidden {config.hidden_size}",
        num_params=num_params,
        weight_bytes_read_per_step=weight_bytes,
        kv_bytes_per_token=kv_per_token,
    )
    generator = torch.Generator().manual_seed(0)

    def ids(count: int) -> list[int]:
        return torch.randint(16, config.vocab_size, (count,), generator=generator).tolist()

    # Decode steps over 4k-token contexts: the contexts' KV is taken as computed (the pool holds random
    # values), so only the step is timed, not a prefill of 32 x 4k tokens. The engine's own attention
    # backend (triton on CUDA) first; then SDPA over the same weights, and the decode passes replayed as
    # CUDA graphs, each with a pool of its own.
    figures["attention_backend"] = engine.attention_backend
    backends = [(engine, "")]
    variants: dict[str, dict[str, Any]] = {}
    if engine.attention_backend == "triton":
        variants = {"sdpa_": {"attention_backend": "sdpa"}, "graphs_": {"cuda_graphs": True}}
    for label, change in variants.items():
        started = time.perf_counter()
        other = Engine(model, tokenizer, replace(engine_config, **change), model_fingerprint="bench-7b")
        figures[f"{label}engine_setup_s"] = time.perf_counter() - started
        other.pool.kv.normal_(0.0, 1.0)
        backends.append((other, label))
    for batch in batch_sizes:
        for bench_engine, label in backends:
            if time.monotonic() > deadline:
                break
            seqs = []
            for _ in range(batch):
                seq = bench_engine.add_sequence(ids(context + 1), use_prefix_cache=False)
                bench_engine.reserve(seq, context + 64)
                seq.num_computed_tokens = context
                seqs.append(seq)

            def step(seqs: list = seqs, bench_engine: Engine = bench_engine) -> None:
                bench_engine.step(seqs)
                for seq in seqs:
                    seq.token_ids.append(17)

            step_s = timed(settings, step, reps, 3)
            floor_s = (weight_bytes + batch * context * kv_per_token) / (2 * copy_bytes_per_s)
            figures[f"{label}decode_b{batch}_step_ms"] = step_s * 1000
            figures[f"{label}decode_b{batch}_floor_ms"] = floor_s * 1000
            figures[f"{label}decode_b{batch}_vs_floor"] = step_s / floor_s
            for seq in seqs:
                bench_engine.free(seq)
    del backends[1:]  # the other engines' pools
    figures["goal_decode_b1_vs_floor"], figures["goal_decode_b32_vs_floor"] = 1.3, 1.6

    # Prefill of a 4k-token prompt, against the matmul rate.
    if time.monotonic() < deadline:
        prompt = ids(context)

        def prefill() -> None:
            seq = engine.add_sequence(prompt, use_prefix_cache=False)
            try:
                engine.prefill(seq)
            finally:
                engine.free(seq)

        prefill_s = timed(settings, prefill, 2 if quick else 3, 1)
        attention_flops = (
            2.0 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * context**2
        )
        flops = 2.0 * (num_params - embed.numel()) * context + attention_flops
        figures.update(
            prefill_tokens=context,
            prefill_tokens_per_s=context / prefill_s,
            prefill_flops_per_s=flops / prefill_s,
            prefill_vs_matmul=flops / prefill_s / matmul_flops,
            goal_prefill_vs_matmul=0.5,
        )

    # Verifying K draft tokens in one pass, against a one-token step, at a 4k context.
    if time.monotonic() < deadline:
        seq = engine.add_sequence(ids(context + 1), use_prefix_cache=False)
        engine.reserve(seq, context + 1 + max(VERIFY_KS))
        seq.num_computed_tokens = context
        del seq.token_ids[context:]
        verify: dict[str, float] = {}
        for k in VERIFY_KS:

            def verify_pass(k: int = k) -> None:
                seq.token_ids.extend([17] * k)
                engine.step([seq], all_logits=True)
                engine.truncate(seq, context)

            verify[str(k)] = timed(settings, verify_pass, reps, 2) * 1000
        engine.free(seq)
        figures["verify_ms_by_k"] = verify
        figures["verify_cost_vs_one_token_by_k"] = {k: ms / verify["1"] for k, ms in verify.items()}

    # transformers' generate on the same weights, and ours, decode tokens/s at batch 1.
    if time.monotonic() < deadline:
        figures.update(versus_transformers(settings, engine, model, config, ids(128)))
    return figures


def versus_transformers(settings: Settings, engine: Any, model: Any, config: Any, prompt: list[int]) -> dict:
    import transformers

    transformers.logging.set_verbosity_error()
    hf_config = transformers.Qwen2Config(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope.theta,
        tie_word_embeddings=False,
    )
    dtype = next(model.parameters()).dtype
    with torch.device(settings.device):
        hf = transformers.Qwen2ForCausalLM(hf_config).to(dtype).eval()
    missing, unexpected = hf.load_state_dict(dict(model.named_parameters()), strict=False, assign=True)
    if [m for m in missing if "rotary" not in m] or unexpected:
        raise RuntimeError(
            f"weights do not map onto transformers: missing {missing[:4]}, unexpected {unexpected[:4]}"
        )
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    new_tokens = 16 if settings.quick else 64
    input_ids = torch.tensor([prompt], device=settings.device)

    def theirs(n: int) -> None:
        with torch.inference_mode():
            hf.generate(input_ids=input_ids, do_sample=False, max_new_tokens=n, min_new_tokens=n)

    def ours(n: int) -> None:
        engine.generate(prompt, n, ignore_eos=True)

    rates = {}
    for name, run in (("ours", ours), ("transformers", theirs)):
        full = timed(settings, lambda run=run: run(new_tokens), 2, 1)
        first = timed(settings, lambda run=run: run(1), 2, 1)
        rates[name] = (new_tokens - 1) / max(full - first, 1e-9)
    return {
        "decode_b1_tokens_per_s": rates["ours"],
        "transformers_decode_b1_tokens_per_s": rates["transformers"],
        "decode_b1_vs_transformers": rates["ours"] / rates["transformers"],
        "goal_decode_b1_vs_transformers": 1.5,
    }
