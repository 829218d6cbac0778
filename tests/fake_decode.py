"""A real gateway and cache store in front of scripted decode workers, all real gRPC servers on loopback.

The fake decode worker "generates" a fixed sequence that depends only on the prompt's last token, so a
stream resumed on another worker (prompt + tokens already sent) continues exactly where it broke; it can
fail with any status after a given number of tokens, and records what it was asked and whether the call
was cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from tokenizers import Tokenizer as HFTokenizer

from cache_store.server import CacheStoreConfig
from cache_store.server import serve as serve_cache_store
from gateway.config import GatewayConfig
from gateway.server import serve as serve_gateway
from kvmesh.engine.tokenizer import Detokenizer, Tokenizer
from kvmesh.mesh.convert import worker_to_proto
from kvmesh.mesh.server import RunningServer, ServerConfig, start_server
from kvmesh.mesh.workers import WorkerInfo, WorkerLoad, WorkerRole
from kvmesh.v1 import cache_store_pb2, cache_store_pb2_grpc, common_pb2, decode_pb2, decode_pb2_grpc
from training.checkpoint import write_random_checkpoint

DECODE_SERVICE = decode_pb2.DESCRIPTOR.services_by_name["Decode"].full_name
FAKE_FINGERPRINT = "fake-model"
"""The model fingerprint the fake decode workers register with (the gateway hashes prompts with it)."""
FAKE_BLOCK_SIZE = 16
"""The block size the fake decode workers advertise (the gateway hashes prompts in it)."""


def write_tiny_checkpoint(path: Path, tokenizer_json: Path, max_position_embeddings: int = 256) -> Path:
    """A tiny random checkpoint with the test tokenizer (workers can serve it; the gateway reads only its
    tokenizer.json and config.json)."""
    tokenizer = HFTokenizer.from_file(str(tokenizer_json))
    return write_random_checkpoint(
        path,
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=max_position_embeddings,
        tokenizer=tokenizer,
    )


def next_token(previous: int) -> int:
    """The fake model: a fixed walk over ordinary (non-special) token ids."""
    return (previous * 31 + 7) % 400 + 20


def expected_tokens(prompt_last_token: int, num_tokens: int) -> list[int]:
    tokens, previous = [], prompt_last_token
    for _ in range(num_tokens):
        previous = next_token(previous)
        tokens.append(previous)
    return tokens


@dataclass
class FakeDecode(decode_pb2_grpc.DecodeServicer):
    tokenizer: Tokenizer
    fail_after: int | None = None
    """Abort with fail_code after this many tokens (None: never)."""
    fail_code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    delay_s: float = 0.0
    """Pause before each token."""
    requests: list[decode_pb2.GenerateRequest] = field(default_factory=list)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)

    async def Generate(  # noqa: N802 (generated name)
        self, request: decode_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[decode_pb2.GenerateChunk]:
        self.requests.append(request)
        detokenizer = Detokenizer(self.tokenizer, tuple(request.sampling.stop_strings))
        previous = request.prompt_token_ids[-1]
        try:
            for i in range(request.sampling.max_tokens):
                if self.fail_after is not None and i == self.fail_after:
                    await context.abort(self.fail_code, f"scripted {self.fail_code.name}")
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                previous = next_token(previous)
                yield decode_pb2.GenerateChunk(token_ids=[previous], text=detokenizer.add([previous]))
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        usage = common_pb2.Usage(
            prompt_tokens=len(request.prompt_token_ids),
            prefilled_tokens=len(request.prompt_token_ids),
            completion_tokens=request.sampling.max_tokens,
            forward_passes=1000 + request.sampling.max_tokens,
            ttft_ms=-1.0,  # the gateway replaces it with its own measurement
        )
        usage.stage_ms.decode_ms = 12.5
        yield decode_pb2.GenerateChunk(
            text=detokenizer.flush(), finish_reason=common_pb2.FINISH_REASON_LENGTH, usage=usage
        )


@dataclass
class GatewayStack:
    """Cache store + fake decode workers + gateway; `gateway_address` is what clients dial."""

    store: RunningServer
    gateway: RunningServer
    decoders: dict[str, FakeDecode]
    decode_servers: dict[str, RunningServer]

    @property
    def gateway_address(self) -> str:
        return self.gateway.address


async def _register(store_address: str, worker: WorkerInfo) -> None:
    async with grpc.aio.insecure_channel(store_address) as channel:
        stub = cache_store_pb2_grpc.CacheStoreStub(channel)
        await stub.Register(cache_store_pb2.RegisterRequest(worker=worker_to_proto(worker)), timeout=5)


async def publish_blocks(store_address: str, worker_id: str, block_hashes: Sequence[bytes]) -> None:
    """Tells the cache store, as the worker's KV event stream would, that worker_id holds block_hashes."""
    event = cache_store_pb2.KVEvent(kind=cache_store_pb2.KV_EVENT_KIND_STORED, block_hashes=block_hashes)

    async def batches() -> AsyncIterator[cache_store_pb2.KVEventBatch]:
        yield cache_store_pb2.KVEventBatch(worker_id=worker_id, events=[event])

    async with grpc.aio.insecure_channel(store_address) as channel:
        stub = cache_store_pb2_grpc.CacheStoreStub(channel)
        await stub.PublishKVEvents(batches(), timeout=5)


@contextlib.asynccontextmanager
async def gateway_stack(
    checkpoint: Path,
    decoders: dict[str, FakeDecode],
    dead_decoders: tuple[str, ...] = (),
    loads: dict[str, int] | None = None,
    **gateway_overrides: Any,
) -> AsyncIterator[GatewayStack]:
    """Starts the stack; decoders are registered in name order (running requests: loads, default 0),
    dead_decoders are registered at an address where nothing listens."""
    store = await serve_cache_store(CacheStoreConfig(heartbeat_interval_ms=1000, expiry_ms=60_000))
    servers: dict[str, RunningServer] = {}
    gateway: RunningServer | None = None
    try:
        for name, servicer in decoders.items():
            servers[name] = await start_server(
                [(decode_pb2_grpc.add_DecodeServicer_to_server, servicer)], [DECODE_SERVICE], ServerConfig()
            )
            await servers[name].set_serving()
            await _register(store.address, _worker(name, servers[name].address, (loads or {}).get(name, 0)))
        for name in dead_decoders:
            await _register(store.address, _worker(name, "127.0.0.1:1"))
        config = GatewayConfig(
            server=ServerConfig(),
            cache_store_address=store.address,
            model_path=str(checkpoint),
            refresh_ms=50,
            **gateway_overrides,
        )
        gateway = await serve_gateway(config)
        yield GatewayStack(store, gateway, decoders, servers)
    finally:
        if gateway is not None:
            await gateway.stop(0)
        for server in servers.values():
            await server.stop(0)
        await store.stop(0)


def _worker(name: str, address: str, num_running: int = 0) -> WorkerInfo:
    return WorkerInfo(
        worker_id=name,
        role=WorkerRole.DECODE,
        address=address,
        block_size=FAKE_BLOCK_SIZE,
        host_id="test-host",
        transports=("grpc",),
        load=WorkerLoad(num_running=num_running, num_blocks_free=100, num_blocks_total=100),
        model_fingerprint=FAKE_FINGERPRINT,
    )
