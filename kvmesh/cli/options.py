"""Every flag of the `kvmesh` command and its `KVMESH_*` environment twin, declared once.

Every flag has an environment twin: `--cache-store` is `KVMESH_CACHE_STORE`. A flag wins over its
variable, the variable over the default (`resolve`). `kvmesh.cli.settings` turns the values into the
roles' frozen configs.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kvmesh.engine.config import ATTENTION_BACKENDS

ROLES = ("gateway", "prefill", "decode", "cache-store")
DECODE_TOKEN_BUDGET = 256
"""A decode worker's default token budget per pass (bench/interference.py measures what it buys)."""
ENV_PREFIX = "KVMESH_"
LOG_LEVELS = ("debug", "info", "warning", "error")


class SettingsError(ValueError):
    """A flag or variable has a value that cannot be used; the message names it."""


def parse_bytes(text: str) -> int:
    """'268435456', '256MiB', '256M', '1.5GiB' -> bytes (K/M/G are powers of 1024, as for memory)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if match is None:
        raise ValueError(f"{text!r} is not a size (examples: 268435456, 256MiB, 2GiB)")
    scale = 1024 ** " KMGT".index(match.group(2).upper() or " ")
    return int(float(match.group(1)) * scale)


def _optional_int(text: str) -> int | None:
    """An int, or None for '', 'none' or 'off' (turns an optional port off)."""
    return None if text.strip().lower() in ("", "none", "off") else int(text)


def _boolean(value: str | bool) -> bool:
    """True/False from a --flag/--no-flag, or from '1', 'true', 'yes', 'on' / '0', 'false', 'no', 'off'."""
    if isinstance(value, bool):
        return value
    text = value.strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{value!r} is not a boolean (use 1/0, true/false, yes/no, on/off)")


def _names(text: str) -> tuple[str, ...]:
    """'shm,grpc' -> ('shm', 'grpc')."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


@dataclass(frozen=True)
class Option:
    """One flag and its environment twin."""

    flag: str
    """Long flag, e.g. "--kv-cache-bytes"; the variable is KVMESH_KV_CACHE_BYTES."""
    parse: Callable[[str], Any]
    default: Any
    help: str
    choices: tuple[str, ...] | None = None
    boolean: bool = False
    """A switch: "--flag" and "--no-flag" on the command line; 1/0, true/false, ... in the variable."""

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()


HOST = Option("--host", str, "127.0.0.1", "interface to bind (0.0.0.0: all)")
PORT = Option("--port", int, 0, "gRPC port; 0 picks a free one")
GRACE_S = Option("--grace-s", float, 5.0, "seconds in-flight calls get to finish on SIGTERM")
METRICS_PORT = Option("--metrics-port", _optional_int, None, "Prometheus metrics port (unset: no metrics)")
LOG_LEVEL = Option("--log-level", str, "info", "logging level", LOG_LEVELS)
MODEL = Option("--model", str, None, "checkpoint directory (default: the built-in model)")
CACHE_STORE = Option("--cache-store", str, None, "cache store address, host:port (required)")

METRICS_HOST = Option("--metrics-host", str, None, "interface the metrics server binds (default: --host)")
TLS_DIR = Option(
    "--tls-dir",
    str,
    None,
    "mutual TLS between roles: directory with ca.crt, ROLE.crt, ROLE.key (`kvmesh certs`); unset: plaintext",
)
HEALTH_PORT = Option(
    "--health-port",
    _optional_int,
    None,
    "plaintext gRPC health port for probes without a client certificate (0 picks one); "
    "unset: none, or a free one when TLS is on",
)
# NOTE: the defaults are kvmesh.mesh.convert's DEFAULT_MAX_STOP_STRINGS and _CHARS (tests check they agree).
MAX_STOP_STRINGS = Option("--max-stop-strings", int, 16, "most sampling.stop_strings a request may send")
MAX_STOP_STRING_CHARS = Option(
    "--max-stop-string-chars", int, 256, "longest stop string a request may send, in characters"
)

SERVER_OPTIONS = (HOST, PORT, GRACE_S, METRICS_PORT, METRICS_HOST, LOG_LEVEL, TLS_DIR, HEALTH_PORT)
WORKER_OPTIONS = (
    MODEL,
    CACHE_STORE,
    Option("--dtype", str, "float32", "weights and KV dtype", ("float32", "bfloat16", "float16")),
    Option("--device", str, "cpu", 'torch device ("cpu", "cuda", "cuda:1")'),
    Option("--threads", int, 1, "torch intra-op threads"),
    Option("--block-size", int, 16, "tokens per KV block"),
    Option("--kv-cache-bytes", parse_bytes, 256 * 1024 * 1024, "KV pool size (e.g. 256MiB)"),
    Option("--num-blocks", _optional_int, None, "KV pool size in blocks (overrides --kv-cache-bytes)"),
    Option("--prefill-chunk-size", int, 512, "most prompt tokens per sequence per forward pass"),
    Option("--max-num-seqs", int, 32, "most sequences per forward pass"),
    Option(
        "--attention-backend",
        str,
        "auto",
        "sdpa, triton (reads the KV pool in place; CUDA), or auto (triton on CUDA when installed)",
        ATTENTION_BACKENDS,
    ),
    Option(
        "--cuda-graphs",
        _boolean,
        False,
        "replay decode passes as CUDA graphs (needs CUDA and the triton attention backend)",
        boolean=True,
    ),
    Option("--advertise-host", str, "127.0.0.1", "host other roles dial to reach this worker"),
    Option("--worker-id", str, "", "unique worker id (default: role@host:port)"),
    Option("--host-id", str, None, "machine identity for shared memory (default: hostname/boot id)"),
    Option("--transports", _names, ("shm", "grpc"), "KV transports offered, best first (e.g. shm,grpc)"),
    Option(
        "--prefix-caching",
        _boolean,
        True,
        "keep freed full KV blocks findable by hash and reuse cached prompt prefixes",
        boolean=True,
    ),
    Option(
        "--require-cache-salt",
        _boolean,
        False,
        "refuse requests without a tenant cache salt (when the gateway has --api-keys-file)",
        boolean=True,
    ),
)
ROLE_OPTIONS: dict[str, tuple[Option, ...]] = {
    "gateway": (
        *SERVER_OPTIONS,
        MODEL,
        CACHE_STORE,
        Option("--max-tokens-limit", int, 1024, "largest sampling.max_tokens accepted"),
        Option("--default-max-tokens", int, 64, "tokens generated when a request asks for 0"),
        Option("--max-request-bytes", parse_bytes, 1024 * 1024, "largest request accepted (e.g. 1MiB)"),
        Option("--max-snippet-chars", int, 16384, "longest update snippet an edit may send, in characters"),
        MAX_STOP_STRINGS,
        MAX_STOP_STRING_CHARS,
        Option("--request-timeout-s", float, 60.0, "deadline of requests that set none, in seconds"),
        Option("--refresh-ms", int, 500, "how often the worker list is re-read, in milliseconds"),
        Option(
            "--unlisted-grace-ms", int, 5000, "how long a worker the cache store stops listing stays routable"
        ),
        Option("--use-prefill-min-tokens", int, 0, "shorter prompts are prefilled by the decode worker"),
        Option("--transport", str, "auto", "KV transport between workers", ("auto", "shm", "grpc")),
        Option("--max-attempts", int, 3, "tries per request when a worker is unavailable"),
        Option(
            "--api-keys-file",
            str,
            None,
            'JSON {"keys": {key: tenant}, "groups": {tenant: group}}; unset: multi-tenancy off',
        ),
        Option(
            "--salt-secret-file",
            str,
            None,
            "file of the secret (>= 32 bytes) tenant cache salts are HMACs under; required with --api-keys-file",
        ),
        Option(
            "--disagg-min-tokens",
            int,
            256,
            "an uncached part shorter than this is prefilled by the decode worker",
        ),
        Option("--decode-load-weight", float, 1.0, "routing cost of one request of decode load, in blocks"),
        Option("--max-load-imbalance", int, 4, "requests a decode worker may exceed the least loaded by"),
        Option("--lookup-timeout-ms", int, 100, "cache store lookup deadline; past it, route by load alone"),
        Option("--public-tls-cert", str, None, "TLS certificate (PEM) of the public port; unset: plaintext"),
        Option("--public-tls-key", str, None, "private key (PEM) of --public-tls-cert"),
    ),
    "prefill": (
        *SERVER_OPTIONS,
        *WORKER_OPTIONS,
        Option("--max-num-batched-tokens", int, 2048, "token budget of one forward pass"),
    ),
    "decode": (
        *SERVER_OPTIONS,
        *WORKER_OPTIONS,
        Option(
            "--max-num-batched-tokens",
            int,
            DECODE_TOKEN_BUDGET,
            "token budget of one forward pass: decodes, drafts and prompt chunks (small: short gaps)",
        ),
        Option("--max-tokens-limit", int, 4096, "largest sampling.max_tokens accepted"),
        MAX_STOP_STRINGS,
        MAX_STOP_STRING_CHARS,
        Option(
            "--kv-quarantine-s", float, 2.0, "most seconds a cancelled shm transfer's blocks stay out of use"
        ),
        Option(
            "--layerwise-transfer",
            _boolean,
            True,
            "ask prefill workers to ship each layer's KV as soon as the last chunk computed it",
            boolean=True,
        ),
    ),
    "cache-store": (
        *SERVER_OPTIONS,
        Option("--heartbeat-interval-ms", int, 1000, "how often workers heartbeat, in milliseconds"),
        Option("--expiry-ms", int, 5000, "workers silent this long are dropped, in milliseconds"),
    ),
}

TARGET = Option("--target", str, "127.0.0.1:50051", "gateway address, host:port")
TIMEOUT_S = Option("--timeout-s", float, 60.0, "deadline of the call, in seconds")
API_KEY = Option("--api-key", str, None, "API key for a gateway with multi-tenancy on (prefer the variable)")
TLS_CA = Option(
    "--tls-ca", str, None, "CA certificate (PEM) to verify a gateway that serves TLS; unset: plaintext"
)
CLIENT_OPTIONS = (TARGET, TIMEOUT_S, API_KEY, TLS_CA)
UP_OPTIONS = (
    Option("--port", int, 50051, "the gateway's gRPC port"),
    MODEL,
    Option("--transport", str, "auto", "KV transport between workers", ("auto", "shm", "grpc")),
    Option("--log-level", str, "warning", "the roles' logging level", LOG_LEVELS),
    Option("--startup-timeout-s", float, 180.0, "how long each role may take to report SERVING"),
    Option(
        "--insecure",
        _boolean,
        False,
        "plaintext between the roles (default: mutual TLS with a throwaway CA)",
        boolean=True,
    ),
)

PER_PROCESS_VARIABLES = ("--port", "--metrics-port", "--worker-id", "--health-port")
"""Variables `kvmesh up` does not pass on: four processes cannot share one port or one id."""


def add_options(parser: argparse.ArgumentParser, options: Sequence[Option]) -> None:
    """Adds each option as a flag; its help names the variable and the default."""
    for option in options:
        default = option.default
        if isinstance(default, tuple):
            default = ",".join(default)
        fallback = "" if default is None else f"; default {default}"
        if option.boolean:
            parser.add_argument(
                option.flag,
                dest=option.dest,
                default=None,  # None: not given; resolve() falls back to the variable, then the default
                action=argparse.BooleanOptionalAction,
                help=f"{option.help} [env {option.env}{fallback}]",
            )
            continue
        parser.add_argument(
            option.flag,
            dest=option.dest,
            default=None,  # None: not given; resolve() falls back to the variable, then the default
            choices=option.choices,
            metavar=option.dest.upper(),
            help=f"{option.help} [env {option.env}{fallback}]",
        )


def resolve(
    options: Sequence[Option], args: argparse.Namespace, environ: Mapping[str, str] = os.environ
) -> dict[str, Any]:
    """Each option's value: the flag, else its variable, else the default. Raises SettingsError."""
    values: dict[str, Any] = {}
    for option in options:
        flag_value = getattr(args, option.dest, None)
        if flag_value is not None:
            raw, source = flag_value, option.flag
        elif option.env in environ:
            raw, source = environ[option.env], option.env
        else:
            values[option.dest] = option.default
            continue
        if option.choices is not None and raw not in option.choices:
            raise SettingsError(f"{source}={raw!r}: choose one of {', '.join(option.choices)}")
        try:
            values[option.dest] = option.parse(raw)
        except ValueError as error:
            raise SettingsError(f"{source}={raw!r}: {error}") from None
    return values
