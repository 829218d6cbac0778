"""The kvmesh command: flags and KVMESH_* variables into role configs, `serve` as a real process, `up`."""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cache_store.server import CacheStoreConfig
from decode_service.config import DecodeConfig
from gateway.config import GatewayConfig
from gateway.routing_cost import RoutingConfig
from kvmesh.cli.launcher import SERVING_LINE
from kvmesh.cli.main import build_parser, main
from kvmesh.cli.options import ROLE_OPTIONS, SettingsError, parse_bytes
from kvmesh.cli.settings import RoleSettings, child_environ, role_settings
from prefill_service.config import PrefillConfig
from tests.fake_decode import write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(list(argv))


def settings_for(*argv: str, environ: dict[str, str] | None = None) -> RoleSettings:
    args = parse(*argv)
    return role_settings(args.role, args, environ or {}, default_model=lambda: "/default/model")


def kvmesh_process(*argv: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    environ = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "kvmesh.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environ,
        cwd=ROOT,
    )


# --- flags and variables --------------------------------------------------------------------------


def test_decode_flags_and_variables() -> None:
    settings = settings_for(
        "serve",
        "decode",
        "--cache-store",
        "10.0.0.1:7000",
        "--port",
        "7001",
        "--kv-cache-bytes",
        "64MiB",
        "--transports",
        "grpc",
        "--threads",
        "2",
        environ={
            "KVMESH_PORT": "9999",
            "KVMESH_MAX_NUM_SEQS": "8",
            "KVMESH_MODEL": "/env/model",
            "KVMESH_NUM_BLOCKS": "none",
        },
    )
    config = settings.config
    assert isinstance(config, DecodeConfig)
    assert config.server.port == 7001  # the flag wins over KVMESH_PORT
    assert config.model.engine.max_num_seqs == 8  # the variable wins over the default
    assert config.model.path == "/env/model"
    assert config.model.engine.kv_cache_bytes == 64 * 1024 * 1024
    assert config.model.engine.num_blocks is None
    assert config.model.num_threads == settings.num_threads == 2
    assert config.registration.cache_store_address == "10.0.0.1:7000"
    assert config.registration.transports == ("grpc",)
    assert config.registration.host_id  # defaults to this machine's identity
    assert config.max_tokens_limit == 4096 and config.metrics_port is None


def test_prefill_and_cache_store_configs() -> None:
    prefill = settings_for(
        "serve",
        "prefill",
        "--host-id",
        "node-7",
        "--metrics-port",
        "9100",
        environ={"KVMESH_CACHE_STORE": "store:1"},
    )
    assert isinstance(prefill.config, PrefillConfig)
    assert prefill.config.model.path == "/default/model"  # no --model: the default model
    assert prefill.config.registration.host_id == "node-7"
    assert prefill.config.metrics_port == 9100
    store = settings_for("serve", "cache-store", "--expiry-ms", "3000", environ={"KVMESH_GRACE_S": "1.5"})
    assert store.config == CacheStoreConfig(expiry_ms=3000, grace_s=1.5)
    assert store.num_threads is None


def test_gateway_config() -> None:
    settings = settings_for(
        "serve",
        "gateway",
        "--cache-store",
        "store:1",
        "--model",
        "/m",
        "--port",
        "50051",
        "--max-request-bytes",
        "2MiB",
        "--transport",
        "grpc",
        "--disagg-min-tokens",
        "128",
        "--decode-load-weight",
        "2.5",
        environ={
            "KVMESH_USE_PREFILL_MIN_TOKENS": "64",
            "KVMESH_REQUEST_TIMEOUT_S": "5",
            "KVMESH_MAX_LOAD_IMBALANCE": "7",
            "KVMESH_BLOCK_SIZE": "32",  # a worker setting (`kvmesh up` shares one environment): not read
        },
    )
    config = settings.config
    assert isinstance(config, GatewayConfig)
    assert (config.server.port, config.model_path) == (50051, "/m")
    assert config.max_request_bytes == 2 * 1024 * 1024 and config.request_timeout_s == 5.0
    assert (config.max_tokens_limit, config.default_max_tokens, config.refresh_ms) == (1024, 64, 500)
    # The routing flags and variables make the nested RoutingConfig, every field of it.
    assert config.routing == RoutingConfig(
        disagg_min_tokens=128,
        decode_load_weight=2.5,
        max_load_imbalance=7,
        use_prefill_min_tokens=64,
        transport="grpc",
    )
    assert "block_size" not in {f.name for f in dataclasses.fields(config)}
    defaults = settings_for("serve", "gateway", "--cache-store", "store:1", "--model", "/m").config
    assert isinstance(defaults, GatewayConfig) and defaults.routing == RoutingConfig()


def test_gateway_has_no_block_size_flag() -> None:
    # The gateway hashes prompts in the block size the workers advertise (gateway.router.WorkerPool).
    with pytest.raises(SystemExit):
        settings_for("serve", "gateway", "--cache-store", "store:1", "--block-size", "32")


@pytest.mark.parametrize(
    ("argv", "environ", "fragment"),
    [
        (("serve", "decode"), {}, "--cache-store (or KVMESH_CACHE_STORE) is required"),
        (("serve", "decode", "--cache-store", "s:1"), {"KVMESH_PORT": "eighty"}, "KVMESH_PORT='eighty'"),
        (
            ("serve", "gateway", "--cache-store", "s:1"),
            {"KVMESH_TRANSPORT": "udp"},
            "KVMESH_TRANSPORT='udp': choose one of",
        ),
        (
            ("serve", "decode", "--cache-store", "s:1", "--kv-cache-bytes", "lots"),
            {},
            "--kv-cache-bytes='lots'",
        ),
        (
            ("serve", "gateway", "--cache-store", "s:1", "--default-max-tokens", "2000"),
            {},
            "default_max_tokens (2000)",
        ),
    ],
)
def test_bad_values_name_the_flag_or_variable(
    argv: tuple[str, ...], environ: dict[str, str], fragment: str
) -> None:
    with pytest.raises(SettingsError) as raised:
        settings_for(*argv, environ=environ)
    assert fragment in str(raised.value)


def test_parse_bytes() -> None:
    assert parse_bytes("1024") == 1024
    assert parse_bytes("256MiB") == parse_bytes("256M") == parse_bytes("256mb") == 256 * 1024**2
    assert parse_bytes("1.5GiB") == 3 * 1024**3 // 2
    with pytest.raises(ValueError):
        parse_bytes("12 parsecs")


def test_child_environ_drops_per_process_variables() -> None:
    environ = {
        "KVMESH_PORT": "1",
        "KVMESH_METRICS_PORT": "2",
        "KVMESH_WORKER_ID": "w",
        "KVMESH_DTYPE": "bfloat16",
        "PATH": "/bin",
    }
    assert child_environ(environ) == {"KVMESH_DTYPE": "bfloat16", "PATH": "/bin"}


@pytest.mark.parametrize("role", list(ROLE_OPTIONS))
def test_serve_help_lists_every_flag_with_its_variable(role: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", role, "--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for option in ROLE_OPTIONS[role]:
        assert option.flag in text and option.env in text


def test_bad_variable_exits_2(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVMESH_EXPIRY_MS", "soon")
    assert main(["serve", "cache-store"]) == 2
    assert "KVMESH_EXPIRY_MS='soon'" in capsys.readouterr().err


# --- real processes ---------------------------------------------------------------------------------


def test_serve_cache_store_prints_its_line_and_stops_on_sigterm() -> None:
    process = kvmesh_process("serve", "cache-store", "--port", "0", env={"KVMESH_GRACE_S": "1"})
    try:
        assert process.stdout is not None
        line = process.stdout.readline().rstrip("\n")
        match = SERVING_LINE.match(line)
        assert match is not None and match["role"] == "cache-store", line
        with grpc.insecure_channel(match["address"]) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    assert stdout == ""  # exactly one line in all
    assert "received SIGTERM" in stderr


def test_serve_gateway_with_a_missing_model_exits_1(tmp_path: Path) -> None:
    process = kvmesh_process("serve", "gateway", "--cache-store", "127.0.0.1:1", "--model", str(tmp_path))
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 1
    assert stdout == ""
    assert "kvmesh serve gateway:" in stderr and "tokenizer.json" in stderr


def test_up_names_the_role_that_failed(tmp_path: Path) -> None:
    process = kvmesh_process("up", "--port", "0", "--model", str(tmp_path), "--startup-timeout-s", "120")
    stdout, stderr = process.communicate(timeout=180)
    assert process.returncode == 1
    assert stdout == ""
    assert "kvmesh up:" in stderr and "before SERVING" in stderr
    assert any(f"last stderr lines of {role}" in stderr for role in ("prefill", "decode", "gateway")), stderr


@pytest.mark.slow
def test_up_serves_a_completion_and_stops_on_sigint(tmp_path: Path, code_tokenizer_json: Path) -> None:
    model = write_tiny_checkpoint(tmp_path / "model", code_tokenizer_json)
    process = kvmesh_process("up", "--port", "0", "--model", str(model))
    try:
        assert process.stdout is not None
        line = process.stdout.readline().rstrip("\n")
        assert line.startswith("kvmesh up: gateway on 127.0.0.1:"), line
        assert line.endswith("(prefill, decode, cache-store SERVING)")
        address = line.split()[4]
        source = tmp_path / "f.py"
        source.write_text("def add(a, b):\n    \n")
        client = subprocess.run(
            [
                sys.executable,
                "-m",
                "kvmesh.cli",
                "complete",
                "--target",
                address,
                "--file",
                str(source),
                "--line",
                "1",
                "--column",
                "4",
                "--max-tokens",
                "5",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        assert client.returncode == 0, client.stderr
        assert "completion_tokens=5" in client.stderr and "finish=length" in client.stderr
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    assert stdout == ""


def test_a_gpu_decode_worker_offering_shm_is_refused_with_what_to_change() -> None:
    with pytest.raises((SettingsError, ValueError), match="--transports grpc"):
        settings_for("serve", "decode", "--model", "/m", "--cache-store", "h:1", "--device", "cuda")
    settings = settings_for(
        "serve", "decode", "--model", "/m", "--cache-store", "h:1", "--device", "cuda", "--transports", "grpc"
    )
    assert isinstance(settings.config, DecodeConfig)


def test_up_with_multi_tenancy_generates_a_private_salt_secret() -> None:
    import asyncio
    import stat

    from kvmesh.cli.launcher import LocalMesh

    tenants = LocalMesh(port=0, model_path="unused", environ={"KVMESH_API_KEYS_FILE": "/keys.json"})
    tenants._ensure_salt_secret()
    secret = Path(tenants._environ["KVMESH_SALT_SECRET_FILE"])
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600 and len(secret.read_text()) == 64
    asyncio.run(tenants.stop())
    assert not secret.exists() and "KVMESH_SALT_SECRET_FILE" not in tenants._environ
    # The operator's own secret is kept; without multi-tenancy, none is made.
    given = {"KVMESH_API_KEYS_FILE": "/keys.json", "KVMESH_SALT_SECRET_FILE": "/etc/salt.key"}
    for environ in (given, {}):
        mesh = LocalMesh(port=0, model_path="unused", environ=environ)
        mesh._ensure_salt_secret()
        assert mesh._environ == environ
