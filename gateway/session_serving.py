"""The serving path of an editor session: a suggestion's model call (layout from the session's tokens,
routing, the generation's chunks pumped into the Suggestion), and a suggestion's chunks sent as replies.

Both go through the gateway servicer's public interface (GatewayServicer: layout, lay_out_window,
start_generation, stream), the same path as a stateless Complete.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import aclosing
from typing import TYPE_CHECKING

import grpc.aio

from gateway.session import SessionDocument, Suggestion
from gateway.tenancy import Identity
from kvmesh.engine.sampling import SamplingParams
from kvmesh.v1 import common_pb2, gateway_pb2

if TYPE_CHECKING:
    from gateway.server import GatewayServicer

Source = common_pb2.UsageSource


def start_model_call(
    gateway: GatewayServicer,
    document: SessionDocument,
    identity: Identity,
    context: grpc.aio.ServicerContext,
    cursor: tuple[str, str],
    sampling: SamplingParams,
    arrival_s: float,
    priority: int,
    on_end: Callable[[Suggestion], None],
) -> Suggestion:
    """Lays out the prompt for the document split at cursor (prefix, suffix) from the session's tokens
    (now: the document may change at the next await), and starts suggestion.task, which routes it and
    pumps its chunks into the suggestion, ends it (with the error, if any), then calls on_end (also when
    cancelled: cancelling the task cancels the downstream call). Raises INVALID_ARGUMENT when the prompt
    does not fit the model's context, UNAVAILABLE with no decode worker."""
    prefix, suffix = cursor
    prefix_ids, suffix_ids = document.tokens_of(prefix, suffix)
    prompt = gateway.lay_out_window(
        lambda **limits: gateway.layout.completion_window_ids(
            document.context_ids, prefix_ids, suffix_ids, **limits
        ),
        sampling.max_new_tokens,
    )
    block_hashes = document.block_hashes(prompt.token_ids, identity.cache_salt)
    suggestion = Suggestion(prefix, suffix)

    async def pump() -> None:
        try:
            with gateway.tracer.start_as_current_span("route") as span:
                generation = await gateway.start_generation(
                    prompt.token_ids,
                    [],
                    sampling,
                    identity,
                    span,
                    context,
                    block_hashes=block_hashes,
                    priority=priority,
                )
            async with aclosing(gateway.stream(generation, arrival_s, "text_completion")) as chunks:
                async for chunk in chunks:
                    suggestion.add(chunk)
        except asyncio.CancelledError:
            suggestion.end()
            raise
        except Exception as error:  # noqa: BLE001 - handed to whoever serves the suggestion
            suggestion.end(error)
        else:
            suggestion.end()
        finally:
            on_end(suggestion)

    suggestion.task = asyncio.create_task(pump())
    return suggestion


async def serve_chunks(
    suggestion: Suggestion,
    typed: int,
    source: int,
    arrival_s: float,
    send: Callable[[gateway_pb2.CompletionChunk], None],
) -> bool:
    """Sends the suggestion's chunks past the `typed` characters as they come; the last carries usage with
    usage.source. Returns True once that last chunk is sent, False when the suggestion ended without one
    (cancelled). Raises the suggestion's error."""
    route_ms = (time.perf_counter() - arrival_s) * 1000.0
    next_chunk, skip = 0, typed
    while True:
        while next_chunk < len(suggestion.chunks):
            chunk = gateway_pb2.CompletionChunk()
            chunk.CopyFrom(suggestion.chunks[next_chunk])
            next_chunk += 1
            if skip:
                cut = min(skip, len(chunk.text))
                skip -= cut
                # Tokens are not cut at a character: a chunk served in part carries its text only.
                chunk.text = chunk.text[cut:]
                del chunk.token_ids[:]
            if source != Source.USAGE_SOURCE_MODEL and chunk.HasField("usage"):
                # Computed earlier: what this request waited is the gateway's time alone.
                usage = common_pb2.Usage(source=source, ttft_ms=route_ms)
                usage.stage_ms.route_ms = route_ms
                chunk.usage.CopyFrom(usage)
            elif chunk.HasField("usage"):
                chunk.usage.source = source
            send(chunk)
            if chunk.HasField("usage"):
                return True
        if suggestion.done:
            if suggestion.error is not None:
                raise suggestion.error
            return False
        await suggestion.changed.wait()
