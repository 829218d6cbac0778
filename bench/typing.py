"""Typing through editor sessions vs stateless requests: the same typing traces, the same mesh, the same run.

    python -m bench.typing [--file PATH] [--rounds 2] [--lines 4] [--speed 1] [--max-tokens 16] [--png P]

(Run it with -m from the repository root: `python bench/typing.py` would put bench/ first on sys.path,
where this file shadows the standard library's typing module.)

The mesh: a cache store, one prefill worker, one decode worker and a gateway, each a `kvmesh serve` process
on loopback, the default model, 1 torch thread per worker. The gateway has multi-tenancy on with two API
keys: the session replays run as tenant "session", the stateless ones as tenant "stateless", so their
prefix caches (salted per tenant) never help each other, while they share the workers.

The traces (kvmesh.client_trace): a person retyping --lines lines of a real file (default: the standard
library's argparse.py, about 100 KB; --context-lines N: only the N lines around the region, a smaller
file, closer to what the default model was trained on), character by character: per-character delays of 60 ms +-50%, 200 ms
more after a word, 500 ms more after a line, a typo (typed, then deleted) before 3% of the letters, and at
every word end a look at the suggestion (waiting up to 2 s for it): when the file says it next (all of
it, or at least its first 4 characters), the typist reads it for 300 ms and presses Tab (and deletes a
wrong rest). Round r retypes the region starting at line
(middle + 40 r) with seed r. Each round runs the same trace twice, through a session (predict-ahead on)
and through stateless Complete requests (each keystroke cancels the previous call, as an editor does),
in alternating order. Suggestions are one line (stop "\\n"), --max-tokens tokens at most, greedy.

Reported per keystroke (a typed or deleted character, an accept): perceived latency (kvmesh.client_keystrokes:
keystroke sent -> the first chunk of a suggestion for that version), the route stage (usage.stage_ms.route
of every finished suggestion), model calls per keystroke (sessions: the gateway's
kvmesh.session.model_calls, predictions included; stateless: one Complete per keystroke), and wasted
compute: sessions, the gateway's kvmesh.session.wasted_tokens / kvmesh.session.computed_tokens
(generated tokens of superseded calls and unused predictions); stateless, the tokens received by calls
that a newer keystroke cancelled / all tokens received. The perceived-latency distribution of both is
drawn as a PNG (matplotlib).

Goals (issue 18): route stage <= 1 ms p50 per keystroke in a session on a 100 KB document; perceived
latency right after an accept <= 0.2x a stateless request's (p50); model calls per keystroke >= 30% fewer
than stateless; wasted compute <= 35%.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import socket
import sysconfig
import tempfile
import urllib.request
from pathlib import Path

import grpc.aio
from prometheus_client.parser import text_string_to_metric_families

from bench.keystrokes import Mesh
from kvmesh import default_model_path
from kvmesh.client_keystrokes import Keystroke, percentile, summarize
from kvmesh.client_replay import replay
from kvmesh.client_trace import TraceConfig, make_trace
from kvmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

TENANTS = ("session", "stateless")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TypingMesh(Mesh):
    """One prefill and one decode worker; a gateway with metrics and one API key per tenant."""

    async def start(self, log_dir: Path) -> None:
        store = await self._spawn("cache-store", ["--port", "0"], log_dir)
        common = ["--cache-store", store, "--model", self.model]
        worker = ["--port", "0", *common, "--threads", "1", "--kv-cache-bytes", "256MiB"]
        await asyncio.gather(
            self._spawn("prefill", worker, log_dir, "prefill-0"),
            self._spawn("decode", [*worker, "--worker-id", "decode-0"], log_dir, "decode-0"),
        )
        keys = log_dir / "keys.json"
        keys.write_text(json.dumps({"keys": {tenant: tenant for tenant in TENANTS}}))
        secret = log_dir / "salt.key"
        secret.write_text(secrets.token_hex(32))
        secret.chmod(0o600)
        self.metrics_port = free_port()
        gateway = ["--port", "0", *common, "--refresh-ms", "100", "--metrics-port", str(self.metrics_port)]
        gateway += ["--api-keys-file", str(keys), "--salt-secret-file", str(secret)]
        self.gateway_address = await self._spawn("gateway", gateway, log_dir)

    def session_counters(self) -> dict[str, float]:
        """kvmesh.session.* counters of tenant "session", summed over their other labels."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        totals: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                name = sample.name
                if name.startswith("kvmesh_session_") and sample.labels.get("kvmesh_tenant") == "session":
                    totals[name] = totals.get(name, 0.0) + sample.value
        return totals


def metadata(tenant: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {tenant}"),)


async def warm_up(stub: gateway_pb2_grpc.GatewayStub, document: str, line: int, tenant: str) -> None:
    """The document's prompt computed once (the editor opened the file): typing then starts warm."""
    request = gateway_pb2.CompleteRequest(
        document=gateway_pb2.TextDocument(text=document, line=line, column=0)
    )
    request.sampling.max_tokens = 2
    async for _ in stub.Complete(request, metadata=metadata(tenant), timeout=600):
        pass


async def run(args: argparse.Namespace) -> dict:
    model = args.model or str(default_model_path())
    text = Path(args.file).read_text(encoding="utf-8")
    log_dir = Path(tempfile.mkdtemp(prefix="kvmesh-typing-"))
    mesh = TypingMesh("typing", model)
    results: dict[str, list[Keystroke]] = {tenant: [] for tenant in TENANTS}
    accepts = dict.fromkeys(TENANTS, 0)
    middle = len(text.split("\n")) // 2
    try:
        await mesh.start(log_dir)
        print(f"mesh up (logs in {log_dir})", flush=True)
        before = mesh.session_counters()
        async with grpc.aio.insecure_channel(mesh.gateway_address) as channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            for r in range(args.rounds):
                document, start_line = text, middle + 40 * r
                if args.context_lines:  # the region and the lines around it, as a file of their own
                    lines = text.split("\n")
                    first = max(0, start_line - args.context_lines // 2)
                    document = "\n".join(lines[first : first + args.context_lines]) + "\n"
                    start_line -= first
                config = TraceConfig(num_lines=args.lines, start_line=start_line, seed=r)
                trace = make_trace(args.file, document, config)
                order = TENANTS if r % 2 == 0 else TENANTS[::-1]
                for tenant in order:
                    await warm_up(stub, trace.document, trace.text.count("\n", 0, trace.start), tenant)
                    keystrokes, num_accepts = await replay(
                        stub,
                        trace,
                        tenant,
                        max_tokens=args.max_tokens,
                        predict_ahead=args.predict_ahead,
                        speed=args.speed,
                        metadata=metadata(tenant),
                    )
                    results[tenant] += keystrokes
                    accepts[tenant] += num_accepts
                    summary = summarize(keystrokes, num_accepts)
                    print(
                        f"round {r} {tenant}: {summary.num_keystrokes} keystrokes, {num_accepts} accepts, "
                        f"latency p50 {summary.latency_p50_ms:.1f} ms, sources {summary.sources}",
                        flush=True,
                    )
        await asyncio.sleep(0.5)  # the last calls' counters
        after = mesh.session_counters()
    finally:
        await mesh.stop()
    counters = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in after}
    return report(args, results, accepts, counters, len(text))


def report(
    args: argparse.Namespace,
    results: dict[str, list[Keystroke]],
    accepts: dict[str, int],
    counters: dict[str, float],
    num_chars: int,
) -> dict:
    rows = {}
    for tenant in TENANTS:
        keystrokes = results[tenant]
        summary = summarize(keystrokes, accepts[tenant])
        if tenant == "session":
            model_calls = counters.get("kvmesh_session_model_calls_total", 0.0)
            computed = counters.get("kvmesh_session_computed_tokens_total", 0.0)
            wasted = counters.get("kvmesh_session_wasted_tokens_total", 0.0) / max(computed, 1.0)
        else:
            model_calls = float(len(keystrokes))
            wasted = summary.num_cancelled_tokens / max(summary.num_tokens, 1)
        routes = [k.usage.stage_ms.route_ms for k in keystrokes if k.usage is not None]
        by_source: dict[str, list[float]] = {}
        for k in keystrokes:
            if k.usage is not None:
                name = common_pb2.UsageSource.Name(k.usage.source).removeprefix("USAGE_SOURCE_")
                by_source.setdefault(name, []).append(k.usage.stage_ms.route_ms)
        rows[tenant] = {
            "keystrokes": summary.num_keystrokes,
            "accepts": summary.num_accepts,
            "visible": summary.num_visible,
            "latency_p50_ms": summary.latency_p50_ms,
            "latency_p90_ms": summary.latency_p90_ms,
            "after_accept_p50_ms": summary.after_accept_p50_ms,
            "route_p50_ms": percentile(routes, 0.5),
            "route_p90_ms": percentile(routes, 0.9),
            "route_p50_ms_by_source": {name: percentile(values, 0.5) for name, values in by_source.items()},
            "model_calls_per_keystroke": model_calls / max(summary.num_keystrokes, 1),
            "wasted": wasted,
            "sources": summary.sources,
        }
    session, stateless = rows["session"], rows["stateless"]
    print()
    excerpt = f", {args.context_lines} lines of it around each region" if args.context_lines else ""
    print(
        f"document: {args.file} ({num_chars:,} characters{excerpt}); {args.rounds} round(s) of {args.lines} lines"
    )
    print(
        "| mode | keystrokes | accepts | perceived p50 / p90 (ms) | after an accept p50 (ms) "
        "| route p50 / p90 (ms) | model calls per keystroke | wasted compute | sources |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for tenant, row in rows.items():
        print(
            f"| {tenant} | {row['keystrokes']} | {row['accepts']} | {row['latency_p50_ms']:.1f} / "
            f"{row['latency_p90_ms']:.1f} | {row['after_accept_p50_ms']:.1f} | {row['route_p50_ms']:.2f} / "
            f"{row['route_p90_ms']:.2f} | {row['model_calls_per_keystroke']:.2f} | {row['wasted']:.0%} "
            f"| {row['sources']} |"
        )
    calls = session["model_calls_per_keystroke"] / stateless["model_calls_per_keystroke"]
    after_accept = session["after_accept_p50_ms"] / stateless["latency_p50_ms"]
    print()
    by_source = ", ".join(f"{name} {ms:.2f} ms" for name, ms in session["route_p50_ms_by_source"].items())
    print(
        f"route stage p50 in a session: {session['route_p50_ms']:.2f} ms (goal <= 1 ms); by source: {by_source}"
    )
    print(
        f"perceived latency after an accept, session / stateless request p50: {after_accept:.2f}x "
        f"(goal <= 0.2x; stateless after an accept: {stateless['after_accept_p50_ms']:.1f} ms)"
    )
    print(
        f"model calls per keystroke: session {session['model_calls_per_keystroke']:.2f}, stateless "
        f"{stateless['model_calls_per_keystroke']:.2f}: {abs(1 - calls):.0%} "
        f"{'fewer' if calls <= 1 else 'more'} (goal >= 30% fewer)"
    )
    print(
        f"wasted compute in sessions: {session['wasted']:.0%} (goal <= 35%); stateless {stateless['wasted']:.0%}"
    )
    print(f"session counters: {json.dumps(counters)}")
    if args.png:
        draw(results, Path(args.png))
        print(f"perceived-latency distribution: {args.png}")
    return rows


def draw(results: dict[str, list[Keystroke]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.5), dpi=100)
    for tenant, keystrokes in results.items():
        latencies = sorted(k.latency_ms for k in keystrokes if k.latency_ms is not None)
        if not latencies:
            continue
        shares = [(i + 1) / len(latencies) for i in range(len(latencies))]
        label = f"{tenant} ({len(latencies)} of {len(keystrokes)} keystrokes)"
        (line,) = axes.step(latencies, shares, where="post", label=label)
        accepted = sorted(k.latency_ms for k in keystrokes if k.kind == "accept" and k.latency_ms is not None)
        if accepted:
            marks = [0.03] * len(accepted)
            axes.plot(accepted, marks, "|", color=line.get_color(), markersize=14, label=f"{tenant}: accepts")
    axes.set_xscale("log")
    axes.set_xlabel("perceived latency: keystroke sent -> a suggestion for it visible (ms, log)")
    axes.set_ylabel("share of keystrokes with a suggestion")
    axes.set_title("Typing replay: editor session vs stateless requests (same trace, same mesh)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="upper left")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default=None, help="checkpoint directory (default: kvmesh's default model)"
    )
    parser.add_argument(
        "--file",
        default=str(Path(sysconfig.get_paths()["stdlib"]) / "argparse.py"),
        help="the file typed into (default: the standard library's argparse.py, ~100 KB)",
    )
    parser.add_argument(
        "--context-lines",
        type=int,
        default=0,
        help="type into this many lines around the region (0: the whole file)",
    )
    parser.add_argument("--rounds", type=int, default=2, help="regions retyped, each in both modes")
    parser.add_argument("--lines", type=int, default=4, help="lines retyped per round")
    parser.add_argument(
        "--no-predict-ahead",
        dest="predict_ahead",
        action="store_false",
        help="sessions without predict-ahead",
    )
    parser.add_argument("--speed", type=float, default=1.0, help="divide the trace's delays by this")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per suggestion at most")
    parser.add_argument("--png", default=str(Path(__file__).with_name("typing_latency.png")))
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    rows = asyncio.run(run(args))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
