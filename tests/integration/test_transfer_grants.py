"""A prefill worker writes into a decode worker's shared-memory pool only the blocks that the pool's owner
reserved for the request: an attacker that can call Prefill cannot overwrite another tenant's KV."""

from __future__ import annotations

import os
import time
from pathlib import Path

import grpc
import pytest
import torch

from kvmesh.engine.kv_cache import KVLayout
from kvmesh.mesh.convert import layout_to_proto
from kvmesh.mesh.worker_config import default_host_id
from kvmesh.transport.grant import sign_grant
from kvmesh.transport.shm import SHM_DIR, attach
from kvmesh.v1 import prefill_pb2, prefill_pb2_grpc
from tests.factories import random_ids
from tests.mesh_harness import MeshInThread, MeshSpec


def pool_layout(name: str) -> KVLayout:
    """The layout a segment's header names (what an attacker on the host could read too)."""
    with open(os.path.join(SHM_DIR, name), "rb") as segment:
        fields = segment.read(256).split(b"\n", 1)[0].decode().split()
    num_layers, num_blocks, block_size, num_kv_heads, head_dim = map(int, fields[1:6])
    return KVLayout(num_layers, num_blocks, block_size, num_kv_heads, head_dim, getattr(torch, fields[6]))


def segments() -> set[str]:
    return {name for name in os.listdir(SHM_DIR) if name.startswith("kvmesh-")}


@pytest.fixture(scope="module")
def mesh(mesh_model_path: Path):
    before = segments()
    # NOTE: an odd pool size tells this mesh's decode pool from other tests' running beside it.
    with MeshInThread(MeshSpec(str(mesh_model_path), num_blocks=61)) as mesh:
        [victim] = [name for name in segments() - before if pool_layout(name).num_blocks == 61]
        yield mesh, victim


def prefill(mesh: MeshInThread, destination: prefill_pb2.KVDestination) -> grpc.RpcError:
    request = prefill_pb2.PrefillRequest(
        request_id="attack", token_ids=random_ids(40, seed=5), destination=destination
    )
    with (
        grpc.insecure_channel(mesh.servers["prefill-0"].address) as channel,
        pytest.raises(grpc.RpcError) as raised,
    ):
        list(prefill_pb2_grpc.PrefillStub(channel).Prefill(request, timeout=30))
    return raised.value


def test_a_prefill_into_blocks_nobody_granted_is_refused_and_writes_nothing(mesh) -> None:
    mesh, victim = mesh
    layout = pool_layout(victim)
    pool = attach(victim, layout)
    before = pool.clone()
    expires = int(time.time() * 1000) + 60_000
    base = dict(
        transport="shm",
        shm_name=victim,
        block_ids=[0, 1, 2],
        layout=layout_to_proto(layout),
        host_id=default_host_id(),  # the host's identity is no secret
        first_block=0,
    )
    attempts = [
        prefill_pb2.KVDestination(**base),  # no grant at all
        prefill_pb2.KVDestination(**base, grant=bytes(32), grant_expires_unix_ms=expires),  # made up
        # Signed, but with a key the attacker chose: only the segment's own key counts.
        prefill_pb2.KVDestination(
            **base,
            grant=sign_grant(b"k" * 32, "attack", victim, [0, 1, 2], expires),
            grant_expires_unix_ms=expires,
        ),
    ]
    for destination in attempts:
        error = prefill(mesh, destination)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error.details()
        assert "grant" in error.details()
    assert torch.equal(pool, before)
