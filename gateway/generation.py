"""One request's generation, streamed from decode workers with retries, failover and resumption.

A worker that answers UNAVAILABLE (it died, or is shutting down) is retried with tenacity, within the
request's deadline, on another worker where there is one. When the stream dies after tokens were sent to
the client, the next worker gets the prompt plus those tokens and max_tokens minus their count, so the
client sees no gap and no duplicate. Every other status (RESOURCE_EXHAUSTED, INVALID_ARGUMENT,
DEADLINE_EXCEEDED, ...) ends the request unchanged.

Text and tokens stay aligned across a resume: chunks whose tokens have no text yet (a multi-byte
character cut between tokens) are held until their text arrives, so the tokens the client has seen always
decode to complete characters, and text a worker held back (a possible stop string) is decoded here and
sent before the next worker's text.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from collections.abc import Set as AbstractSet

import grpc
import grpc.aio
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
    wait_exponential,
    wait_random,
)

from gateway.router import WorkerPool
from gateway.routing_cost import Route, RoutePlan
from kvmesh.engine.tokenizer import Tokenizer
from kvmesh.mesh.errors import ServiceError
from kvmesh.mesh.telemetry import tracer
from kvmesh.v1 import common_pb2, decode_pb2, decode_pb2_grpc

logger = logging.getLogger(__name__)

PlanRoute = Callable[[Sequence[int], AbstractSet[str]], Awaitable[RoutePlan | None]]
"""(prompt token ids, excluded worker_ids) -> the plan of the next attempt, or None without workers."""


def _is_unavailable(error: BaseException) -> bool:
    return isinstance(error, grpc.aio.AioRpcError) and error.code() == grpc.StatusCode.UNAVAILABLE


def _is_last(chunk: decode_pb2.GenerateChunk) -> bool:
    return chunk.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED or chunk.HasField("usage")


class ResumableGeneration:
    """Streams one GenerateRequest to the client's chunks, across as many workers as it takes.

    Use once: `async for chunk in generation.chunks()`. Closing or cancelling the iteration cancels the
    downstream call at once.
    """

    def __init__(
        self,
        request: decode_pb2.GenerateRequest,
        first_route: Route,
        plan_route: PlanRoute,
        pool: WorkerPool,
        tokenizer: Tokenizer,
        *,
        eos_token_ids: tuple[int, ...],
        timeout_s: float,
        max_attempts: int,
    ) -> None:
        self._request = request
        self._next_route: Route | None = first_route
        self._plan_route = plan_route
        self._pool = pool
        self._tokenizer = tokenizer
        self._timeout_s = timeout_s
        self._max_attempts = max_attempts
        self._failed: set[str] = set()
        self._sent_token_ids: list[int] = []
        self._sent_text: list[str] = []
        self._held_token_ids: list[int] = []
        self._held_text = ""
        self._carried_text = ""
        """Text the failed worker held back, sent ahead of the next worker's first text."""
        self._num_resumed_tokens = 0
        """Tokens already sent when the current attempt started."""
        sampling = request.sampling
        self._stop_token_ids = set(sampling.stop_token_ids)
        if not sampling.ignore_eos:
            self._stop_token_ids.update(eos_token_ids)
        self.num_attempts = 0

    async def chunks(self) -> AsyncGenerator[decode_pb2.GenerateChunk, None]:
        """Chunks to forward to the client, the last one with finish_reason and usage set.

        Raises grpc.aio.AioRpcError with the worker's status, or ServiceError (UNAVAILABLE) when no decode
        worker is left, or DEADLINE_EXCEEDED when the deadline passed between attempts.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout_s
        retrying = AsyncRetrying(
            retry=retry_if_exception(_is_unavailable),
            stop=stop_after_attempt(self._max_attempts) | stop_before_delay(self._timeout_s),
            wait=wait_exponential(multiplier=0.02, max=0.5) + wait_random(0, 0.02),
            before_sleep=self._log_retry,
            reraise=True,
        )
        # NOTE: tenacity's attempt block swallows every exception, GeneratorExit and CancelledError
        # included, and re-raises it from the next iteration because only UNAVAILABLE is retried: closing
        # or cancelling this generator still ends it, after the finally below has cancelled the call.
        async for attempt in retrying:
            with attempt:
                route = await self._route()
                remaining_s = deadline - loop.time()
                if remaining_s <= 0:
                    raise ServiceError(grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline passed")
                request = self._attempt_request(route)
                if request is None:  # generation had ended; only the last chunk was lost
                    yield self._synthesized_last_chunk()
                    return
                self.num_attempts += 1
                self._num_resumed_tokens = len(self._sent_token_ids)
                stub = decode_pb2_grpc.DecodeStub(self._pool.channel(route.decode_worker))
                with contextlib.ExitStack() as in_flight:
                    # Entered before the next await, so concurrent requests see this one when they pick.
                    in_flight.enter_context(self._pool.in_flight(route.decode_worker))
                    if route.prefill_worker is not None:
                        in_flight.enter_context(self._pool.in_flight(route.prefill_worker))
                    call = stub.Generate(request, timeout=remaining_s)
                    finished = False
                    try:
                        async for chunk in call:
                            if finished:
                                continue  # nothing may follow the last chunk
                            forwarded = self._accept(chunk)
                            if forwarded is not None:
                                yield forwarded
                                finished = _is_last(forwarded)
                        # NOTE: read to the end rather than return after the last chunk: the call then ends
                        # with the worker's OK, instead of being cancelled while the worker finishes up.
                        if finished:
                            return
                        raise ServiceError(
                            grpc.StatusCode.INTERNAL,
                            f"decode worker {route.decode_worker.worker_id} ended the stream without a last chunk",
                        )
                    except grpc.aio.AioRpcError as error:
                        if finished:
                            return  # the client has its whole answer; how the call ended no longer matters
                        if _is_unavailable(error):
                            self._fail(route)
                        raise
                    finally:
                        # Reaches the decode worker (and through it the prefill worker) on every exit:
                        # client cancellation, deadline, a failed attempt. A no-op on a finished call.
                        call.cancel()

    async def _route(self) -> Route:
        route, self._next_route = self._next_route, None
        if route is None:
            token_ids = [*self._request.prompt_token_ids, *self._sent_token_ids]
            with tracer(__name__).start_as_current_span("route") as span:
                span.set_attribute("kvmesh.attempt", self.num_attempts + 1)
                plan = await self._plan_route(token_ids, self._failed)
                route = plan.route if plan is not None else None
        if route is None:
            raise ServiceError(grpc.StatusCode.UNAVAILABLE, "no decode worker is registered; try again later")
        return route

    def _attempt_request(self, route: Route) -> decode_pb2.GenerateRequest | None:
        """The request for the next attempt: the original one, or resumed after the tokens already sent."""
        request = decode_pb2.GenerateRequest()
        request.CopyFrom(self._request)
        request.prefill_address = route.prefill_worker.address if route.prefill_worker else ""
        request.transport = route.transport
        if self._sent_token_ids:
            num_left = self._request.sampling.max_tokens - len(self._sent_token_ids)
            if num_left <= 0 or self._sent_token_ids[-1] in self._stop_token_ids:
                return None
            request.prompt_token_ids.extend(self._sent_token_ids)
            request.sampling.max_tokens = num_left
        return request

    def _accept(self, chunk: decode_pb2.GenerateChunk) -> decode_pb2.GenerateChunk | None:
        """Folds a worker's chunk into what the client gets next; None: nothing to send yet."""
        self._held_token_ids.extend(chunk.token_ids)
        self._held_text += chunk.text
        last = _is_last(chunk)
        if not last and not self._held_text:
            return None  # tokens without text yet (a character cut between tokens), or an empty chunk
        forwarded = decode_pb2.GenerateChunk(
            token_ids=self._held_token_ids, text=self._carried_text + self._held_text
        )
        if last:
            forwarded.finish_reason = chunk.finish_reason
            forwarded.usage.CopyFrom(chunk.usage)
            if self._num_resumed_tokens:
                # The last worker counted the resumed tokens as prompt; the client asked for the original.
                forwarded.usage.prompt_tokens = len(self._request.prompt_token_ids)
                forwarded.usage.completion_tokens = len(self._sent_token_ids) + len(self._held_token_ids)
        self._sent_token_ids.extend(self._held_token_ids)
        self._sent_text.append(forwarded.text)
        self._held_token_ids = []
        self._held_text = ""
        self._carried_text = ""
        return forwarded

    def _fail(self, route: Route) -> None:
        """Remembers the failed route and what the client has not seen, for the next attempt."""
        self._failed.add(route.decode_worker.worker_id)
        if route.prefill_worker is not None:
            self._failed.add(route.prefill_worker.worker_id)
        # Held tokens were never shown to the client: the next worker generates them again.
        self._held_token_ids = []
        self._held_text = ""
        # NOTE: decoding all sent tokens at once is exact for byte-level tokenizers; if the client's text
        # is not a prefix of it (a tokenizer that rewrites across tokens) nothing is carried over.
        full_text = self._tokenizer.decode(self._sent_token_ids)
        sent_text = "".join(self._sent_text)
        if full_text.startswith(sent_text) and not full_text.endswith("\ufffd"):
            self._carried_text = full_text[len(sent_text) :]

    def _synthesized_last_chunk(self) -> decode_pb2.GenerateChunk:
        # NOTE: a stop string that ended the generation cannot be told apart here (the worker cut it from
        # the text); such a stream reads as finished by length.
        finish = (
            common_pb2.FINISH_REASON_STOP
            if self._sent_token_ids[-1] in self._stop_token_ids
            else common_pb2.FINISH_REASON_LENGTH
        )
        usage = common_pb2.Usage(
            prompt_tokens=len(self._request.prompt_token_ids),
            completion_tokens=len(self._sent_token_ids),
        )
        return decode_pb2.GenerateChunk(text=self._carried_text, finish_reason=finish, usage=usage)

    def _log_retry(self, state: RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome is not None else None
        logger.warning(
            "request %s: decode attempt %d failed (%s); retrying in %.3f s after %d sent tokens",
            self._request.request_id,
            state.attempt_number,
            error.code().name if isinstance(error, grpc.aio.AioRpcError) else type(error).__name__,
            state.upcoming_sleep,
            len(self._sent_token_ids),
        )
