"""MoE and MLA checkpoints through the real mesh: completions and speculative edits equal the in-process
engine's, over the shared-memory and the gRPC transports, and a repeated keystroke hits the cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway.layout import PromptLayout
from gateway.routing_cost import RoutingConfig
from kvmesh.client import Client
from kvmesh.engine.engine import Engine
from kvmesh.engine.generate import generate_speculative
from kvmesh.v1 import gateway_pb2_grpc
from tests.integration.test_faults import tokens_of
from tests.mesh_harness import MeshInThread, MeshSpec
from tests.processes import Mesh, complete_request, prompt_tokens

pytest.importorskip("transformers")

CHECKPOINTS: dict[str, tuple[str, dict[str, Any]]] = {
    # MoE + multi-latent attention: DeepSeek-V2's recipe (a latent KV cache, shared experts, a dense layer).
    "deepseek-v2": (
        "deepseek_v2",
        {
            "kv_lora_rank": 24,
            "qk_nope_head_dim": 12,
            "qk_rope_head_dim": 8,
            "v_head_dim": 20,
            "num_key_value_heads": 4,
            "q_lora_rank": None,
            "n_routed_experts": 5,
            "num_experts_per_tok": 2,
            "n_shared_experts": 1,
            "moe_intermediate_size": 24,
            "first_k_dense_replace": 1,
        },
    ),
    "qwen3-moe": ("qwen3_moe", {"num_experts": 5, "num_experts_per_tok": 2, "moe_intermediate_size": 40}),
}
PREFIX = "import os\n\ndef read_config(path):\n    with open(path) as f:\n        "
SUFFIX = "\n    return config\n"


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def checkpoint(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, make_hf_checkpoint
) -> Path:
    arch, overrides = CHECKPOINTS[request.param]
    return make_hf_checkpoint(tmp_path_factory.mktemp(request.param), arch, seed=3, **overrides)


@pytest.mark.parametrize("transport", ["shm", "grpc"])
def test_completions_and_edits_through_the_mesh_equal_the_engine(checkpoint: Path, transport: str) -> None:
    engine = Engine.from_pretrained(checkpoint)
    layout = PromptLayout(engine.tokenizer)
    expected = engine.generate(layout.completion(PREFIX, SUFFIX), 12)
    original = "def add(a, b):\n    return a + b\n"
    snippet = "def add(a, b, c):\n    return a + b + c\n"
    edit_prompt = layout.edit(original, snippet)
    expected_edit, _ = generate_speculative(engine, edit_prompt.token_ids, edit_prompt.draft_token_ids, 24)
    assert (
        len(expected) > 1 and len(expected_edit) > 1
    )  # random weights: make sure there is output to compare
    spec = MeshSpec(str(checkpoint), routing=RoutingConfig(transport=transport, disagg_min_tokens=0))
    with MeshInThread(spec) as mesh, Client(mesh.gateway_address) as client:
        first = list(client.complete(prefix=PREFIX, suffix=SUFFIX, max_tokens=12))
        again = list(client.complete(prefix=PREFIX, suffix=SUFFIX, max_tokens=12))
        edit = list(client.edit(original=original, snippet=snippet, max_tokens=24))
    assert [t for c in first for t in c.token_ids] == expected
    assert first[-1].usage.transport == transport
    assert [t for c in again for t in c.token_ids] == expected
    assert again[-1].usage.cached_tokens > 0  # the repeated keystroke found its prefix
    assert [t for c in edit for t in c.token_ids] == expected_edit


def test_an_mla_checkpoint_through_kvmesh_serve_processes(checkpoint: Path) -> None:
    """The same roles as `kvmesh up` starts them (one process each, the shm transport): the stream equals
    the in-process engine's greedy output, and a repeated keystroke hits the cache."""
    with Mesh(checkpoint, transport="shm") as mesh, grpc.insecure_channel(mesh.gateway) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        first = list(stub.Complete(complete_request(12), timeout=120))
        again = list(stub.Complete(complete_request(12), timeout=120))
    expected = Engine.from_pretrained(checkpoint).generate(prompt_tokens(checkpoint), 12, ignore_eos=True)
    assert tokens_of(first) == tokens_of(again) == expected
    assert first[-1].usage.transport == "shm" and again[-1].usage.cached_tokens > 0
    assert mesh.log_problems() == {}
