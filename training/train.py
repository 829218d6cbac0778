"""Train kvmesh's default model: a small Llama (GQA) code model for SPM completion and apply-edit.

    python scripts/train_default_model.py            # writes kvmesh/models/default; picks the recipe:
        # --recipe gpu where CUDA is (the shipped model: 6 layers, 9 minutes on an H100)
        # --recipe cpu elsewhere (4 layers, 82 minutes on 2 CPU cores: a smaller, weaker model)
    python scripts/train_default_model.py --resume   # go on from the last checkpoint in --work

Data: the CPython standard library of the running interpreter or of --stdlib DIR (test suites left out;
the shipped model's is CPython 3.11's, copied to the GPU machine), split by file: a
file whose path hashes to 0 mod 10 is held out for evaluation (scripts/eval_default_model.py). Cut into
"files" of 3-80 lines (runs of whole statements of one block, dedented; training.edit_data).

Tokenizer: byte-level BPE, 4,096 tokens, trained on the training files, with the FIM and apply-edit
special tokens (training.checkpoint.train_code_tokenizer).

Tasks, laid out exactly as the gateway lays out requests (gateway.layout.PromptLayout), loss on the
answer only:
- apply-edit: original + fast-apply snippet -> the whole updated file, then <|endoftext|>; synthetic
  edits with new text drawn from other code (training.edit_data, EditStyle);
- copy: the same layout with a snippet of one "# ... existing code ..." marker (nothing to change), of
  whole files, of token runs cut anywhere, and, first of all, of uniformly random tokens;
- fill-in-the-middle in SPM order: the middle (rest of a line, or 1-3 lines), then <|endoftext|>.

Curriculum (PHASES): random-token copies first. On code, the model first learns what next-token
statistics give (about a third of the tokens) and is slow to find copying; random tokens leave it
nothing but looking the next token up in the original, which it learns in ~100 steps and then reuses.
It must be learned to the end there (a circuit half formed is dropped as soon as code offers next-token
statistics), and random-token copies stay in the mix later to keep it. Then short code files, then files
up to 40 lines, then some up to 80. Stage 2 (--polish-steps) restarts the learning rate on mostly edits,
files up to 120 lines, and answers whose inputs carry a wrong token now and then (corrupt): without it
the model, once it emits one wrong token, loses its place in the original and loops. Every step's data
comes from Random(seed, step), so a resumed run sees the same batches as an uninterrupted one. A
checkpoint is written every --checkpoint-every steps into --work; the finished model is exported as a
Hugging Face checkpoint. On a GPU, worker processes make the batches ahead of the model (--workers), the
model runs in bf16 autocast (fp32 weights and optimizer), and batches are padded to a multiple of 64
tokens so that few distinct shapes reach the kernels.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from kvmesh.engine.special_tokens import END_OF_TEXT, SPECIAL_TOKENS
from kvmesh.engine.tokenizer import Tokenizer
from training.checkpoint import (
    llama_config,
    train_code_tokenizer,
    write_checkpoint,
)
from training.default_model_data import Corpus, Example, ExampleMaker, corpus_files

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "kvmesh" / "models" / "default"
MODEL_SHAPE = {
    "vocab_size": 4096,
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 6,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
}
MAX_POSITION_EMBEDDINGS = 8192


@dataclass(frozen=True)
class Phase:
    until: float
    """Fraction of the steps this phase ends at."""
    lines: tuple[int, int]
    long_lines: tuple[int, int] | None
    """Some batches take files of this many lines instead."""
    mix: tuple[float, ...]
    """Shares of TASKS: edit, copy, fill-in-the-middle, token-chunk copy, random-token copy and
    repetitive random-token copy or edit examples (missing ones are 0)."""
    long_share: float = 0.25
    """Share of batches that take long_lines."""
    noise: float = 0.0
    """Per answer token, the chance that a run of 1-3 of the answer's input tokens is replaced (see corrupt)."""


PHASES = (
    Phase(0.3, (3, 16), None, (0.0, 0.0, 0.0, 0.0, 1.0)),
    Phase(0.4, (3, 16), None, (0.3, 0.1, 0.1, 0.3, 0.2)),
    Phase(0.7, (4, 40), None, (0.65, 0.05, 0.15, 0.05, 0.1)),
    Phase(1.0, (4, 40), (40, 80), (0.65, 0.05, 0.15, 0.05, 0.1)),
)
# Stage 2 (--polish-steps, fractions of those steps): a warm restart of the learning rate on mostly
# edits, longer files (up to 120 lines, as real files run) and corrupted answer inputs, so the model learns
# to find its place in the original again after a wrong token instead of looping or drifting.
POLISH_PHASES = (
    Phase(
        1.0,
        (6, 40),
        (40, 120),
        (0.6, 0.05, 0.1, 0.0, 0.05, 0.2),
        long_share=0.35,
        noise=0.02,
    ),
)
# What the shipped model was trained with (gpu), and what fits 90 minutes on a 2-core CPU (cpu: the
# model shipped before, 4 layers; see the model card for both's held-out figures).
RECIPES = {
    "gpu": {"layers": 6, "steps": 5419, "polish_steps": 8130, "batch_tokens": 24576},
    "cpu": {"layers": 4, "steps": 1500, "polish_steps": 1300, "batch_tokens": 6144},
}
TASKS = ("edit", "copy", "fim", "chunk", "random", "repetitive")
CHUNK_TOKENS = (32, 128)
RANDOM_TOKENS = (48, 80)


def make_batch(maker: ExampleMaker, rng: random.Random, phase: Phase, batch_tokens: int) -> list[Example]:
    lines = phase.lines
    if phase.long_lines and rng.random() < phase.long_share:
        lines = phase.long_lines
    # One size per batch, so the padding is small.
    top = rng.randint(*lines)
    low = max(lines[0], int(top * 0.75))
    examples: list[Example] = []
    longest = 0
    while True:
        task = rng.choices(TASKS[: len(phase.mix)], weights=phase.mix)[0]
        if task == "edit":
            example = maker.edit(rng, low, top)
        elif task == "random":
            example = maker.copy_random_tokens(rng, *RANDOM_TOKENS)
        elif task == "chunk":
            example = maker.copy_chunk(rng, *CHUNK_TOKENS)
        elif task == "repetitive":
            example = maker.repetitive(rng, low, top)
        elif task == "copy":
            example = maker.copy(rng, low, top)
        else:
            example = maker.fill_in_the_middle(rng, min(2 * low, 80), min(2 * top, 80))
        longest = max(longest, len(example.token_ids))
        if examples and longest * (len(examples) + 1) > batch_tokens:
            return examples
        examples.append(example)


def collate(
    examples: list[Example], pad_id: int, inputs_from: list[Example] | None = None, pad_to: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs, targets and the loss mask, right-padded to a multiple of pad_to (causal attention never
    sees the padding). The inputs come from inputs_from (corrupted copies of the examples) where given."""
    width = -(-(max(len(e.token_ids) for e in examples) - 1) // pad_to) * pad_to
    inputs = torch.full((len(examples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.bool)
    for row, example in enumerate(examples):
        ids = torch.tensor(example.token_ids)
        source = torch.tensor((inputs_from or examples)[row].token_ids)
        inputs[row, : len(ids) - 1] = source[:-1]
        targets[row, : len(ids) - 1] = ids[1:]
        mask[row, example.answer_start - 1 : len(ids) - 1] = True
    return inputs, targets, mask


def corrupt(examples: list[Example], rng: random.Random, rate: float) -> list[Example]:
    """Inputs with runs of 1-3 answer tokens replaced by a token of the prompt or any token: what a model's
    own mistake looks like to it. collate takes the targets from the clean examples, so after a wrong
    token the model is taught to go on with the right one, found again by the longer context."""
    noisy = []
    for example in examples:
        ids = list(example.token_ids)
        prompt = ids[: example.answer_start]
        # Never the last answer token (<|endoftext|>): it is only a target.
        position = example.answer_start
        while position < len(ids) - 1:
            if rng.random() >= rate:
                position += 1
                continue
            end = min(position + rng.randint(1, 3), len(ids) - 1)
            for i in range(position, end):
                if rng.random() < 0.5:
                    ids[i] = rng.choice(prompt)
                else:
                    ids[i] = rng.randrange(len(SPECIAL_TOKENS), MODEL_SHAPE["vocab_size"])
            position = end + 1
        noisy.append(Example(ids, example.answer_start))
    return noisy


# --- model and training ------------------------------------------------------------------------------


def build_model(tokenizer: Tokenizer, seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        **MODEL_SHAPE,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        tie_word_embeddings=True,
        rope_theta=10000.0,
        bos_token_id=tokenizer.token_to_id(END_OF_TEXT),
        eos_token_id=tokenizer.token_to_id(END_OF_TEXT),
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(config)


def answer_loss(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor):
    """Mean cross-entropy on the answer tokens, and how many of them greedy decoding gets right."""
    hidden = model.model(input_ids=inputs).last_hidden_state
    logits = model.lm_head(hidden[mask])
    answer = targets[mask]
    loss = F.cross_entropy(logits, answer)
    return loss, (logits.argmax(-1) == answer)


def learning_rate(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def phase_at(step: int, steps: int, polish_steps: int) -> Phase:
    phases, step = (PHASES, step) if step < steps else (POLISH_PHASES, step - steps)
    total = steps if phases is PHASES else polish_steps
    return next(p for p in phases if step < p.until * total or p is phases[-1])


def learning_rate_at(step: int, args: argparse.Namespace) -> float:
    if step < args.steps:
        return learning_rate(step, args.steps, args.lr, args.warmup)
    return learning_rate(step - args.steps, args.polish_steps, args.polish_lr, args.warmup)


@torch.no_grad()
def probe(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> str:
    """Teacher-forced figures on held-out edits: token accuracy, and the share of answers all right."""
    model.eval()
    right = total = whole = count = 0
    for inputs, targets, mask in batches:
        _, correct = answer_loss(model, inputs, targets, mask)
        right += int(correct.sum())
        total += correct.numel()
        rows = torch.zeros(mask.shape, dtype=torch.bool, device=mask.device)
        rows[mask] = ~correct
        whole += int((~rows.any(dim=1)).sum())
        count += mask.shape[0]
    model.train()
    return f"held-out edits: token accuracy {right / total:.4f}, answers all right {whole}/{count}"


def export(model: torch.nn.Module, tokenizer_path: Path, out: Path) -> None:
    from tokenizers import Tokenizer as HFTokenizer

    tokenizer = HFTokenizer.from_file(str(tokenizer_path))
    state = model.state_dict()
    tensors = {
        name: tensor.detach().to("cpu", torch.float32).contiguous()
        for name, tensor in state.items()
        if name != "lm_head.weight"  # tied to model.embed_tokens.weight
    }
    config = llama_config(
        **MODEL_SHAPE,
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.token_to_id(END_OF_TEXT),
        dtype=torch.float32,
    )
    write_checkpoint(out, tensors, config, tokenizer)


class StepBatches(torch.utils.data.Dataset):
    """Step n's batch (inputs, targets, loss mask), made from Random(seed, n) alone: DataLoader workers
    make batches ahead of the model in any order, and a resumed run sees the batches an uninterrupted one
    would."""

    def __init__(self, maker: ExampleMaker, args: argparse.Namespace) -> None:
        self.maker, self.args = maker, args

    def __len__(self) -> int:
        return self.args.steps + self.args.polish_steps

    def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rng = random.Random(f"{self.args.seed}:{step}")
        phase = phase_at(step, self.args.steps, self.args.polish_steps)
        examples = make_batch(self.maker, rng, phase, self.args.batch_tokens)
        noisy = corrupt(examples, rng, phase.noise) if phase.noise else None
        # On a GPU, few distinct widths: kernels are planned per shape.
        return collate(examples, self.maker.eos, noisy, pad_to=64 if self.args.device != "cpu" else 1)


def _one_thread(worker: int) -> None:
    torch.set_num_threads(1)  # a batch-making worker: leave the cores to the others


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with what it leaves out taken from its --recipe and then the defaults."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the finished checkpoint goes")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "kvmesh" / "train-default")
    parser.add_argument(
        "--recipe",
        choices=RECIPES,
        default="gpu" if torch.cuda.is_available() else "cpu",
        help="sizes and steps (default: gpu where there is one): see RECIPES; the options below override it",
    )
    parser.add_argument("--steps", type=int, help="stage 1: the curriculum of PHASES")
    parser.add_argument("--polish-steps", type=int, help="stage 2 after it: POLISH_PHASES, lr restarted")
    parser.add_argument("--polish-lr", type=float, default=1e-3)
    parser.add_argument("--batch-tokens", type=int, help="tokens per batch, padding included")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="torch device (default: cuda where there is one); on CUDA the model runs in bf16 autocast",
    )
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--workers",
        type=int,
        help="processes that make batches ahead of the model (default: none on the CPU, which needs "
        "its cores for the model; up to 8 with a GPU)",
    )
    parser.add_argument(
        "--stdlib",
        type=Path,
        help="a copy of a Python standard library to build the corpus from (default: the running "
        "interpreter's; the shipped model's is CPython 3.11's)",
    )
    parser.add_argument("--layers", type=int, help="transformer layers (MODEL_SHAPE's other sizes stay)")
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--probe-every", type=int, default=250)
    parser.add_argument("--resume", action="store_true", help="go on from --work/state.pt")
    args = parser.parse_args(argv)
    for name, value in RECIPES[args.recipe].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.workers is None:
        args.workers = 0 if args.device == "cpu" else max(0, min(8, (os.cpu_count() or 1) - 2))
    return args


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    MODEL_SHAPE["num_hidden_layers"] = args.layers
    torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cuda.enable_cudnn_sdp(False)  # flash attention: cuDNN's plans a graph per new shape
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    tokenizer_path = args.work / "tokenizer.json"
    train_files = corpus_files(held_out=False, stdlib=args.stdlib)
    if not (args.resume and tokenizer_path.is_file()):
        train_code_tokenizer(train_files, vocab_size=MODEL_SHAPE["vocab_size"]).save(str(tokenizer_path))
    tokenizer = Tokenizer.from_file(tokenizer_path)
    maker = ExampleMaker(Corpus(train_files), tokenizer)
    held_out = ExampleMaker(Corpus(corpus_files(held_out=True, stdlib=args.stdlib)), tokenizer)
    probe_rng = random.Random(f"{args.seed}:probe")
    probe_batches = [
        tuple(
            t.to(device)
            for t in collate(
                [held_out.edit(probe_rng, 10, 40, style=maker.corpus.style) for _ in range(8)], maker.eos
            )
        )
        for _ in range(4)
    ]
    print(
        f"corpus: {len(train_files)} training files, {len(maker.corpus.starts)} statements; "
        f"vocab {tokenizer.vocab_size}; ready in {time.monotonic() - started:.0f} s",
        flush=True,
    )

    model = build_model(tokenizer, args.seed).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    state_path = args.work / "state.pt"
    step = 0
    if args.resume and state_path.is_file():
        state = torch.load(state_path, weights_only=True, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        print(f"resumed at step {step}", flush=True)
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters on {device}", flush=True)

    total_steps = args.steps + args.polish_steps
    batches = torch.utils.data.DataLoader(
        StepBatches(maker, args),
        batch_size=None,
        sampler=range(step, total_steps),
        num_workers=args.workers,
        multiprocessing_context="fork" if args.workers else None,
        prefetch_factor=8 if args.workers else None,
        worker_init_fn=_one_thread,
        pin_memory=device.type == "cuda",
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    model.train()
    window = torch.zeros(3, device=device)  # loss sum, right answer tokens, answer tokens
    tick = time.monotonic()
    waited = 0.0  # on the batches, in this window
    batch_iter = iter(batches)
    while step < total_steps:
        wait_from = time.monotonic()
        inputs, targets, mask = next(batch_iter)
        waited += time.monotonic() - wait_from
        inputs, targets, mask = (t.to(device, non_blocking=True) for t in (inputs, targets, mask))
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(step, args)
        with autocast:
            loss, correct = answer_loss(model, inputs, targets, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window += torch.stack(
            [loss.detach().float(), correct.sum().float(), torch.tensor(correct.numel(), device=device)]
        )
        if step % 25 == 0:
            elapsed = time.monotonic() - tick
            loss_sum, right, total = window.tolist()
            print(
                f"step {step}/{total_steps} loss {loss_sum / 25:.4f} answer-token acc "
                f"{right / total:.4f} {25 / elapsed:.2f} steps/s ({waited / elapsed:.0%} waiting on data) "
                f"[{(time.monotonic() - started) / 60:.1f} min]",
                flush=True,
            )
            window.zero_()
            waited = 0.0
            tick = time.monotonic()
        if step % args.probe_every == 0 or step == total_steps:
            print(f"step {step}: {probe(model, probe_batches)}", flush=True)
        if step % args.checkpoint_every == 0 or step in (args.steps, total_steps):
            scratch = state_path.with_suffix(".tmp")
            torch.save(
                {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}, scratch
            )
            os.replace(scratch, state_path)
    export(model, tokenizer_path, args.out)
    print(f"wrote {args.out} after {(time.monotonic() - started) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
