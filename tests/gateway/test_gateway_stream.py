"""Streaming through a real gateway to scripted decode workers: chunks and usage, failover, resumption
without gap or duplicate, status pass-through, cancellation reaching the worker, and the route span.

The client is kvmesh.client.Client (synchronous), run on a thread while the servers run on the loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import grpc
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.layout import PromptLayout
from kvmesh.client import Chunk, Client
from kvmesh.engine.block_hash import hash_blocks, namespace_hash
from kvmesh.engine.tokenizer import Tokenizer
from kvmesh.mesh import telemetry
from tests.fake_decode import (
    FAKE_FINGERPRINT,
    FakeDecode,
    expected_tokens,
    gateway_stack,
    publish_blocks,
    write_tiny_checkpoint,
)

T = TypeVar("T")
PREFIX = "def add(a, b):\n    "
SUFFIX = "\n\nprint(add(1, 2))\n"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, code_tokenizer_json: Path) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("gateway-model"), code_tokenizer_json)


@pytest.fixture(scope="module")
def tokenizer(checkpoint: Path) -> Tokenizer:
    return Tokenizer.from_file(checkpoint / "tokenizer.json")


@pytest.fixture(scope="module")
def prompt(tokenizer: Tokenizer) -> list[int]:
    return PromptLayout(tokenizer).completion(PREFIX, SUFFIX)


async def in_thread(fn: Callable[[], T]) -> T:
    return await asyncio.to_thread(fn)


def complete_all(address: str, max_tokens: int, **options: object) -> list[Chunk]:
    with Client(address, timeout_s=20) as client:
        return list(client.complete(prefix=PREFIX, suffix=SUFFIX, max_tokens=max_tokens, **options))  # type: ignore[arg-type]


def tokens_of(chunks: list[Chunk]) -> list[int]:
    return [token for chunk in chunks for token in chunk.token_ids]


def test_chunks_and_usage(checkpoint: Path, tokenizer: Tokenizer, prompt: list[int]) -> None:
    async def scenario() -> None:
        decoder = FakeDecode(tokenizer)
        async with gateway_stack(checkpoint, {"d0": decoder}) as stack:
            chunks = await in_thread(lambda: complete_all(stack.gateway_address, 8, temperature=0.5, seed=7))
            default = await in_thread(lambda: complete_all(stack.gateway_address, 0))
        tokens = expected_tokens(prompt[-1], 8)
        assert tokens_of(chunks) == tokens
        assert "".join(c.text for c in chunks) == tokenizer.decode(tokens)
        assert all(c.usage is None and c.finish_reason is None for c in chunks[:-1])
        last = chunks[-1]
        assert last.finish_reason == "length"
        assert last.usage is not None
        assert last.usage.forward_passes == 1008  # the worker's own fields are kept
        assert last.usage.stage_ms["decode"] == 12.5
        assert last.usage.stage_ms["route"] > 0
        assert last.usage.ttft_ms > 0  # measured at the gateway, not the worker's -1
        first, second = decoder.requests
        assert list(first.prompt_token_ids) == prompt
        assert first.sampling.max_tokens == 8 and first.sampling.top_p == 1.0 and first.sampling.seed == 7
        assert first.prefill_address == ""  # no prefill worker registered
        assert second.sampling.max_tokens == 64  # 0 means the gateway's default
        assert len(tokens_of(default)) == 64

    asyncio.run(scenario())


def test_edit_sends_the_original_as_draft_only_when_speculative(
    checkpoint: Path, tokenizer: Tokenizer
) -> None:
    original, snippet = "def f(x):\n    return x\n", "return x * 2"

    def edit(address: str, speculative: bool) -> list[Chunk]:
        with Client(address) as client:
            return list(client.edit(original, snippet, max_tokens=4, speculative=speculative))

    async def scenario() -> None:
        decoder = FakeDecode(tokenizer)
        async with gateway_stack(checkpoint, {"d0": decoder}) as stack:
            await in_thread(lambda: edit(stack.gateway_address, True))
            await in_thread(lambda: edit(stack.gateway_address, False))
        speculative, plain = decoder.requests
        layout = PromptLayout(tokenizer).edit(original, snippet)
        assert list(speculative.prompt_token_ids) == layout.token_ids == list(plain.prompt_token_ids)
        assert list(speculative.draft_token_ids) == layout.draft_token_ids
        assert list(plain.draft_token_ids) == []

    asyncio.run(scenario())


@pytest.mark.parametrize("dead_first", [False, True], ids=["aborts", "not-listening"])
def test_unavailable_before_the_first_token_fails_over(
    checkpoint: Path, tokenizer: Tokenizer, prompt: list[int], dead_first: bool
) -> None:
    async def scenario() -> None:
        failing = FakeDecode(tokenizer, fail_after=0)
        healthy = FakeDecode(tokenizer)
        decoders = {"d1": healthy} if dead_first else {"d0": failing, "d1": healthy}
        dead = ("d0",) if dead_first else ()
        async with gateway_stack(checkpoint, decoders, dead_decoders=dead) as stack:
            chunks = await in_thread(lambda: complete_all(stack.gateway_address, 6))
        assert tokens_of(chunks) == expected_tokens(prompt[-1], 6)
        assert len(failing.requests) == (0 if dead_first else 1)
        assert [list(r.prompt_token_ids) for r in healthy.requests] == [prompt]

    asyncio.run(scenario())


def test_a_stream_that_dies_resumes_without_gap_or_duplicate(
    checkpoint: Path, tokenizer: Tokenizer, prompt: list[int]
) -> None:
    async def scenario() -> None:
        dying = FakeDecode(tokenizer, fail_after=5)
        healthy = FakeDecode(tokenizer)
        async with gateway_stack(checkpoint, {"d0": dying, "d1": healthy}) as stack:
            chunks = await in_thread(lambda: complete_all(stack.gateway_address, 40))
        tokens = expected_tokens(prompt[-1], 40)
        assert tokens_of(chunks) == tokens
        assert "".join(c.text for c in chunks) == tokenizer.decode(tokens)
        (resumed,) = healthy.requests
        num_sent = len(resumed.prompt_token_ids) - len(prompt)
        assert 0 < num_sent <= 5  # tokens still without text were held back and are generated again
        assert list(resumed.prompt_token_ids) == prompt + tokens[:num_sent]
        assert resumed.sampling.max_tokens == 40 - num_sent
        usage = chunks[-1].usage
        assert usage is not None
        assert usage.prompt_tokens == len(prompt) and usage.completion_tokens == 40

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("code", "fail_after"),
    [(grpc.StatusCode.RESOURCE_EXHAUSTED, 0), (grpc.StatusCode.INVALID_ARGUMENT, 3)],
)
def test_other_worker_statuses_pass_through_unretried(
    checkpoint: Path, tokenizer: Tokenizer, code: grpc.StatusCode, fail_after: int
) -> None:
    async def scenario() -> None:
        failing = FakeDecode(tokenizer, fail_after=fail_after, fail_code=code)
        spare = FakeDecode(tokenizer)
        async with gateway_stack(checkpoint, {"d0": failing, "d1": spare}) as stack:
            with pytest.raises(grpc.RpcError) as raised:
                await in_thread(lambda: complete_all(stack.gateway_address, 8))
        assert raised.value.code() == code  # type: ignore[attr-defined]
        assert raised.value.details() == f"scripted {code.name}"  # type: ignore[attr-defined]
        assert len(failing.requests) == 1 and not spare.requests

    asyncio.run(scenario())


def test_unavailable_everywhere_gives_up_after_max_attempts(checkpoint: Path, tokenizer: Tokenizer) -> None:
    async def scenario() -> None:
        decoders = {name: FakeDecode(tokenizer, fail_after=0) for name in ("d0", "d1")}
        async with gateway_stack(checkpoint, decoders, max_attempts=3) as stack:
            with pytest.raises(grpc.RpcError) as raised:
                await in_thread(lambda: complete_all(stack.gateway_address, 8))
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
        # Another worker first; once both failed, the least loaded one again.
        assert [len(d.requests) for d in decoders.values()] == [2, 1]

    asyncio.run(scenario())


def test_client_cancellation_reaches_the_decode_worker(checkpoint: Path, tokenizer: Tokenizer) -> None:
    def read_three_and_stop(address: str) -> int:
        with Client(address) as client:
            stream = client.complete(prefix=PREFIX, max_tokens=200)
            num_chunks = 0
            for _ in stream:
                num_chunks += 1
                if num_chunks == 3:
                    break
            stream.close()  # what leaving the loop and dropping the generator does, made explicit
            return num_chunks

    async def scenario() -> None:
        decoder = FakeDecode(tokenizer, delay_s=0.02)
        async with gateway_stack(checkpoint, {"d0": decoder}) as stack:
            assert await in_thread(lambda: read_three_and_stop(stack.gateway_address)) == 3
            await asyncio.wait_for(decoder.cancelled.wait(), timeout=5)

    asyncio.run(scenario())


def test_client_deadline_reaches_the_decode_worker(checkpoint: Path, tokenizer: Tokenizer) -> None:
    def complete_with_short_deadline(address: str) -> None:
        with Client(address, timeout_s=0.5) as client:
            for _ in client.complete(prefix=PREFIX, max_tokens=200):
                pass

    async def scenario() -> None:
        decoder = FakeDecode(tokenizer, delay_s=0.02)
        async with gateway_stack(checkpoint, {"d0": decoder}) as stack:
            with pytest.raises(grpc.RpcError) as raised:
                await in_thread(lambda: complete_with_short_deadline(stack.gateway_address))
            assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
            await asyncio.wait_for(decoder.cancelled.wait(), timeout=5)
        # The gateway passed on the client's deadline, not its own 60 s default.
        assert len(decoder.requests) == 1

    asyncio.run(scenario())


def test_route_span_names_workers_and_sizes_never_text(
    checkpoint: Path, tokenizer: Tokenizer, prompt: list[int]
) -> None:
    telemetry.setup_telemetry("kvmesh-test")
    exporter = InMemorySpanExporter()
    telemetry.add_span_processor(SimpleSpanProcessor(exporter))

    async def scenario() -> None:
        async with gateway_stack(checkpoint, {"d0": FakeDecode(tokenizer)}) as stack:
            await in_thread(lambda: complete_all(stack.gateway_address, 4))

    asyncio.run(scenario())
    spans = exporter.get_finished_spans()
    (route,) = [s for s in spans if s.name == "route"]
    attributes = dict(route.attributes or {})
    assert attributes["kvmesh.prompt_tokens"] == len(prompt)
    assert attributes["kvmesh.decode_worker"] == "d0"
    assert attributes["kvmesh.transport"] == ""
    assert attributes["kvmesh.disaggregated"] is False
    assert attributes["kvmesh.prefill_reason"] == "short-uncached"
    assert attributes["kvmesh.decode_cached_blocks"] == 0
    (lookup,) = [s for s in spans if s.name == "cache_lookup"]
    assert lookup.parent is not None and lookup.parent.span_id == route.context.span_id
    for span in spans:
        for value in (span.attributes or {}).values():
            assert "add(a, b)" not in str(value)
    # The trace continues into the decode worker's server span.
    decode_spans = [s for s in spans if s.name.endswith("Decode/Generate") and s.kind.name == "SERVER"]
    assert decode_spans and all(s.context.trace_id == route.context.trace_id for s in decode_spans)


LONG_PREFIX = "def total(values):\n    result = 0\n    for value in values:\n        result += value\n" * 3


def test_requests_go_to_the_worker_holding_their_prefix(checkpoint: Path, tokenizer: Tokenizer) -> None:
    prompt = PromptLayout(tokenizer).completion(LONG_PREFIX, SUFFIX)
    hashes = hash_blocks(namespace_hash(FAKE_FINGERPRINT, ""), prompt, 16)
    assert len(hashes) >= 3

    def complete(address: str) -> list[Chunk]:
        with Client(address, timeout_s=20) as client:
            return list(client.complete(prefix=LONG_PREFIX, suffix=SUFFIX, max_tokens=4))

    async def scenario() -> None:
        decoders = {name: FakeDecode(tokenizer) for name in ("d0", "d1", "d2")}
        # d2 is the busiest, by 3 requests: within the default imbalance of 4.
        async with gateway_stack(checkpoint, decoders, loads={"d2": 3}) as stack:
            await in_thread(lambda: complete(stack.gateway_address))
            assert len(decoders["d0"].requests) == 1  # cold: the least loaded, lowest id
            await publish_blocks(stack.store.address, "d2", hashes)
            await publish_blocks(stack.store.address, "d1", hashes[:1])
            for _ in range(3):
                await in_thread(lambda: complete(stack.gateway_address))
            assert [len(d.requests) for d in decoders.values()] == [1, 0, 3]
            # The cache store goes away: requests still route, by load alone.
            await stack.store.stop(0)
            chunks = await in_thread(lambda: complete(stack.gateway_address))
            assert chunks[-1].finish_reason == "length"
        assert all(list(r.prompt_token_ids) == prompt for d in decoders.values() for r in d.requests)
        assert all(r.cache_salt == "" for d in decoders.values() for r in d.requests)

    asyncio.run(scenario())


def test_a_long_document_is_cut_to_a_window_around_the_cursor(checkpoint: Path, tokenizer: Tokenizer) -> None:
    # The checkpoint's context is 256 tokens; the document is several times that.
    lines = (LONG_PREFIX * 8 + "def mean(values):\n    return total(values) / len(values)\n" * 16).split("\n")
    cursor_line = len(lines) // 2
    limit = 256 - 8

    def type_at_cursor(address: str, typed: str) -> list[Chunk]:
        """The document after typing `typed` at the start of the cursor line; the cursor after it."""
        document = "\n".join([*lines[:cursor_line], typed + lines[cursor_line], *lines[cursor_line + 1 :]])
        with Client(address, timeout_s=20) as client:
            return list(client.complete(document=(document, cursor_line, len(typed)), max_tokens=8))

    async def scenario() -> list[list[int]]:
        decoder = FakeDecode(tokenizer)
        async with gateway_stack(checkpoint, {"d0": decoder}) as stack:
            for typed in ("", "r", "re"):
                chunks = await in_thread(lambda typed=typed: type_at_cursor(stack.gateway_address, typed))  # type: ignore[misc]
                assert chunks[-1].finish_reason == "length"
        return [list(r.prompt_token_ids) for r in decoder.requests]

    prompts = asyncio.run(scenario())
    assert len(tokenizer.encode("\n".join(lines))) > 2 * 256
    for before, after in zip(prompts, prompts[1:], strict=False):
        assert len(before) <= limit and len(after) <= limit
        # A keystroke at the cursor leaves the window where it was: only the last block changes.
        common = next(i for i, (a, b) in enumerate(zip(before, after, strict=False)) if a != b)
        assert common // 16 >= len(before) // 16 - 1
