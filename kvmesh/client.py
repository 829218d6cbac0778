"""A small synchronous client for the gateway.

    import os

    from kvmesh.client import Client

    with Client("localhost:50051", timeout_s=60, api_key=os.environ.get("KVMESH_API_KEY")) as client:
        for chunk in client.complete(prefix="def add(a, b):\\n    ", suffix="\\n", max_tokens=32):
            print(chunk.text, end="")
        print(chunk.usage)  # the last chunk carries usage

Errors surface as `grpc.RpcError` (call `.code()` and `.details()` on it): UNAUTHENTICATED for a missing
or unknown API key (a gateway with multi-tenancy on), INVALID_ARGUMENT for a bad request (the details say
which field and what limit), UNAVAILABLE when no decode worker is up,
RESOURCE_EXHAUSTED when the mesh sheds load, DEADLINE_EXCEEDED after timeout_s. Breaking out of the loop,
or closing the generator, cancels the call on every hop.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from types import TracebackType

import grpc

from kvmesh.client_session import ClientSession
from kvmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

_SOURCES = {
    common_pb2.USAGE_SOURCE_MODEL: "MODEL",
    common_pb2.USAGE_SOURCE_REUSED: "REUSED",
    common_pb2.USAGE_SOURCE_PREDICTED: "PREDICTED",
}
_FINISH_REASONS = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length"}


@dataclass(frozen=True)
class Usage:
    """What a request cost; see kvmesh.v1.Usage for each field."""

    prompt_tokens: int
    cached_tokens: int
    prefilled_tokens: int
    completion_tokens: int
    ttft_ms: float
    """Request arrival at the gateway to the first token, in milliseconds."""
    stage_ms: dict[str, float] = field(default_factory=dict)
    """Milliseconds per stage: route, queue, prefill, transfer, decode."""
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0
    forward_passes: int = 0
    transfer_bytes: int = 0
    transport: str = ""
    source: str = ""
    """Editor sessions: "MODEL", "REUSED" or "PREDICTED" (kvmesh.v1.UsageSource); "" outside one."""

    @classmethod
    def from_proto(cls, usage: common_pb2.Usage) -> Usage:
        stages = usage.stage_ms
        return cls(
            prompt_tokens=usage.prompt_tokens,
            cached_tokens=usage.cached_tokens,
            prefilled_tokens=usage.prefilled_tokens,
            completion_tokens=usage.completion_tokens,
            ttft_ms=usage.ttft_ms,
            stage_ms={
                "route": stages.route_ms,
                "queue": stages.queue_ms,
                "prefill": stages.prefill_ms,
                "transfer": stages.transfer_ms,
                "decode": stages.decode_ms,
            },
            accepted_prediction_tokens=usage.accepted_prediction_tokens,
            rejected_prediction_tokens=usage.rejected_prediction_tokens,
            forward_passes=usage.forward_passes,
            transfer_bytes=usage.transfer_bytes,
            transport=usage.transport,
            source=_SOURCES.get(usage.source, ""),
        )


@dataclass(frozen=True)
class Chunk:
    """One streamed piece of an answer."""

    text: str
    """Text added since the previous chunk."""
    token_ids: list[int]
    """Token ids added since the previous chunk."""
    finish_reason: str | None = None
    """"stop" or "length" on the last chunk; None before."""
    usage: Usage | None = None
    """Set on the last chunk only."""

    @classmethod
    def from_proto(cls, chunk: gateway_pb2.CompletionChunk) -> Chunk:
        return cls(
            text=chunk.text,
            token_ids=list(chunk.token_ids),
            finish_reason=_FINISH_REASONS.get(chunk.finish_reason),
            usage=Usage.from_proto(chunk.usage) if chunk.HasField("usage") else None,
        )


def _sampling(
    max_tokens: int,
    temperature: float,
    top_p: float | None,
    top_k: int,
    seed: int | None,
    stop: Sequence[str],
) -> common_pb2.SamplingParams:
    sampling = common_pb2.SamplingParams(
        max_tokens=max_tokens, temperature=temperature, top_k=top_k, stop_strings=list(stop)
    )
    if top_p is not None:  # unset: the server's 1.0 (off); an explicit value is checked as sent
        sampling.top_p = top_p
    if seed is not None:
        sampling.seed = seed
    return sampling


class Client:
    """A channel to a gateway; use as a context manager, or call close()."""

    def __init__(
        self,
        target: str,
        timeout_s: float = 60.0,
        api_key: str | None = None,
        tls_ca_file: str | None = None,
    ) -> None:
        """target: the gateway's host:port. timeout_s: the deadline of each call, in seconds. api_key:
        sent as "authorization: Bearer <api_key>" on every call (None: no key; a gateway with
        multi-tenancy on then answers UNAUTHENTICATED). tls_ca_file: PEM file of the CA that signed the
        gateway's certificate (--public-tls-cert): the call is TLS and the gateway is verified; None:
        plaintext. Raises OSError when tls_ca_file cannot be read."""
        if tls_ca_file is None:
            self._channel = grpc.insecure_channel(target)
        else:
            with open(tls_ca_file, "rb") as file:
                credentials = grpc.ssl_channel_credentials(root_certificates=file.read())
            self._channel = grpc.secure_channel(target, credentials)
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)
        self._timeout_s = timeout_s
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {api_key}"),) if api_key else ()
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def complete(
        self,
        prefix: str = "",
        suffix: str = "",
        *,
        context: str = "",
        document: tuple[str, int, int] | None = None,
        max_tokens: int = 0,
        temperature: float = 0.0,
        top_p: float | None = None,
        top_k: int = 0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        prompt_lookup: bool = False,
    ) -> Generator[Chunk, None, None]:
        """Streams a fill-in-the-middle completion at the cursor.

        Give either prefix and suffix, or document=(text, line, column) with a 0-based line and a column
        in characters. max_tokens 0 means the gateway's default; temperature 0 is greedy; top_p None
        is not sent (off). prompt_lookup
        drafts from the prompt where the output repeats it (same output, fewer forward passes when code
        repeats nearby code). Raises grpc.RpcError.
        """
        request = gateway_pb2.CompleteRequest(
            prefix=prefix,
            suffix=suffix,
            context=context,
            sampling=_sampling(max_tokens, temperature, top_p, top_k, seed, stop),
            prompt_lookup=prompt_lookup,
        )
        if document is not None:
            text, line, column = document
            request.document.CopyFrom(gateway_pb2.TextDocument(text=text, line=line, column=column))
        return self._stream(self._stub.Complete, request)

    def edit(
        self,
        original: str,
        snippet: str,
        *,
        speculative: bool = True,
        max_tokens: int = 0,
        temperature: float = 0.0,
        top_p: float | None = None,
        top_k: int = 0,
        seed: int | None = None,
        stop: Sequence[str] = (),
    ) -> Generator[Chunk, None, None]:
        """Streams original rewritten as snippet asks. speculative uses original as the draft (the output
        is the same, only faster). Raises grpc.RpcError."""
        request = gateway_pb2.EditRequest(
            original=original,
            snippet=snippet,
            speculative=speculative,
            sampling=_sampling(max_tokens, temperature, top_p, top_k, seed, stop),
        )
        return self._stream(self._stub.Edit, request)

    def session(self, predict_ahead: bool = False) -> ClientSession:
        """An editor session (kvmesh.client_session): the document lives at the gateway, changes are
        sent as ranges, and suggestions are superseded, reused and predicted there."""
        return ClientSession(self._stub, self._metadata, predict_ahead, None)

    def _stream(
        self,
        method: grpc.UnaryStreamMultiCallable,
        request: gateway_pb2.CompleteRequest | gateway_pb2.EditRequest,
    ) -> Generator[Chunk, None, None]:
        call = method(request, timeout=self._timeout_s, metadata=self._metadata)
        try:
            for chunk in call:
                yield Chunk.from_proto(chunk)
        finally:
            # A generator closed early (break, close(), garbage collection) cancels the call on every hop.
            call.cancel()
