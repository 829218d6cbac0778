"""Bad input to every role of a real mesh: INVALID_ARGUMENT with a message naming the message type or the
field, and nothing louder than INFO in the log (bad input is the client's mistake, not the server's)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.message import Message

from kvmesh.mesh.telemetry import setup_telemetry
from kvmesh.v1 import cache_store_pb2, common_pb2, decode_pb2, prefill_pb2
from tests.loud_logs import loud, recorded_logs
from tests.mesh_harness import MeshInThread, MeshSpec

PLACEHOLDER = "@@"
BAD_UTF8 = b"\xc3\x28"  # same length as the placeholder: a lead byte without its continuation byte


def with_bad_utf8(message: Message) -> bytes:
    """message serialized, its PLACEHOLDER string turned into invalid UTF-8 (lengths stay right)."""
    data = message.SerializeToString()
    assert data.count(PLACEHOLDER.encode()) == 1
    return data.replace(PLACEHOLDER.encode(), BAD_UTF8)


def generate(**sampling: object) -> decode_pb2.GenerateRequest:
    return decode_pb2.GenerateRequest(
        request_id="bad-input",
        prompt_token_ids=[1, 2, 3],
        sampling=common_pb2.SamplingParams(max_tokens=2, **sampling),  # type: ignore[arg-type]
    )


# role, method, request bytes, fragments of the message
CASES: dict[str, tuple[str, str, bytes | Message, list[str]]] = {
    "gateway undecodable": (
        "gateway",
        "/kvmesh.v1.Gateway/Complete",
        b"\xff\xff",
        ["kvmesh.v1.CompleteRequest"],
    ),
    "decode undecodable": (
        "decode-0",
        "/kvmesh.v1.Decode/Generate",
        b"\xff\xff",
        ["kvmesh.v1.GenerateRequest"],
    ),
    "decode bad UTF-8": (
        "decode-0",
        "/kvmesh.v1.Decode/Generate",
        with_bad_utf8(generate(stop_strings=["ok", PLACEHOLDER])),
        ["not a valid kvmesh.v1.GenerateRequest", "UTF-8", "field sampling.stop_strings[1]"],
    ),
    "decode too many stop strings": (
        "decode-0",
        "/kvmesh.v1.Decode/Generate",
        generate(stop_strings=[f"stop{i}" for i in range(40)]),
        ["sampling.stop_strings has 40 strings, more than the limit of 16 (max_stop_strings)"],
    ),
    "decode stop string too long": (
        "decode-0",
        "/kvmesh.v1.Decode/Generate",
        generate(stop_strings=["x" * 1000]),
        ["sampling.stop_strings[0] is 1000 characters, more than the limit of 256 (max_stop_string_chars)"],
    ),
    "decode top_p zero": (
        "decode-0",
        "/kvmesh.v1.Decode/Generate",
        generate(top_p=0.0),
        ["sampling.top_p must be in (0, 1], got 0"],
    ),
    "prefill undecodable": (
        "prefill-0",
        "/kvmesh.v1.Prefill/Prefill",
        b"\xff\xff",
        ["kvmesh.v1.PrefillRequest"],
    ),
    "prefill bad UTF-8": (
        "prefill-0",
        "/kvmesh.v1.Prefill/CancelPrefill",
        with_bad_utf8(prefill_pb2.CancelPrefillRequest(transfer_id=PLACEHOLDER)),
        ["kvmesh.v1.CancelPrefillRequest", "field transfer_id"],
    ),
    "cache store undecodable": (
        "cache-store",
        "/kvmesh.v1.CacheStore/ListWorkers",
        b"\xff\xff",
        ["kvmesh.v1.ListWorkersRequest"],
    ),
    "cache store stream of undecodable": (
        "cache-store",
        "/kvmesh.v1.CacheStore/PublishKVEvents",
        b"\xff\xff",
        ["kvmesh.v1.KVEventBatch"],
    ),
    "cache store stream with bad UTF-8": (
        "cache-store",
        "/kvmesh.v1.CacheStore/PublishKVEvents",
        with_bad_utf8(cache_store_pb2.KVEventBatch(worker_id=PLACEHOLDER)),
        ["kvmesh.v1.KVEventBatch", "field worker_id"],
    ),
}


@pytest.fixture(scope="module")
def mesh(mesh_model_path: Path) -> Iterator[MeshInThread]:
    setup_telemetry("kvmesh-tests")
    with MeshInThread(MeshSpec(str(mesh_model_path))) as running:
        yield running


def call(address: str, method: str, request: bytes) -> None:
    """Sends the bytes as the method's request, the way grpc's generic calls do; raises grpc.RpcError."""
    with grpc.insecure_channel(address) as channel:
        if method.endswith(("/Complete", "/Generate", "/Prefill")):
            for _ in channel.unary_stream(method)(request, timeout=30):
                pass
        elif method.endswith("/PublishKVEvents"):
            channel.stream_unary(method)(iter([request]), timeout=30)
        else:
            channel.unary_unary(method)(request, timeout=30)


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_to_every_role_is_invalid_argument_and_logs_no_error(mesh: MeshInThread, case: str) -> None:
    role, method, request, fragments = CASES[case]
    data = request if isinstance(request, bytes) else request.SerializeToString()
    with recorded_logs() as records, pytest.raises(grpc.RpcError) as raised:
        call(mesh.servers[role].address, method, data)
    error = raised.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()  # type: ignore[attr-defined]
    for fragment in fragments:
        assert fragment in error.details(), error.details()  # type: ignore[attr-defined]
    assert not loud(records), loud(records)
