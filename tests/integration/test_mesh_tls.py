"""End to end through a mesh whose roles talk mutual TLS: the same answer as the engine in process, every
hop (gateway -> cache store, gateway -> decode, decode -> prefill, workers -> cache store) over TLS."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from gateway.layout import PromptLayout
from gateway.routing_cost import RoutingConfig
from kvmesh.client import Client
from kvmesh.engine.engine import Engine
from kvmesh.mesh.tls import PublicTLSConfig, make_mesh_certs
from kvmesh.v1 import decode_pb2, decode_pb2_grpc
from tests.mesh_harness import MeshInThread, MeshSpec

PREFIX = "import os\n\ndef read_config(path):\n    with open(path) as f:\n        "
SUFFIX = "\n    return config\n"


@pytest.mark.parametrize("transport", ["grpc", "shm"])
def test_completion_through_a_mutual_tls_mesh(mesh_model_path: Path, transport: str) -> None:
    engine = Engine.from_pretrained(mesh_model_path)
    expected = engine.generate(PromptLayout(engine.tokenizer).completion(PREFIX, SUFFIX), 16)
    spec = MeshSpec(
        str(mesh_model_path),
        routing=RoutingConfig(transport=transport, disagg_min_tokens=0),
        mutual_tls=True,
    )
    with MeshInThread(spec) as mesh:
        assert set(mesh.run(mesh.worker_loads())) == {
            f"{role}@{mesh.servers[f'{role}-0'].address}" for role in ("prefill", "decode")
        }
        with Client(mesh.gateway_address) as client:
            chunks = list(client.complete(prefix=PREFIX, suffix=SUFFIX, max_tokens=16))
        # A client of the public port cannot skip the gateway: the decode worker wants a mesh certificate.
        with grpc.insecure_channel(mesh.servers["decode-0"].address) as channel:
            with pytest.raises(grpc.RpcError) as raised:
                list(decode_pb2_grpc.DecodeStub(channel).Generate(decode_pb2.GenerateRequest(), timeout=5))
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert [t for c in chunks for t in c.token_ids] == expected
    usage = chunks[-1].usage
    assert usage is not None and usage.transport == transport and usage.prefilled_tokens > 0


def test_gateway_public_port_with_tls(mesh_model_path: Path, tmp_path: Path) -> None:
    """The public port's own TLS (server-only): a client that trusts its CA is served."""
    certs = make_mesh_certs(tmp_path)  # any CA will do for the public port
    public = PublicTLSConfig(str(certs / "gateway.crt"), str(certs / "gateway.key"))
    spec = MeshSpec(str(mesh_model_path), num_prefill=0, mutual_tls=True, public_tls=public)
    with MeshInThread(spec) as mesh:
        with Client(mesh.gateway_address, tls_ca_file=str(certs / "ca.crt")) as client:
            chunks = list(client.complete(prefix=PREFIX, suffix=SUFFIX, max_tokens=4))
        assert chunks[-1].usage is not None
        with Client(mesh.gateway_address) as plain, pytest.raises(grpc.RpcError):
            list(plain.complete(prefix=PREFIX, suffix=SUFFIX, max_tokens=4))
