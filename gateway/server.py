"""gRPC edge of the gateway: kvmesh.v1.Gateway (Complete, Edit) over the worker pool.

Each method authenticates the caller (its tenant's cache salt), checks and decodes the request, lays out
and tokenizes the prompt, routes it (cache- and load-aware), and streams the decode worker's chunks back. Errors are ServiceErrors (INVALID_ARGUMENT names the field and the limit);
downstream statuses pass through the shared error interceptor unchanged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from collections.abc import Set as AbstractSet
from contextlib import aclosing
from pathlib import Path
from typing import TypeVar

import grpc
import grpc.aio
from opentelemetry import trace

from gateway.config import GatewayConfig
from gateway.generation import ResumableGeneration
from gateway.layout import CompletionPrompt, EditPrompt, PromptLayout, PromptTooLong, split_document
from gateway.prefix_lookup import BlockHashes, PrefixLookup
from gateway.router import Router, WorkerPool, watch_pool
from gateway.routing_cost import RoutePlan
from gateway.session_service import SessionService
from gateway.tenancy import Authenticator, Identity, SaltSecret, TenantKeys
from kvmesh.engine.loader import load_model_config
from kvmesh.engine.model_config import ModelConfig
from kvmesh.engine.sampling import SamplingParams
from kvmesh.engine.tokenizer import Tokenizer
from kvmesh.mesh.convert import sampling_from_proto, sampling_to_proto
from kvmesh.mesh.errors import ServiceError, deadline_s, invalid
from kvmesh.mesh.server import RunningServer, start_server
from kvmesh.mesh.telemetry import meter, start_metrics_server, tracer
from kvmesh.v1 import common_pb2, decode_pb2, gateway_pb2, gateway_pb2_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name

T = TypeVar("T")

_TOKENIZE_IN_THREAD_CHARS = 32 * 1024
"""Longer texts are tokenized on a thread, so one big prompt does not stall every other stream."""
MIN_WINDOW_DIVISOR = 4
"""A document is cut to a window only if the window keeps at least 1/4 of the model's context; less
means too much context or too large a max_tokens, which the caller should fix."""
EDIT_SLACK_TOKENS = 64
"""An edit that leaves max_tokens at 0 may write the original's length plus this many tokens: the updated
file is about as long as the original, plus what the snippet adds."""


def _no_decode_worker() -> ServiceError:
    return ServiceError(grpc.StatusCode.UNAVAILABLE, "no decode worker is registered; try again later")


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    """kvmesh.v1.Gateway: authentication, prompt layout, routing and streaming, over a WorkerPool.

    Editor sessions (gateway.session_service) use its public part: tokenizer, layout, tracer,
    authenticate, sampling_params, lay_out_window, start_generation and stream."""

    def __init__(
        self,
        config: GatewayConfig,
        pool: WorkerPool,
        router: Router,
        authenticator: Authenticator,
        tokenizer: Tokenizer,
        model_config: ModelConfig,
    ) -> None:
        self._config = config
        self._pool = pool
        self._router = router
        self._authenticator = authenticator
        self.tokenizer = tokenizer
        self.layout = PromptLayout(tokenizer)
        self._model_config = model_config
        self.tracer = tracer(__name__)
        self._sessions = SessionService(self, config)
        gateway_meter = meter(__name__)
        self._ttft_s = gateway_meter.create_histogram(
            "gen_ai.server.time_to_first_token", unit="s", description="Request arrival to first token"
        )
        self._duration_s = gateway_meter.create_histogram(
            "gen_ai.server.request.duration", unit="s", description="Request arrival to last token"
        )

    async def Complete(
        self, request: gateway_pb2.CompleteRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.CompletionChunk]:
        arrival_s = time.perf_counter()
        identity = self.authenticate(context)
        self._check_size(request.ByteSize())
        sampling = self.sampling_params(request.sampling)
        prefix, suffix = _cursor_text(request)
        with self.tracer.start_as_current_span("route") as span:
            num_chars = len(prefix) + len(suffix) + len(request.context)
            prompt = await self._tokenize(
                lambda: self._lay_out_completion(prefix, suffix, request.context, sampling.max_new_tokens),
                num_chars,
            )
            span.set_attribute("kvmesh.prefix_tokens_dropped", prompt.num_prefix_tokens_dropped)
            span.set_attribute("kvmesh.suffix_tokens_dropped", prompt.num_suffix_tokens_dropped)
            generation = await self.start_generation(
                prompt.token_ids, [], sampling, identity, span, context, prompt_lookup=request.prompt_lookup
            )
        # aclosing: a client that goes away closes the chain down to the downstream call at once.
        async with aclosing(self.stream(generation, arrival_s, "text_completion")) as chunks:
            async for chunk in chunks:
                yield chunk

    async def Session(
        self,
        request_iterator: AsyncIterator[gateway_pb2.SessionRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[gateway_pb2.SessionReply]:
        # aclosing: a client that goes away closes the session, which cancels everything it started.
        async with aclosing(self._sessions.run(request_iterator, context)) as replies:
            async for reply in replies:
                yield reply

    async def Edit(
        self, request: gateway_pb2.EditRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.CompletionChunk]:
        arrival_s = time.perf_counter()
        identity = self.authenticate(context)
        self._check_size(request.ByteSize())
        sampling = self.sampling_params(request.sampling)
        if not request.original:
            raise invalid("original is empty: send the code to rewrite")
        if len(request.snippet) > self._config.max_snippet_chars:
            raise invalid(
                f"snippet is {len(request.snippet)} characters, more than the limit of "
                f"{self._config.max_snippet_chars} (max_snippet_chars): send only the changed region, with "
                '"... existing code ..." markers for what stays'
            )
        with self.tracer.start_as_current_span("route") as span:
            num_chars = len(request.original) + len(request.snippet)
            prompt = await self._tokenize(
                lambda: self.layout.edit(request.original, request.snippet), num_chars
            )
            sampling = self._fit_edit(prompt, request.sampling.max_tokens, sampling)
            draft = prompt.draft_token_ids if request.speculative else []
            generation = await self.start_generation(
                prompt.token_ids, draft, sampling, identity, span, context
            )
        # aclosing: a client that goes away closes the chain down to the downstream call at once.
        async with aclosing(self.stream(generation, arrival_s, "text_completion")) as chunks:
            async for chunk in chunks:
                yield chunk

    def _fit_edit(
        self, prompt: EditPrompt, requested_max_tokens: int, sampling: SamplingParams
    ) -> SamplingParams:
        """Checks an edit against the model's context; an edit that leaves max_tokens at 0 may write as many
        tokens as the original has plus EDIT_SLACK_TOKENS (the whole updated file), within the context.
        Returns sampling with that max_new_tokens."""
        context_tokens = self._model_config.max_position_embeddings
        num_prompt = len(prompt.token_ids)
        num_original = len(prompt.draft_token_ids)
        needed = requested_max_tokens or num_original
        if num_prompt + needed > context_tokens:
            answer = (
                f"sampling.max_tokens ({requested_max_tokens})"
                if requested_max_tokens
                else f"an updated file about as long as the original ({num_original} tokens)"
            )
            raise invalid(
                f"original is {num_original} tokens: the edit prompt (original, snippet and markers) is "
                f"{num_prompt} tokens and {answer} must fit beside it in the model's context of "
                f"{context_tokens} tokens; send only the part of the file the edit touches"
            )
        if requested_max_tokens:
            return sampling
        max_new_tokens = min(context_tokens - num_prompt, num_original + EDIT_SLACK_TOKENS)
        return dataclasses.replace(sampling, max_new_tokens=max_new_tokens)

    def authenticate(self, context: grpc.aio.ServicerContext) -> Identity:
        """The caller's identity (tenant, cache salt); raises UNAUTHENTICATED for a missing or unknown key."""
        # NOTE: any cache salt the client sends (x-kvmesh-cache-salt or otherwise) is never read: the
        # salt comes from the authenticated identity alone.
        return self._authenticator.authenticate(context.invocation_metadata() or ())

    def _lay_out_completion(
        self, prefix: str, suffix: str, context: str, max_tokens: int
    ) -> CompletionPrompt:
        return self.lay_out_window(
            lambda **limits: self.layout.completion_window(prefix, suffix, context, **limits), max_tokens
        )

    def lay_out_window(self, window: Callable[..., CompletionPrompt], max_tokens: int) -> CompletionPrompt:
        """window(max_prompt_tokens=, block_size=, min_window_tokens=) (a PromptLayout.completion_window*)
        with this model's limits; PromptTooLong becomes INVALID_ARGUMENT saying what to send less of."""
        block_size = self._pool.block_size
        if block_size is None:  # no worker is known yet
            raise _no_decode_worker()
        context_tokens = self._model_config.max_position_embeddings
        limit = context_tokens - max_tokens
        try:
            # Windows move in whole blocks of the workers' size, so consecutive requests share cached blocks.
            return window(
                max_prompt_tokens=limit,
                block_size=block_size,
                min_window_tokens=context_tokens // MIN_WINDOW_DIVISOR,
            )
        except PromptTooLong as error:
            raise invalid(
                f"prompt has {error.num_tokens} tokens, more than the limit of {limit}: the model's context "
                f"is {context_tokens} tokens and sampling.max_tokens takes {max_tokens} of them, and a long "
                f"document is cut to a window around the cursor only when the context and max_tokens leave "
                f"it at least {error.min_window_tokens} tokens; send less context or lower sampling.max_tokens"
            ) from None

    def _check_size(self, num_bytes: int) -> None:
        limit = self._config.max_request_bytes
        if num_bytes > limit:
            raise invalid(
                f"request is {num_bytes} bytes, more than the limit of {limit} bytes (max_request_bytes): "
                "send less code or context"
            )

    def sampling_params(self, sampling: common_pb2.SamplingParams) -> SamplingParams:
        """The client's sampling, checked (SamplingParams checks the values; the limits here are this
        gateway's and its model's) and with defaults filled in."""
        params = sampling_from_proto(
            sampling,
            self._config.default_max_tokens,
            self._config.max_tokens_limit,
            max_stop_strings=self._config.max_stop_strings,
            max_stop_string_chars=self._config.max_stop_string_chars,
        )
        vocab_size = self._model_config.vocab_size
        for i, token_id in enumerate(params.stop_token_ids):
            if not 0 <= token_id < vocab_size:
                raise invalid(
                    f"sampling.stop_token_ids[{i}] is {token_id}, outside the vocabulary (0 to {vocab_size - 1})"
                )
        if any(not stop for stop in params.stop_strings):
            raise invalid("sampling.stop_strings holds an empty string")
        return params

    async def _tokenize(self, lay_out: Callable[[], T], num_chars: int) -> T:
        if num_chars > _TOKENIZE_IN_THREAD_CHARS:
            return await asyncio.to_thread(lay_out)
        return lay_out()

    async def start_generation(
        self,
        token_ids: list[int],
        draft_token_ids: list[int],
        sampling: SamplingParams,
        identity: Identity,
        span: trace.Span,
        context: grpc.aio.ServicerContext,
        prompt_lookup: bool = False,
        block_hashes: BlockHashes | None = None,
        priority: int = 0,
    ) -> ResumableGeneration:
        """Checks the prompt against the model's context and routes its first attempt (block_hashes: the
        prompt's, when the caller keeps them; retries hash their own, longer prompts). priority: the decode
        scheduler's (0 real, 1 a prediction). Raises INVALID_ARGUMENT for a prompt too long, UNAVAILABLE
        with no decode worker. Nothing runs downstream until the result's chunks are read (stream)."""
        context_tokens = self._model_config.max_position_embeddings
        limit = context_tokens - sampling.max_new_tokens
        if len(token_ids) > limit:
            raise invalid(
                f"prompt has {len(token_ids)} tokens, more than the limit of {limit}: the model's context is "
                f"{context_tokens} tokens and sampling.max_tokens takes {sampling.max_new_tokens} of them; "
                "send less code or lower sampling.max_tokens"
            )
        salt = identity.cache_salt

        async def plan(prompt_token_ids: Sequence[int], exclude: AbstractSet[str]) -> RoutePlan | None:
            return await self._router.plan(prompt_token_ids, salt, exclude)

        first = await self._router.plan(token_ids, salt, frozenset(), block_hashes)
        if first is None:
            raise _no_decode_worker()
        request = decode_pb2.GenerateRequest(
            request_id=uuid.uuid4().hex,
            prompt_token_ids=token_ids,
            sampling=sampling_to_proto(sampling),
            draft_token_ids=draft_token_ids,
            prompt_lookup=prompt_lookup,
            cache_salt=salt,
            priority=priority,
        )
        span.set_attribute("kvmesh.request_id", request.request_id)
        if identity.tenant:
            span.set_attribute("kvmesh.tenant", identity.tenant)
        remaining_s = deadline_s(context)
        return ResumableGeneration(
            request,
            first.route,
            plan,
            self._pool,
            self.tokenizer,
            eos_token_ids=self._model_config.eos_token_ids,
            timeout_s=self._config.request_timeout_s if remaining_s is None else remaining_s,
            max_attempts=self._config.max_attempts,
        )

    async def stream(
        self, generation: ResumableGeneration, arrival_s: float, operation: str
    ) -> AsyncGenerator[gateway_pb2.CompletionChunk, None]:
        """The generation's chunks as the API sends them; the last carries usage with the route stage and
        TTFT measured from arrival_s. Closing it cancels the downstream call on every hop."""
        route_ms = (time.perf_counter() - arrival_s) * 1000.0
        ttft_ms: float | None = None
        attributes = {"gen_ai.operation.name": operation}
        async with aclosing(generation.chunks()) as chunks:
            async for chunk in chunks:
                if ttft_ms is None and chunk.token_ids:
                    ttft_ms = (time.perf_counter() - arrival_s) * 1000.0
                    self._ttft_s.record(ttft_ms / 1000.0, attributes)
                out = gateway_pb2.CompletionChunk(
                    text=chunk.text, token_ids=chunk.token_ids, finish_reason=chunk.finish_reason
                )
                if chunk.HasField("usage"):
                    # The worker's usage, plus what only the gateway can measure.
                    out.usage.CopyFrom(chunk.usage)
                    out.usage.stage_ms.route_ms = route_ms
                    out.usage.ttft_ms = ttft_ms if ttft_ms is not None else 0.0
                    self._duration_s.record(time.perf_counter() - arrival_s, attributes)
                yield out


def _cursor_text(request: gateway_pb2.CompleteRequest) -> tuple[str, str]:
    """(prefix, suffix) from the document and cursor, or from the request's own prefix and suffix."""
    if request.document.text:
        document = request.document
        try:
            return split_document(document.text, document.line, document.column)
        except ValueError as error:
            raise invalid(str(error)) from None
    if not request.prefix and not request.suffix:
        raise invalid("prefix, suffix and document.text are all empty: send the code around the cursor")
    return request.prefix, request.suffix


async def serve(config: GatewayConfig) -> RunningServer:
    """Starts the gateway. Health turns SERVING once the pool holds a decode worker, and back to
    NOT_SERVING while it holds none. Raises CheckpointError when model_path lacks tokenizer.json or
    config.json, OSError when the address, the keys file or the salt secret file cannot be opened,
    ValueError for a malformed keys file or a too short salt secret."""
    model_path = Path(config.model_path)
    tokenizer = Tokenizer.from_file(model_path / "tokenizer.json")
    model_config = load_model_config(model_path)
    channel_options = [
        ("grpc.max_send_message_length", config.server.max_message_bytes),
        ("grpc.max_receive_message_length", config.server.max_message_bytes),
    ]
    keys = None
    if config.api_keys_file is not None:
        assert config.salt_secret_file is not None  # GatewayConfig checks it
        keys = TenantKeys.load(config.api_keys_file, SaltSecret.load(config.salt_secret_file))
        logger.info("multi-tenancy on: %d API key(s) from %s", keys.num_keys, config.api_keys_file)
    elif config.salt_secret_file is not None:
        logger.info("multi-tenancy is off (no API keys file): the salt secret file is not used")
    pool = WorkerPool(
        config.cache_store_address,
        config.refresh_ms,
        channel_options,
        tls=config.tls,
        unlisted_grace_ms=config.unlisted_grace_ms,
    )
    await pool.start()
    lookup = PrefixLookup(pool.store_channel, config.lookup_timeout_ms / 1000.0)
    router = Router(pool, lookup, config.routing)
    servicer = GatewayServicer(config, pool, router, Authenticator(keys), tokenizer, model_config)
    try:
        running = await start_server(
            [(gateway_pb2_grpc.add_GatewayServicer_to_server, servicer)], [SERVICE_NAME], config.server
        )
    except BaseException:
        await pool.close()
        raise
    period_s = min(config.refresh_ms / 1000.0, 0.1)
    running.add_background_task(asyncio.create_task(watch_pool(running, pool, period_s)))
    if config.metrics_port is not None:
        port = start_metrics_server(config.metrics_port, config.server.metrics_bind_host)
        logger.info("metrics on port %d", port)
    return running
