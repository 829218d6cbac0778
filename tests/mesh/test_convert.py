"""Proto <-> domain conversions (kvmesh.mesh.convert): round trips, and bad input named by its field."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import torch

from kvmesh.engine.block_hash import hash_blocks, namespace_hash
from kvmesh.engine.kv_cache import KVLayout
from kvmesh.engine.kv_event import KVEvent, KVEventKind
from kvmesh.engine.sampling import SamplingParams
from kvmesh.engine.sequence import FinishReason
from kvmesh.mesh.convert import (
    FINISH_REASON_TO_PROTO,
    kv_events_from_proto,
    kv_events_to_proto,
    layout_from_proto,
    layout_to_proto,
    sampling_from_proto,
    sampling_to_proto,
    worker_from_proto,
    worker_to_proto,
)
from kvmesh.mesh.errors import ServiceError
from kvmesh.mesh.workers import WorkerInfo, WorkerLoad, WorkerRole
from kvmesh.v1 import cache_store_pb2, common_pb2, prefill_pb2

ROOT = Path(__file__).resolve().parents[2]
HASHES = tuple(hash_blocks(namespace_hash("test-model"), list(range(12)), 4))


def invalid_message(call: object) -> str:
    """The message of the INVALID_ARGUMENT ServiceError that call() raises."""
    with pytest.raises(ServiceError) as raised:
        call()  # type: ignore[operator]
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    return raised.value.message


def test_convert_imports_without_torch() -> None:
    # The cache store uses this module and never loads torch.
    code = "import sys, kvmesh.mesh.convert; assert 'torch' not in sys.modules, 'torch was imported'"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_worker_round_trip_and_block_size() -> None:
    worker = WorkerInfo(
        worker_id="d0",
        role=WorkerRole.DECODE,
        address="10.0.0.1:7000",
        block_size=32,
        host_id="host-a",
        transports=("shm", "grpc"),
        load=WorkerLoad(num_running=1, num_waiting=2, num_blocks_free=3, num_blocks_total=4),
        model_fingerprint="fp",
    )
    proto = worker_to_proto(worker)
    assert proto.block_size_tokens == 32
    assert worker_from_proto(proto) == worker
    proto.block_size_tokens = 0
    assert "worker.block_size_tokens is 0" in invalid_message(lambda: worker_from_proto(proto))


def test_kv_events_round_trip_and_bad_events() -> None:
    events = [
        KVEvent(KVEventKind.CLEARED),
        KVEvent(KVEventKind.STORED, HASHES),
        KVEvent(KVEventKind.REMOVED, HASHES[1:]),
    ]
    batch = cache_store_pb2.KVEventBatch(worker_id="w0", events=kv_events_to_proto(events))
    assert [e.kind for e in batch.events] == [
        cache_store_pb2.KV_EVENT_KIND_CLEARED,
        cache_store_pb2.KV_EVENT_KIND_STORED,
        cache_store_pb2.KV_EVENT_KIND_REMOVED,
    ]
    assert kv_events_from_proto(batch) == events
    batch.events.append(cache_store_pb2.KVEvent(block_hashes=HASHES[:1]))
    assert "events[3].kind" in invalid_message(lambda: kv_events_from_proto(batch))


def test_sampling_fills_defaults_and_round_trips() -> None:
    params = sampling_from_proto(common_pb2.SamplingParams(temperature=0.5, seed=7), 64, 1024)
    assert params == SamplingParams(max_new_tokens=64, temperature=0.5, top_p=1.0, seed=7)
    proto = sampling_to_proto(params)
    assert (proto.max_tokens, proto.top_p, proto.seed) == (64, 1.0, 7)
    assert sampling_from_proto(proto, 1, 1024) == params
    assert not sampling_to_proto(SamplingParams()).HasField("seed")


@pytest.mark.parametrize(
    ("fields", "fragments"),
    [
        ({"top_p": 1.5}, ["sampling.top_p must be in (0, 1], got 1.5"]),
        ({"temperature": -0.5}, ["sampling.temperature must be", ">= 0", "got -0.5"]),
        ({"temperature": math.nan}, ["sampling.temperature must be", "got nan"]),
        ({"top_k": -2}, ["sampling.top_k must be >= 0, got -2"]),
        ({"max_tokens": 1025}, ["sampling.max_tokens must be between 0 and 1024", "got 1025"]),
        ({"max_tokens": -1}, ["sampling.max_tokens must be between 0 and 1024", "got -1"]),
        ({"top_p": 0.0}, ["sampling.top_p must be in (0, 1], got 0"]),
        (
            {"stop_strings": [f"s{i}" for i in range(40)]},
            ["sampling.stop_strings has 40 strings, more than the limit of 16 (max_stop_strings)"],
        ),
        (
            {"stop_strings": ["ok", "x" * 257]},
            [
                "sampling.stop_strings[1] is 257 characters, more than the limit of 256 (max_stop_string_chars)"
            ],
        ),
        ({"stop_strings": ["ok", ""]}, ["sampling.stop_strings[1] is empty"]),
    ],
)
def test_sampling_errors_name_the_field(fields: dict[str, float], fragments: list[str]) -> None:
    sampling = common_pb2.SamplingParams(**fields)  # type: ignore[arg-type]
    message = invalid_message(lambda: sampling_from_proto(sampling, 64, 1024))
    for fragment in fragments:
        assert fragment in message, message


def test_top_p_unset_is_one_and_stop_limits_are_the_servers() -> None:
    assert sampling_from_proto(common_pb2.SamplingParams(), 64, 1024).top_p == 1.0
    assert sampling_from_proto(common_pb2.SamplingParams(top_p=0.5), 64, 1024).top_p == 0.5
    stops = common_pb2.SamplingParams(stop_strings=["abc", "de"])
    assert sampling_from_proto(stops, 64, 1024, max_stop_strings=2, max_stop_string_chars=3).stop_strings == (
        "abc",
        "de",
    )
    message = invalid_message(lambda: sampling_from_proto(stops, 64, 1024, max_stop_strings=1))
    assert "has 2 strings, more than the limit of 1 (max_stop_strings)" in message
    message = invalid_message(lambda: sampling_from_proto(stops, 64, 1024, max_stop_string_chars=2))
    assert "stop_strings[0] is 3 characters, more than the limit of 2" in message
    # The flags' defaults are convert's.
    from kvmesh.cli.options import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS
    from kvmesh.mesh.convert import DEFAULT_MAX_STOP_STRING_CHARS, DEFAULT_MAX_STOP_STRINGS

    assert (MAX_STOP_STRINGS.default, MAX_STOP_STRING_CHARS.default) == (
        DEFAULT_MAX_STOP_STRINGS,
        DEFAULT_MAX_STOP_STRING_CHARS,
    )


def test_the_default_max_tokens_counts_against_the_limit() -> None:
    assert "got 0" in invalid_message(lambda: sampling_from_proto(common_pb2.SamplingParams(), 64, 32))


def test_layout_round_trip() -> None:
    layout = KVLayout(
        num_layers=2, num_blocks=8, block_size=4, num_kv_heads=2, head_dim=16, dtype=torch.bfloat16
    )
    assert layout_from_proto(layout_to_proto(layout)) == layout
    latent = KVLayout(2, 8, 4, 1, 24, torch.float32, latent=True)
    assert layout_from_proto(layout_to_proto(latent)) == latent
    spec = prefill_pb2.KVLayoutSpec(dtype="float5")
    assert "destination.layout.dtype 'float5'" in invalid_message(lambda: layout_from_proto(spec))


def test_every_finish_reason_has_a_proto() -> None:
    assert FINISH_REASON_TO_PROTO[None] == common_pb2.FINISH_REASON_UNSPECIFIED
    assert {FINISH_REASON_TO_PROTO[reason] for reason in FinishReason} == {
        common_pb2.FINISH_REASON_STOP,
        common_pb2.FINISH_REASON_LENGTH,
    }
