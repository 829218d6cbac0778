"""`kvmesh replay`: a person typing into a file, replayed against a gateway (kvmesh.client_replay).

    kvmesh replay --target HOST:PORT --file F [--lines 4] [--start-line N] [--seed 0] [--save-trace T]
    kvmesh replay --target HOST:PORT --trace T [--mode session|stateless] [--speed 2] [--no-predict-ahead]

Prints one line per keystroke (what was typed, perceived latency, the suggestion's source and route
stage) and a summary. The trace model is kvmesh.client_trace's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

import grpc
import grpc.aio

from kvmesh.cli.options import CLIENT_OPTIONS, add_options, resolve
from kvmesh.client_keystrokes import Keystroke, summarize
from kvmesh.client_replay import MODES, replay
from kvmesh.client_trace import Trace, TraceConfig, make_trace
from kvmesh.v1 import common_pb2, gateway_pb2_grpc


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "replay",
        help="replay a typing trace against a gateway",
        description="Type a region of a file back, keystroke by keystroke, through a session or stateless "
        "requests, and report per-keystroke latency.",
    )
    add_options(parser, CLIENT_OPTIONS)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--file", type=Path, help="make a trace from this file")
    source.add_argument("--trace", type=Path, help="a trace written by --save-trace")
    parser.add_argument("--lines", type=int, default=4, help="lines retyped (with --file)")
    parser.add_argument("--start-line", type=int, default=None, help="first line retyped (default: mid-file)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the trace's delays and typos")
    parser.add_argument("--save-trace", type=Path, default=None, help="write the trace (JSON) here")
    parser.add_argument("--mode", choices=MODES, default="session", help="session (default) or stateless")
    parser.add_argument(
        "--no-predict-ahead", dest="predict_ahead", action="store_false", help="sessions: no predict-ahead"
    )
    parser.add_argument("--speed", type=float, default=1.0, help="divide every delay by this")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens per suggestion (one line)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> int:
    values = resolve(CLIENT_OPTIONS, args)
    try:
        if args.trace is not None:
            trace = Trace.load(args.trace)
        else:
            config = TraceConfig(num_lines=args.lines, start_line=args.start_line, seed=args.seed)
            trace = make_trace(str(args.file), args.file.read_text(encoding="utf-8"), config)
        if args.save_trace is not None:
            trace.save(args.save_trace)
    except (OSError, ValueError, KeyError) as error:
        print(f"kvmesh replay: {error}", file=sys.stderr)
        return 2
    metadata = (("authorization", f"Bearer {values['api_key']}"),) if values["api_key"] else ()

    async def go() -> tuple[list[Keystroke], int]:
        if values["tls_ca"] is None:
            channel = grpc.aio.insecure_channel(values["target"])
        else:
            credentials = grpc.ssl_channel_credentials(Path(values["tls_ca"]).read_bytes())
            channel = grpc.aio.secure_channel(values["target"], credentials)
        async with channel:
            stub = gateway_pb2_grpc.GatewayStub(channel)
            return await replay(
                stub,
                trace,
                args.mode,
                max_tokens=args.max_tokens,
                predict_ahead=args.predict_ahead,
                speed=args.speed,
                metadata=metadata,
            )

    try:
        keystrokes, num_accepts = asyncio.run(go())
    except grpc.RpcError as error:
        code = error.code() if hasattr(error, "code") else None
        print(f"kvmesh replay: {code.name if code else 'ERROR'}: {error.details()}", file=sys.stderr)
        return 1
    except OSError as error:
        print(f"kvmesh replay: {error}", file=sys.stderr)
        return 2
    summary = summarize(keystrokes, num_accepts)
    if args.json:
        print(json.dumps(summary.__dict__))
        return 0
    for keystroke in keystrokes:
        latency = "superseded" if keystroke.latency_ms is None else f"{keystroke.latency_ms:7.1f} ms"
        usage = keystroke.usage
        if usage is None:
            where = ""
        else:
            source = common_pb2.UsageSource.Name(usage.source).removeprefix("USAGE_SOURCE_")
            where = f" {source} route={usage.stage_ms.route_ms:.2f} ms"
        print(f"{keystroke.kind:6} {latency}{where} {keystroke.text!r}")
    print(
        f"{summary.num_keystrokes} keystrokes, {summary.num_accepts} accepts; perceived latency p50 "
        f"{summary.latency_p50_ms:.1f} ms, p90 {summary.latency_p90_ms:.1f} ms, after an accept p50 "
        f"{summary.after_accept_p50_ms:.1f} ms; route p50 {summary.route_p50_ms:.2f} ms; sources "
        f"{summary.sources}"
    )
    return 0
