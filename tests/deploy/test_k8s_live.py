"""The four roles started exactly as the cpu overlay's containers would start them, so the manifests cannot
drift from the code."""

from __future__ import annotations

import base64
import json
import os
import queue
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvmesh.cli.launcher import SERVING_LINE
from kvmesh.client import Client
from kvmesh.mesh.tls import make_mesh_certs
from tests.k8s_support import (
    ROOT,
    WORKERS,
    Container,
    by_role,
    containers,
    named,
    of_kind,
    selects,
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RoleProcess:
    """`python -m kvmesh.cli serve ARGS` (the image runs `kvmesh serve ARGS`) with a container's env."""

    def __init__(self, role: str, args: list[str], env: dict[str, str], cwd: Path) -> None:
        self.role = role
        self.address = ""
        """host:port from the serving line."""
        self.process = subprocess.Popen(
            [sys.executable, "-m", "kvmesh.cli", "serve", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=cwd,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.stderr_tail: list[str] = []
        threading.Thread(target=self._read, args=(self.process.stdout, True), daemon=True).start()
        threading.Thread(target=self._read, args=(self.process.stderr, False), daemon=True).start()

    def _read(self, stream: Any, stdout: bool) -> None:
        for line in stream:
            if stdout:
                self.lines.put(line.rstrip("\n"))
            else:
                self.stderr_tail = [*self.stderr_tail[-19:], line.rstrip("\n")]

    def wait_serving(self, deadline: float) -> str:
        """The address from the serving line; fails with the role's stderr if it exits or is late."""
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, min(0.2, deadline - time.monotonic())))
            except queue.Empty:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    time.sleep(0.2)  # the last stderr lines
                    tail = "\n".join(self.stderr_tail)
                    pytest.fail(f"{self.role} not SERVING (exit {self.process.poll()}):\n{tail}")
                continue
            match = SERVING_LINE.match(line)
            if match is not None and match["role"] == self.role:
                self.address = match["address"]
                return self.address

    def stop(self, timeout_s: float) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                pytest.fail(f"{self.role} did not stop within {timeout_s} s of SIGTERM")
        return self.process.returncode


def loopback_env(
    container: Container,
    objects: list[dict[str, Any]],
    ports: dict[tuple[str, int], int],
    model: Path,
    root: Path,
) -> dict[str, str]:
    """The container's env with loopback in place of Service names, free ports in place of the
    manifests' fixed ones (four pods would share them on one machine), the test checkpoint in place of
    the model, and Secret volumes written under root."""
    services = {s["metadata"]["name"]: s for s in of_kind(objects, "Service")}
    certificates = {c["spec"]["secretName"] for c in of_kind(objects, "Certificate")}
    if certificates and not (root / "mesh-certs").exists():
        make_mesh_certs(root / "mesh-certs")
    owners = {c.role: c for c in containers(objects)}
    env = dict(container.env)
    env["KVMESH_PORT"] = str(ports[container.role, int(env["KVMESH_PORT"])])
    env["KVMESH_METRICS_PORT"] = str(ports[container.role, int(env["KVMESH_METRICS_PORT"])])
    if "KVMESH_HEALTH_PORT" in env:
        env["KVMESH_HEALTH_PORT"] = str(ports[container.role, int(env["KVMESH_HEALTH_PORT"])])
    env["KVMESH_MODEL"] = str(model)
    for name, value in list(env.items()):
        host, _, port = value.rpartition(":")
        if host in services:
            service = services[host]
            (service_port,) = [p for p in service["spec"]["ports"] if p["port"] == int(port)]
            (owner,) = [
                c
                for c in owners.values()
                if selects(
                    {"matchLabels": service["spec"]["selector"]},
                    c.deployment["spec"]["template"]["metadata"]["labels"],
                )
            ]
            env[name] = f"127.0.0.1:{ports[owner.role, owner.port(service_port['targetPort'])]}"
    for mount in container.spec.get("volumeMounts", []):
        volume = container.volume(mount["mountPath"])
        if "secret" not in volume:
            continue
        directory = root / container.role / mount["mountPath"].lstrip("/")
        directory.mkdir(parents=True)
        if volume["secret"]["secretName"] in certificates:
            # Issued in the cluster (the cert-manager component): the test's mesh CA stands in for it.
            for item in volume["secret"].get("items", []):
                key = {
                    "ca.crt": "ca.crt",
                    "tls.crt": f"{container.role}.crt",
                    "tls.key": f"{container.role}.key",
                }
                shutil.copy(root / "mesh-certs" / key[item["key"]], directory / item["path"])
            env = {k: v.replace(mount["mountPath"], str(directory)) for k, v in env.items()}
            continue
        if volume["secret"]["secretName"] == "kvmesh-salt-secret":
            # Created in the cluster by the operator (README), never rendered: a fresh one stands in.
            (directory / "salt.key").write_text(secrets.token_hex(32))
            env = {k: v.replace(mount["mountPath"], str(directory)) for k, v in env.items()}
            continue
        secret = named(objects, "Secret", volume["secret"]["secretName"])
        for key, data in secret["data"].items():
            (directory / key).write_bytes(base64.b64decode(data))
        env = {k: v.replace(mount["mountPath"], str(directory)) for k, v in env.items()}
    return env


def health_status(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return int(reply.status)


@pytest.fixture
def started_roles(
    rendered: dict[str, list[dict[str, Any]]], mesh_model_path: Path, tmp_path: Path
) -> Iterator[tuple[dict[str, RoleProcess], dict[str, Container], dict[tuple[str, int], int]]]:
    objects = rendered["cpu"]
    roles = by_role(objects)
    ports = {
        (role, port["containerPort"]): free_port() for role, c in roles.items() for port in c.spec["ports"]
    }
    base_env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), "HOME": str(tmp_path)}
    processes: dict[str, RoleProcess] = {}

    def start(role: str) -> None:
        container = roles[role]
        env = {**base_env, **loopback_env(container, objects, ports, mesh_model_path, tmp_path / "volumes")}
        processes[role] = RoleProcess(role, list(container.spec["args"]), env, tmp_path)

    try:
        deadline = time.monotonic() + 60
        start("cache-store")  # the others dial it at start-up
        processes["cache-store"].wait_serving(deadline)
        for role in WORKERS:
            start(role)
        for role in WORKERS:
            processes[role].wait_serving(deadline)
        start("gateway")  # SERVING once a decode worker is live
        processes["gateway"].wait_serving(deadline)
        yield processes, roles, ports
    finally:
        for role in ("gateway", "decode", "prefill", "cache-store"):
            if role in processes:
                processes[role].stop(float(roles[role].env["KVMESH_GRACE_S"]) + 5)


@pytest.mark.slow
def test_each_role_starts_as_its_manifest_says(
    started_roles: tuple[dict[str, RoleProcess], dict[str, Container], dict[tuple[str, int], int]],
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """cpu overlay: each role's args and env, on loopback, reach SERVING on the port its probes check,
    serve metrics where Prometheus is told to scrape, and together serve a completion with the API key
    from the Secret."""
    processes, roles, ports = started_roles
    for role, container in roles.items():
        grpc_port = ports[role, container.port("grpc")]
        address = processes[role].address
        assert address.endswith(f":{grpc_port}"), f"{role} serves on {address}"
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container.spec[kind]
            manifest_port = probe.get("grpc", probe.get("tcpSocket", {}))["port"]
            probe_port = ports.get((role, manifest_port))
            assert probe_port is not None, f"{role} {kind}: port {manifest_port} is no container port"
            if "grpc" in probe:
                assert health_status(f"127.0.0.1:{probe_port}") == health_pb2.HealthCheckResponse.SERVING
            else:
                socket.create_connection(("127.0.0.1", probe_port), timeout=5).close()
        metrics_port = ports[role, int(container.annotations["prometheus.io/port"])]
        url = f"http://127.0.0.1:{metrics_port}{container.annotations['prometheus.io/path']}"
        with urllib.request.urlopen(url, timeout=5) as reply:
            metrics = reply.read().decode()
        hpas = [
            h
            for h in of_kind(rendered["cpu"], "HorizontalPodAutoscaler")
            if h["spec"]["scaleTargetRef"]["name"] == container.deployment["metadata"]["name"]
        ]
        for hpa in hpas:  # the adapter serves vllm:X as vllm_X (see the README)
            for metric in hpa["spec"]["metrics"]:
                exported = metric["pods"]["metric"]["name"].replace("vllm_", "vllm:", 1)
                assert re.search(rf"^{re.escape(exported)}\{{", metrics, re.MULTILINE), f"{role}: {exported}"

    secret = named(
        rendered["cpu"], "Secret", roles["gateway"].volume("/etc/kvmesh/api-keys")["secret"]["secretName"]
    )
    api_key = next(iter(json.loads(base64.b64decode(secret["data"]["keys.json"]))["keys"]))
    gateway = processes["gateway"].address
    with Client(gateway, timeout_s=30, api_key=api_key) as client:
        chunks = list(client.complete(prefix="def add(a, b):\n    ", suffix="\n", max_tokens=4))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    with Client(gateway, timeout_s=30) as client, pytest.raises(grpc.RpcError) as error:
        list(client.complete(prefix="x = ", max_tokens=1))
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED

    for role in ("gateway", "decode", "prefill", "cache-store"):  # SIGTERM: a clean stop within its grace
        assert processes[role].stop(float(roles[role].env["KVMESH_GRACE_S"]) + 5) == 0, role
