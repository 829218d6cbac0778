"""A person typing into a real source file, one character per request, through the whole mesh.

    python bench/keystrokes.py [--file PATH] [--keystrokes 40] [--cold-prompts 5] [--max-tokens 4]

Two meshes run side by side as separate `kvmesh serve` processes on loopback, each with a cache store,
one prefill worker, two decode workers and a gateway: one with prefix caching on, one with it off
(`--no-prefix-caching`). Every request goes to both, one after the other, so the machine's noise hits
both alike.

1. Replay. The cursor sits at the start of a line in the middle of the file (default: csv.py from the
   standard library, about 5k tokens); that line is taken out and typed back in, one character per
   request. Reported: cold TTFT (the first keystroke), warm TTFT p50 and p90 (the others), warm p50 /
   cold, and the share of prompt tokens served from cache (usage.cached_tokens / usage.prompt_tokens)
   after the first keystroke; the same with caching off.
2. No hit at all. --cold-prompts documents that share no block with anything cached (a unique first
   line), on both meshes: TTFT with caching off / TTFT with caching on (>= 0.98: caching costs a
   prompt that misses nothing).
3. Layout. Cached tokens per keystroke of the same replay for the suffix-prefix-middle (SPM) layout the
   gateway uses and for prefix-suffix-middle (PSM), computed from block hashes: the leading blocks of a
   keystroke's prompt whose chained hashes equal the previous keystroke's.

Goals (issue 5): warm TTFT p50 <= 0.05 x cold TTFT; >= 95% of prompt tokens from cache after the first
keystroke; TTFT of a no-hit prompt with caching off / on >= 0.98. TTFT is measured at the client,
request sent -> first token received.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import sys
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import grpc.aio

from gateway.layout import PromptLayout
from kvmesh import default_model_path
from kvmesh.cli.launcher import SERVING_LINE
from kvmesh.engine.block_hash import hash_blocks, namespace_hash
from kvmesh.engine.special_tokens import FIM_MIDDLE, FIM_PREFIX, FIM_SUFFIX
from kvmesh.engine.tokenizer import Tokenizer
from kvmesh.v1 import gateway_pb2, gateway_pb2_grpc

PROJECT_ROOT = Path(__file__).resolve().parents[1]
BLOCK_SIZE = 16
STARTUP_TIMEOUT_S = 180.0


# --- the mesh, as `kvmesh serve` processes ---------------------------------------------------------------


@dataclass
class Role:
    name: str
    process: asyncio.subprocess.Process
    log: Path


@dataclass
class Mesh:
    """cache store, 1 prefill worker, 2 decode workers and a gateway, each its own process."""

    label: str
    model: str
    worker_flags: tuple[str, ...] = ()
    roles: list[Role] = field(default_factory=list)
    gateway_address: str = ""

    async def start(self, log_dir: Path) -> None:
        store = await self._spawn("cache-store", ["--port", "0"], log_dir)
        common = ["--cache-store", store, "--model", self.model]
        worker = [
            "--port",
            "0",
            *common,
            "--threads",
            "1",
            "--kv-cache-bytes",
            "64MiB",
            "--block-size",
            str(BLOCK_SIZE),
            *self.worker_flags,
        ]
        await asyncio.gather(
            self._spawn("prefill", worker, log_dir, "prefill-0"),
            self._spawn("decode", [*worker, "--worker-id", f"{self.label}-decode-0"], log_dir, "decode-0"),
            self._spawn("decode", [*worker, "--worker-id", f"{self.label}-decode-1"], log_dir, "decode-1"),
        )
        self.gateway_address = await self._spawn(
            "gateway",
            ["--port", "0", *common, "--refresh-ms", "100"],
            log_dir,
        )

    async def _spawn(self, role: str, args: Sequence[str], log_dir: Path, name: str = "") -> str:
        name = name or role
        log = log_dir / f"{self.label}-{name}.log"
        environ = {k: v for k, v in os.environ.items() if not k.startswith("KVMESH_")}
        environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(PROJECT_ROOT), environ.get("PYTHONPATH")) if p
        )
        with log.open("wb") as stderr:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "kvmesh.cli",
                "serve",
                role,
                "--log-level",
                "warning",
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                env=environ,
                start_new_session=True,
            )
        self.roles.append(Role(name, process, log))
        assert process.stdout is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                raw = await asyncio.wait_for(process.stdout.readline(), deadline - time.monotonic())
            except TimeoutError:
                break
            if not raw:
                break
            match = SERVING_LINE.match(raw.decode().strip())
            if match and match["role"] == role:
                return match["address"]
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{self.label} {name} did not report SERVING; its log ends:\n{tail}")

    async def stop(self) -> None:
        for role in reversed(self.roles):  # gateway first, cache store last
            if role.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    role.process.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(role.process.wait(), 15)
                except TimeoutError:
                    role.process.kill()
                    await role.process.wait()
        self.roles.clear()


# --- requests --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    ttft_ms: float
    """Client-side: request sent -> first token received."""
    prompt_tokens: int
    cached_tokens: int
    prefilled_tokens: int
    transport: str
    """"" when the decode worker prefilled the uncached part itself."""


async def complete(
    stub: gateway_pb2_grpc.GatewayStub, document: str, line: int, column: int, max_tokens: int
) -> Sample:
    request = gateway_pb2.CompleteRequest(
        document=gateway_pb2.TextDocument(text=document, line=line, column=column)
    )
    request.sampling.max_tokens = max_tokens
    request.sampling.ignore_eos = True
    started = time.perf_counter()
    first: float | None = None
    usage = None
    async for chunk in stub.Complete(request, timeout=300):
        if first is None and chunk.token_ids:
            first = time.perf_counter()
        if chunk.HasField("usage"):
            usage = chunk.usage
    assert first is not None and usage is not None
    return Sample(
        ttft_ms=(first - started) * 1000.0,
        prompt_tokens=usage.prompt_tokens,
        cached_tokens=usage.cached_tokens,
        prefilled_tokens=usage.prefilled_tokens,
        transport=usage.transport,
    )


@dataclass(frozen=True)
class Keystroke:
    """The document after one more typed character, and the cursor after it."""

    document: str
    line: int
    column: int


def typing_replay(source: str, num_keystrokes: int) -> list[Keystroke]:
    """Lines from the middle of source taken out, then typed back one character (newlines included) at a
    time: num_keystrokes + 1 documents, the first with nothing typed."""
    lines = source.split("\n")
    start = next(i for i in range(len(lines) // 2, len(lines)) if lines[i].strip())
    end = start
    while end < len(lines) and sum(len(line) + 1 for line in lines[start:end]) < num_keystrokes:
        end += 1
    text = "\n".join(lines[start:end])[:num_keystrokes]
    keystrokes = []
    for num_typed in range(len(text) + 1):
        typed = text[:num_typed]
        document = "\n".join([*lines[:start], typed + "\n".join(lines[start:end])[len(text) :], *lines[end:]])
        line = start + typed.count("\n")
        column = len(typed) - (typed.rfind("\n") + 1)
        keystrokes.append(Keystroke(document, line, column))
    return keystrokes


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# --- SPM vs PSM, from block hashes -----------------------------------------------------------------------


def psm_prompt(tokenizer: Tokenizer, prefix: str, suffix: str) -> list[int]:
    """prefix-suffix-middle: [PRE] prefix [SUF] suffix [MID]."""

    def marker(name: str) -> list[int]:
        token_id = tokenizer.token_to_id(name)
        return [token_id] if token_id is not None else tokenizer.encode(name)

    encode = tokenizer.encode
    return [*marker(FIM_PREFIX), *encode(prefix), *marker(FIM_SUFFIX), *encode(suffix), *marker(FIM_MIDDLE)]


def cached_tokens_per_keystroke(prompts: list[list[int]]) -> list[int]:
    """For each prompt after the first: tokens of the leading full blocks whose hashes equal the previous
    prompt's (what an ideal prefix cache holding the previous keystroke would serve)."""
    namespace = namespace_hash("bench")
    hashes = [hash_blocks(namespace, prompt, BLOCK_SIZE) for prompt in prompts]
    cached = []
    for before, after in zip(hashes, hashes[1:], strict=False):
        num_blocks = next((i for i, (a, b) in enumerate(zip(before, after, strict=False)) if a != b), None)
        cached.append(BLOCK_SIZE * (min(len(before), len(after)) if num_blocks is None else num_blocks))
    return cached


def layout_comparison(tokenizer: Tokenizer, keystrokes: list[Keystroke]) -> dict[str, tuple[float, float]]:
    """Layout -> (mean cached tokens per keystroke, cached share of prompt tokens), after the first."""
    layout = PromptLayout(tokenizer)
    prompts: dict[str, list[list[int]]] = {"SPM": [], "PSM": []}
    for keystroke in keystrokes:
        lines = keystroke.document.split("\n")
        cursor = sum(len(line) + 1 for line in lines[: keystroke.line]) + keystroke.column
        prefix, suffix = keystroke.document[:cursor], keystroke.document[cursor:]
        prompts["SPM"].append(layout.completion(prefix, suffix))
        prompts["PSM"].append(psm_prompt(tokenizer, prefix, suffix))
    result = {}
    for name, layout_prompts in prompts.items():
        cached = cached_tokens_per_keystroke(layout_prompts)
        total = sum(len(p) for p in layout_prompts[1:])
        result[name] = (statistics.mean(cached), sum(cached) / total)
    return result


# --- the run ---------------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> None:
    model = args.model or str(default_model_path())
    tokenizer = Tokenizer.from_file(Path(model) / "tokenizer.json")
    source = Path(args.file).read_text(encoding="utf-8")
    num_source_tokens = len(tokenizer.encode(source))
    keystrokes = typing_replay(source, args.keystrokes)
    print(f"file: {args.file} ({len(source)} characters, {num_source_tokens} tokens)")
    print(
        f"replay: line {keystrokes[0].line} typed back one character per request, "
        f"{len(keystrokes)} requests; {args.max_tokens} new tokens each"
    )
    meshes = {"on": Mesh("on", model), "off": Mesh("off", model, ("--no-prefix-caching",))}
    log_dir = Path(tempfile.mkdtemp(prefix="kvmesh-keystrokes-"))
    samples: dict[str, list[Sample]] = {"on": [], "off": []}
    cold: dict[str, list[Sample]] = {"on": [], "off": []}
    try:
        # Started one after the other (each loads the model in four processes), then run side by side.
        for mesh in meshes.values():
            await mesh.start(log_dir)
        channels = {name: grpc.aio.insecure_channel(mesh.gateway_address) for name, mesh in meshes.items()}
        stubs = {name: gateway_pb2_grpc.GatewayStub(channel) for name, channel in channels.items()}
        # Warm-up: channels and every worker's first forward passes, on text unrelated to the file.
        warm_up = "def warm_up(x):\n    return x\n" * 20
        for stub in stubs.values():
            await asyncio.gather(*(complete(stub, warm_up + str(i), 0, 0, 2) for i in range(4)))
        print(f"meshes up (logs in {log_dir})", flush=True)

        for i, keystroke in enumerate(keystrokes):
            for name in ("on", "off") if i % 2 == 0 else ("off", "on"):
                sample = await complete(
                    stubs[name], keystroke.document, keystroke.line, keystroke.column, args.max_tokens
                )
                samples[name].append(sample)
        for i in range(args.cold_prompts):
            # SPM puts the suffix first: a unique first line right after the cursor (at the start of the
            # document) makes the first block, hence every block, new.
            document = f"# no-hit prompt {i} {time.time_ns()}\n{source}"
            for name in ("on", "off") if i % 2 == 0 else ("off", "on"):
                cold[name].append(await complete(stubs[name], document, 0, 0, args.max_tokens))
        for channel in channels.values():
            await channel.close()
    finally:
        for mesh in meshes.values():
            await mesh.stop()

    report(samples, cold, layout_comparison(tokenizer, keystrokes))


def report(
    samples: dict[str, list[Sample]],
    cold: dict[str, list[Sample]],
    layouts: dict[str, tuple[float, float]],
) -> None:
    print()
    print(
        "| prefix caching | cold TTFT (ms) | warm TTFT p50 (ms) | warm TTFT p90 (ms) | warm p50 / cold "
        "| cached share after the first | warm keystrokes prefilled on the decode worker |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, runs in samples.items():
        first, warm = runs[0], runs[1:]
        warm_ttft = [s.ttft_ms for s in warm]
        p50 = statistics.median(warm_ttft)
        share = sum(s.cached_tokens for s in warm) / sum(s.prompt_tokens for s in warm)
        local = sum(1 for s in warm if not s.transport) / len(warm)
        print(
            f"| {name} | {first.ttft_ms:.1f} | {p50:.1f} | {percentile(warm_ttft, 0.9):.1f} "
            f"| {p50 / first.ttft_ms:.3f} | {share:.1%} | {local:.0%} |"
        )
    on, off = samples["on"], samples["off"]
    print()
    print(f"prompt tokens per request: {on[0].prompt_tokens} to {on[-1].prompt_tokens}")
    warm_ratio = statistics.median(s.ttft_ms for s in off[1:]) / statistics.median(s.ttft_ms for s in on[1:])
    print(f"warm TTFT p50, caching off / on: {warm_ratio:.1f}x")
    if any(s.cached_tokens for s in off):
        print("WARNING: the caching-off mesh reported cached tokens")
    if cold["on"]:
        cold_on = statistics.median(s.ttft_ms for s in cold["on"])
        cold_off = statistics.median(s.ttft_ms for s in cold["off"])
        pairs = zip(cold["on"], cold["off"], strict=True)
        paired = statistics.median(off_sample.ttft_ms / on_sample.ttft_ms for on_sample, off_sample in pairs)
        print(
            f"no-hit prompts ({len(cold['on'])}, TTFT p50): caching on {cold_on:.1f} ms, off {cold_off:.1f} ms, "
            f"off / on {cold_off / cold_on:.3f} of the p50s, {paired:.3f} p50 of the pairs (goal >= 0.98); "
            "cached tokens with caching on: "
            f"{sum(s.cached_tokens for s in cold['on'])}"
        )
        for name in ("on", "off"):
            print(f"  no-hit TTFT (ms), caching {name}: {', '.join(f'{s.ttft_ms:.0f}' for s in cold[name])}")
    print()
    print("| layout | cached tokens per keystroke (mean, from block hashes) | cached share |")
    print("|---|---:|---:|")
    for name, (mean_cached, share) in layouts.items():
        print(f"| {name} | {mean_cached:.0f} | {share:.1%} |")
    measured = statistics.mean(s.cached_tokens for s in on[1:])
    print(f"SPM through the mesh (usage.cached_tokens, mean after the first): {measured:.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=None, help="checkpoint directory (default: kvmesh's default model)"
    )
    parser.add_argument(
        "--file",
        default=str(Path(sysconfig.get_paths()["stdlib"]) / "csv.py"),
        help="the source file typed into (default: the standard library's csv.py)",
    )
    parser.add_argument(
        "--keystrokes", type=int, default=40, help="characters typed (requests after the first)"
    )
    parser.add_argument("--cold-prompts", type=int, default=5, help="no-hit prompts per mesh")
    parser.add_argument("--max-tokens", type=int, default=4, help="tokens generated per request")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
