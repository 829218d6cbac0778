"""Rendering and reading the Kubernetes manifests (k8s/) for the tests that check them against the code."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import opentelemetry.environment_variables
import opentelemetry.sdk.environment_variables
import pytest
import yaml

from kvmesh.cli.options import ROLES

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
