"""Bad requests through a real gateway and cache store: each gets the right status, and a message that
names the field and the limit. A working (fake) decode worker is registered, so a check that lets a bad
request through shows up as a request that succeeds."""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.server import SERVICE_NAME
from kvmesh.engine.tokenizer import Tokenizer
from kvmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc
from tests.fake_decode import FakeDecode, gateway_stack, write_tiny_checkpoint

MAX_REQUEST_BYTES = 4096
CONTEXT_TOKENS = 256


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, code_tokenizer_json: Path) -> Path:
    return write_tiny_checkpoint(
        tmp_path_factory.mktemp("gateway-model"), code_tokenizer_json, max_position_embeddings=CONTEXT_TOKENS
    )


@pytest.fixture(scope="module")
def tokenizer(code_tokenizer_json: Path) -> Tokenizer:
    return Tokenizer.from_file(code_tokenizer_json)


def complete(**fields: object) -> gateway_pb2.CompleteRequest:
    sampling = fields.pop("sampling", common_pb2.SamplingParams(max_tokens=4))
    return gateway_pb2.CompleteRequest(sampling=sampling, **fields)  # type: ignore[arg-type]


def sampling(**fields: object) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(**fields)  # type: ignore[arg-type]


@dataclass(frozen=True)
class RawRequest:
    """Bytes sent as a method's request as they are, not a message: what a broken client may send."""

    method: str
    data: bytes


Request = gateway_pb2.CompleteRequest | gateway_pb2.EditRequest | RawRequest
BAD_UTF8 = b"\xc3\x28"  # a UTF-8 lead byte followed by no continuation byte
# CompleteRequest.prefix is field 1; EditRequest.sampling is field 4 and SamplingParams.stop_strings field 6.
BAD_PREFIX = b"\x0a\x02" + BAD_UTF8
BAD_STOP_STRING = b"\x22\x04\x32\x02" + BAD_UTF8

CASES: dict[str, tuple[Request, list[str]]] = {
    "undecodable body": (
        RawRequest("/kvmesh.v1.Gateway/Complete", b"\xff\xff"),
        ["the request is not a valid kvmesh.v1.CompleteRequest"],
    ),
    "bad UTF-8 in a string field": (
        RawRequest("/kvmesh.v1.Gateway/Complete", BAD_PREFIX),
        ["not a valid kvmesh.v1.CompleteRequest", "UTF-8", "field prefix"],
    ),
    "bad UTF-8 in a nested string field": (
        RawRequest("/kvmesh.v1.Gateway/Edit", BAD_STOP_STRING),
        ["not a valid kvmesh.v1.EditRequest", "field sampling.stop_strings[0]"],
    ),
    "too many stop strings": (
        complete(prefix="x", sampling=sampling(stop_strings=[f"stop{i}" for i in range(40)])),
        ["sampling.stop_strings has 40 strings, more than the limit of 16 (max_stop_strings)"],
    ),
    "stop string too long": (
        complete(prefix="x", sampling=sampling(stop_strings=["\n", "x" * 300])),
        ["sampling.stop_strings[1] is 300 characters", "limit of 256 (max_stop_string_chars)"],
    ),
    "empty stop string": (
        complete(prefix="x", sampling=sampling(stop_strings=[""])),
        ["sampling.stop_strings"],
    ),
    "top_p zero": (
        complete(prefix="x", sampling=sampling(top_p=0.0)),
        ["sampling.top_p must be in (0, 1], got 0"],
    ),
    "empty document": (complete(), ["prefix", "suffix", "document.text"]),
    "empty original": (gateway_pb2.EditRequest(snippet="x = 1"), ["original"]),
    "line outside": (
        complete(document=gateway_pb2.TextDocument(text="a\nb\n", line=3)),
        ["document.line 3", "at most 2"],
    ),
    "column outside": (
        complete(document=gateway_pb2.TextDocument(text="a\nbé\n", line=1, column=3)),
        ["document.column 3", "at most 2"],
    ),
    "max_tokens negative": (
        complete(prefix="x", sampling=sampling(max_tokens=-1)),
        ["sampling.max_tokens", "1024"],
    ),
    "max_tokens too big": (
        complete(prefix="x", sampling=sampling(max_tokens=1025)),
        ["sampling.max_tokens", "1024"],
    ),
    "temperature negative": (
        complete(prefix="x", sampling=sampling(temperature=-0.5)),
        ["sampling.temperature", ">= 0"],
    ),
    "temperature nan": (
        complete(prefix="x", sampling=sampling(temperature=math.nan)),
        ["sampling.temperature"],
    ),
    "top_p above 1": (complete(prefix="x", sampling=sampling(top_p=1.5)), ["sampling.top_p", "(0, 1]"]),
    "top_k negative": (complete(prefix="x", sampling=sampling(top_k=-2)), ["sampling.top_k", ">= 0"]),
    "stop token outside vocab": (
        complete(prefix="x", sampling=sampling(stop_token_ids=[5, 100_000])),
        ["sampling.stop_token_ids[1]", "511"],
    ),
    "edit max_tokens too big": (
        gateway_pb2.EditRequest(original="x = 1\n", sampling=sampling(max_tokens=5000)),
        ["sampling.max_tokens", "1024"],
    ),
}


async def _call(address: str, request: Request) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        if isinstance(request, RawRequest):
            async for _ in channel.unary_stream(request.method)(request.data, timeout=10):
                pass
            return
        stub = gateway_pb2_grpc.GatewayStub(channel)
        method = stub.Complete if isinstance(request, gateway_pb2.CompleteRequest) else stub.Edit
        async for _ in method(request, timeout=10):
            pass


def _expect_error(
    checkpoint: Path,
    request: Request,
    code: grpc.StatusCode,
    with_decoder: bool = True,
    **gateway_overrides: Any,
) -> str:
    async def scenario() -> str:
        decoders = (
            {"d0": FakeDecode(Tokenizer.from_file(checkpoint / "tokenizer.json"))} if with_decoder else {}
        )
        async with gateway_stack(checkpoint, decoders, **gateway_overrides) as stack:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await _call(stack.gateway_address, request)
            assert not any(d.requests for d in decoders.values()), "the bad request reached a decode worker"
        assert raised.value.code() == code, raised.value.details()
        return raised.value.details() or ""

    return asyncio.run(scenario())


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_invalid_argument_naming_the_field_and_limit(
    checkpoint: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    request, fragments = CASES[case]
    with caplog.at_level(logging.INFO):
        message = _expect_error(checkpoint, request, grpc.StatusCode.INVALID_ARGUMENT)
    for fragment in fragments:
        assert fragment in message, message
    # Bad input is the client's mistake, not the server's: no ERROR and no traceback in the log.
    loud = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not loud, [r.getMessage() for r in loud]


def test_context_longer_than_the_model_context(checkpoint: Path, tokenizer: Tokenizer) -> None:
    # A long document is cut to a window (tests/gateway/test_gateway_stream.py); extra context is never cut.
    context = "def function_number_one(argument):\n    return argument\n" * 40
    num_tokens = len(tokenizer.encode(context)) + len(tokenizer.encode("x = ")) + 3  # plus the FIM markers
    assert num_tokens > CONTEXT_TOKENS
    message = _expect_error(
        checkpoint,
        complete(prefix="x = ", context=context, sampling=sampling(max_tokens=16)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert f"prompt has {num_tokens} tokens" in message, message
    assert f"limit of {CONTEXT_TOKENS - 16}" in message, message
    assert "sampling.max_tokens" in message and "less context" in message


def test_edit_longer_than_the_context(checkpoint: Path, tokenizer: Tokenizer) -> None:
    original = "def function_number_one(argument):\n    return argument\n" * 40
    message = _expect_error(
        checkpoint,
        gateway_pb2.EditRequest(original=original, sampling=sampling(max_tokens=16)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    num_original = len(tokenizer.encode(original))
    assert f"original is {num_original} tokens" in message, message
    assert f"context of {CONTEXT_TOKENS} tokens" in message and "sampling.max_tokens (16)" in message


def test_edit_without_max_tokens_needs_room_for_a_whole_file(checkpoint: Path, tokenizer: Tokenizer) -> None:
    # The prompt alone fits, but an updated file as long as the original does not fit beside it.
    original = "def f(argument):\n    return argument\n" * 8
    num_original = len(tokenizer.encode(original))
    assert 2 * num_original > CONTEXT_TOKENS > num_original + 3
    message = _expect_error(
        checkpoint, gateway_pb2.EditRequest(original=original), grpc.StatusCode.INVALID_ARGUMENT
    )
    assert f"original is {num_original} tokens" in message, message
    assert "about as long as the original" in message, message


def test_snippet_over_its_limit(checkpoint: Path) -> None:
    message = _expect_error(
        checkpoint,
        gateway_pb2.EditRequest(original="x = 1\n", snippet="y = 2\n" * 10),
        grpc.StatusCode.INVALID_ARGUMENT,
        max_snippet_chars=40,
    )
    assert "snippet is 60 characters" in message and "limit of 40" in message, message


def test_max_tokens_counts_against_the_context(checkpoint: Path) -> None:
    # A short prompt fits, but not with 250 of the 256 positions reserved for the answer.
    message = _expect_error(
        checkpoint,
        complete(prefix="x = 1\n" * 5, sampling=sampling(max_tokens=250)),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert "limit of 6" in message, message


def test_request_over_max_request_bytes(checkpoint: Path) -> None:
    request = complete(prefix="x" * 5000)
    message = _expect_error(
        checkpoint, request, grpc.StatusCode.INVALID_ARGUMENT, max_request_bytes=MAX_REQUEST_BYTES
    )
    assert f"request is {request.ByteSize()} bytes" in message, message
    assert f"limit of {MAX_REQUEST_BYTES} bytes" in message, message


def test_no_decode_worker_is_unavailable_and_not_serving(checkpoint: Path) -> None:
    async def scenario() -> None:
        async with gateway_stack(checkpoint, {}) as stack:
            async with grpc.aio.insecure_channel(stack.gateway_address) as channel:
                health = health_pb2_grpc.HealthStub(channel)
                reply = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
                assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await _call(stack.gateway_address, complete(prefix="x = "))
            assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "no decode worker" in (raised.value.details() or "")

    asyncio.run(scenario())
