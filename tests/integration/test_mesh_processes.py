"""Every role in its own process (`kvmesh serve`); faults injected into such a mesh are in test_faults.py."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from kvmesh.v1 import gateway_pb2_grpc
from tests.processes import Mesh, complete_request, expected_tokens, free_port, scrape

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model(mesh_model_path: Path) -> Path:
    return mesh_model_path


@pytest.mark.parametrize("transport", ["shm", "grpc"])
def test_roles_in_their_own_processes_stream_what_the_engine_generates(model, transport):
    with Mesh(model, transport=transport) as mesh, grpc.insecure_channel(mesh.gateway) as channel:
        chunks = list(gateway_pb2_grpc.GatewayStub(channel).Complete(complete_request(20), timeout=60))
    assert [t for c in chunks for t in c.token_ids] == expected_tokens(model, 20)
    assert chunks[-1].usage.transport == transport
    assert {role.process.returncode for role in mesh.roles.values()} == {0}


def test_worker_metrics_count_prefix_cache_queries_and_hits(model):
    port = free_port()
    with (
        Mesh(model, decode_args=("--metrics-port", str(port))) as mesh,
        grpc.insecure_channel(mesh.gateway) as channel,
    ):
        stub = gateway_pb2_grpc.GatewayStub(channel)
        list(stub.Complete(complete_request(4), timeout=60))
        before = scrape(port)
        last = list(stub.Complete(complete_request(4), timeout=60))[-1]
        after = scrape(port)
    hits = 'vllm:prefix_cache_hits_total{role="decode"}'
    queries = 'vllm:prefix_cache_queries_total{role="decode"}'
    assert after[hits] - before[hits] == last.usage.cached_tokens > 0
    assert after[queries] - before[queries] >= last.usage.cached_tokens
    assert after['kvmesh_kv_blocks_used{role="decode"}'] == 0
    assert after['kvmesh_kv_blocks_cached{role="decode"}'] > 0
