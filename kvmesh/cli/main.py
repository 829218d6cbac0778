"""The `kvmesh` command.

    kvmesh serve gateway|prefill|decode|cache-store [flags]   run one role (what a Kubernetes pod runs)
    kvmesh up [--port 50051] [--model PATH] [--transport auto|shm|grpc] [--insecure]   all four roles
                                                              on loopback (mutual TLS between them)
    kvmesh complete --target HOST:PORT --file F [--line L --column C] [--max-tokens N]
    kvmesh edit --target HOST:PORT --file F --snippet S [--no-speculative] [--max-tokens N]
    kvmesh replay --target HOST:PORT --file F | --trace T [--mode session|stateless]   a typing trace
    kvmesh demo                                                up, one completion and one edit through it, stop
    kvmesh certs DIR [--hosts NAME ...]                        a development CA and a certificate per role

`kvmesh serve ROLE --help` lists a role's flags with their KVMESH_* variables (kvmesh.cli.settings).
Exit codes: 0 success or stopped by a signal, 1 failure at run time, 2 bad flags or variables.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc

from kvmesh.cli import replay
from kvmesh.cli.options import (
    CLIENT_OPTIONS,
    MODEL,
    ROLE_OPTIONS,
    ROLES,
    UP_OPTIONS,
    SettingsError,
    add_options,
    resolve,
)
from kvmesh.cli.settings import child_environ, role_settings
from kvmesh.client import Chunk, Client

ROLE_HELP = {
    "gateway": "the gateway (public API, routing)",
    "prefill": "a prefill worker",
    "decode": "a decode worker",
    "cache-store": "the cache store (worker registry)",
}
assert tuple(ROLE_HELP) == ROLES

DEMO_PREFIX = "def fibonacci(n):\n    "
DEMO_SUFFIX = "\n\n\nprint(fibonacci(10))\n"
DEMO_ORIGINAL = """def mean(values):
    total = 0
    for value in values:
        total += value
    return total / len(values)


def spread(values):
    return max(values) - min(values)
"""
DEMO_SNIPPET = """def mean(values):
    if not values:
        raise ValueError("mean of no values")
    total = 0
    for value in values:
        # ... existing code ...
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvmesh", description="Serve and query code completion and edit models."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve", help="run one role", description="Run one role until SIGTERM or SIGINT."
    )
    roles = serve.add_subparsers(dest="role", required=True, metavar="ROLE")
    for role, what in ROLE_HELP.items():
        add_options(roles.add_parser(role, help=what, description=f"Run {what}."), ROLE_OPTIONS[role])

    up = commands.add_parser(
        "up",
        help="run all four roles on loopback",
        description="Run all four roles on loopback until Ctrl-C.",
    )
    add_options(up, UP_OPTIONS)

    complete = commands.add_parser(
        "complete", help="complete code at a cursor", description="Stream a completion."
    )
    add_options(complete, CLIENT_OPTIONS)
    complete.add_argument("--file", type=Path, required=True, help="the document")
    complete.add_argument("--line", type=int, default=None, help="cursor line, 0-based (default: the last)")
    complete.add_argument(
        "--column",
        type=int,
        default=None,
        help="cursor column in characters, 0-based (default: end of the line)",
    )
    complete.add_argument(
        "--context-file", type=Path, default=None, help="extra context placed before the document"
    )
    _add_sampling_arguments(complete)

    edit = commands.add_parser("edit", help="rewrite code as a snippet says", description="Stream an edit.")
    add_options(edit, CLIENT_OPTIONS)
    edit.add_argument("--file", type=Path, required=True, help="the code to rewrite")
    edit.add_argument("--snippet", type=Path, required=True, help="file holding the edit to apply")
    edit.add_argument(
        "--no-speculative", dest="speculative", action="store_false", help="do not use the original as draft"
    )
    _add_sampling_arguments(edit)
    replay.add_parser(commands)

    certs = commands.add_parser(
        "certs",
        help="make a development CA and a certificate per role",
        description=(
            "Write ca.crt/ca.key and ROLE.crt/ROLE.key for every role into DIR (the layout --tls-dir reads). "
            "Each certificate names its role (URI SAN spiffe://kvmesh/role/ROLE, DNS SAN "
            "ROLE.kvmesh.internal), localhost and 127.0.0.1. For development: keep ca.key out of the mesh."
        ),
    )
    certs.add_argument("dir", type=Path, help="directory to write (created if missing)")
    certs.add_argument(
        "--hosts", nargs="*", default=[], help="more DNS names or IP addresses for every certificate"
    )

    demo = commands.add_parser(
        "demo", help="up + one completion + one edit + stop", description="Try the mesh in one command."
    )
    demo.add_argument("--port", type=int, default=0, help="the gateway's port (default: a free one)")
    add_options(demo, [MODEL])
    demo.add_argument("--max-tokens", type=int, default=32, help="tokens to generate")
    return parser


def _add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-tokens", type=int, default=0, help="tokens to generate (default: the gateway's)"
    )
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default)")
    parser.add_argument(
        "--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1] (default: 1, off)"
    )
    parser.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)")
    parser.add_argument("--seed", type=int, default=None, help="seed for sampling")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "up":
            return _up(args)
        if args.command == "demo":
            return _demo(args)
        if args.command == "certs":
            return _certs(args)
        if args.command == "replay":
            return replay.run(args)
        return _query(args)
    except SettingsError as error:
        print(f"kvmesh {args.command}: {error}", file=sys.stderr)
        return 2


def _serve(args: argparse.Namespace) -> int:
    from kvmesh.cli.launcher import serve_role

    settings = role_settings(args.role, args)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format=f"%(asctime)s %(levelname)s {args.role} %(name)s: %(message)s",
        stream=sys.stderr,
    )

    def announce(line: str) -> None:
        print(line, flush=True)

    try:
        asyncio.run(serve_role(settings, announce))
    except (OSError, ValueError) as error:  # cannot bind, bad checkpoint
        print(f"kvmesh serve {args.role}: {error}", file=sys.stderr)
        return 1
    return 0


def _up(args: argparse.Namespace) -> int:
    from kvmesh.cli.launcher import LocalMesh, MeshError, run_until_signal

    values = resolve(UP_OPTIONS, args)
    mesh = LocalMesh(
        port=values["port"],
        model_path=values["model"] or _default_model(),
        transport=values["transport"],
        log_level=values["log_level"],
        startup_timeout_s=values["startup_timeout_s"],
        environ=child_environ(),
        mutual_tls=not values["insecure"],
    )

    async def run_mesh() -> None:
        address = await mesh.start()
        print(f"kvmesh up: gateway on {address} (prefill, decode, cache-store SERVING)", flush=True)
        await mesh.wait()

    async def up() -> int:
        try:
            await run_until_signal(run_mesh())
            return 0
        except MeshError as error:
            print(f"kvmesh up: {error}", file=sys.stderr)
            return 1
        finally:
            await mesh.stop()

    return asyncio.run(up())


def _certs(args: argparse.Namespace) -> int:
    from kvmesh.mesh.tls import make_mesh_certs

    try:
        directory = make_mesh_certs(args.dir, args.hosts)
    except (OSError, ValueError) as error:
        print(f"kvmesh certs: {error}", file=sys.stderr)
        return 1
    print(f"kvmesh certs: CA and certificates for {', '.join(ROLES)} in {directory}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from kvmesh.cli.launcher import LocalMesh, MeshError, run_until_signal

    values = resolve([MODEL], args)
    mesh = LocalMesh(port=args.port, model_path=values["model"] or _default_model(), environ=child_environ())

    async def run_demo() -> None:
        address = await mesh.start()
        print(f"kvmesh up: gateway on {address} (prefill, decode, cache-store SERVING)", flush=True)
        print(f"completing at the cursor (|):\n{DEMO_PREFIX}|{DEMO_SUFFIX}", flush=True)
        await asyncio.to_thread(_demo_completion, address, args.max_tokens)
        print(f"\nediting:\n{DEMO_ORIGINAL}with the update snippet:\n{DEMO_SNIPPET}", flush=True)
        await asyncio.to_thread(_demo_edit, address)

    async def demo() -> int:
        try:
            await run_until_signal(run_demo())
            return 0
        except MeshError as error:
            print(f"kvmesh demo: {error}", file=sys.stderr)
            return 1
        except grpc.RpcError as error:
            print(f"kvmesh demo: {_rpc_error(error)}", file=sys.stderr)
            return 1
        finally:
            await mesh.stop()

    return asyncio.run(demo())


def _demo_completion(address: str, max_tokens: int) -> None:
    with Client(address) as client:
        print("completion: ", end="", flush=True)
        last = _print_stream(client.complete(prefix=DEMO_PREFIX, suffix=DEMO_SUFFIX, max_tokens=max_tokens))
        print(flush=True)
        if last is not None:
            print(format_usage(last), flush=True)


def _demo_edit(address: str) -> None:
    with Client(address) as client:
        print("edited file:", flush=True)
        last = _print_stream(client.edit(DEMO_ORIGINAL, DEMO_SNIPPET))
        print(flush=True)
        if last is not None:
            print(format_usage(last), flush=True)


def _query(args: argparse.Namespace) -> int:
    values = resolve(CLIENT_OPTIONS, args)
    try:
        with Client(
            values["target"],
            timeout_s=values["timeout_s"],
            api_key=values["api_key"],
            tls_ca_file=values["tls_ca"],
        ) as client:
            last = _print_stream(_request(client, args))
    except OSError as error:
        print(f"kvmesh {args.command}: {error}", file=sys.stderr)
        return 2
    except grpc.RpcError as error:
        print(f"\nkvmesh {args.command}: {_rpc_error(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if sys.stdout.isatty():
        print()
    if last is not None:
        print(format_usage(last), file=sys.stderr)
    return 0


def _request(client: Client, args: argparse.Namespace) -> Iterator[Chunk]:
    sampling = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "stop": args.stop,
    }
    text = args.file.read_text(encoding="utf-8")
    if args.command == "edit":
        snippet = args.snippet.read_text(encoding="utf-8")
        return client.edit(text, snippet, speculative=args.speculative, **sampling)
    lines = text.split("\n")
    line = len(lines) - 1 if args.line is None else args.line
    column = args.column
    if column is None:
        column = len(lines[line].removesuffix("\r")) if 0 <= line < len(lines) else 0
    context = args.context_file.read_text(encoding="utf-8") if args.context_file else ""
    return client.complete(document=(text, line, column), context=context, **sampling)


def _print_stream(chunks: Iterator[Chunk]) -> Chunk | None:
    """Writes each chunk's text as it arrives; returns the last chunk (the one with usage)."""
    last = None
    for chunk in chunks:
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        last = chunk
    return last


def format_usage(chunk: Chunk) -> str:
    """One line: finish reason, token counts, time to first token and stage times."""
    usage = chunk.usage
    if usage is None:
        return f"finish={chunk.finish_reason}"
    stages = " ".join(f"{name}={ms:.1f}" for name, ms in usage.stage_ms.items())
    parts = [
        f"finish={chunk.finish_reason}",
        f"prompt_tokens={usage.prompt_tokens}",
        f"cached_tokens={usage.cached_tokens}",
        f"prefilled_tokens={usage.prefilled_tokens}",
        f"completion_tokens={usage.completion_tokens}",
        f"ttft_ms={usage.ttft_ms:.1f}",
        f"forward_passes={usage.forward_passes}",
    ]
    if usage.accepted_prediction_tokens or usage.rejected_prediction_tokens:
        parts.append(f"accepted_prediction_tokens={usage.accepted_prediction_tokens}")
        parts.append(f"rejected_prediction_tokens={usage.rejected_prediction_tokens}")
    if usage.transport:
        parts.append(f"transport={usage.transport} transfer_bytes={usage.transfer_bytes}")
    return f"usage: {' '.join(parts)} stage_ms: {stages}"


def _rpc_error(error: grpc.RpcError) -> str:
    code = error.code() if hasattr(error, "code") else None
    details = error.details() if hasattr(error, "details") else str(error)
    return f"{code.name if code is not None else 'ERROR'}: {details}"


def _default_model() -> str:
    from kvmesh import default_model_path

    return str(default_model_path())
