"""Gateway.Session: one editor's document at the gateway, and its suggestions, over one bidirectional stream.

Per stream, requests are handled in order (open, then changes, completions and accepts); suggestions
stream back through one queue, each reply tagged with the version and completion_id it answers.

- Supersede: a completion ends the previous one's replies (a last reply marked superseded) and cancels
  its model call, down to every worker, unless the user has typed into it:
- Reuse: when the document at the new cursor is the old one with a prefix of the old suggestion typed at
  its cursor, the rest of it (still streaming, or finished) is served with no new model call.
- Predict-ahead (opt-in at open): when a suggestion finishes, the next one is started as if it were
  accepted; a completion after the accept finds it running or done. A change that is not typing into the
  last suggestion cancels it.
- Closing the stream (or the client going away) cancels every task and call the session started.

A model call and the sending of a suggestion's chunks: gateway.session_serving; counters (wasted tokens
among them): gateway.session_metrics.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc
import grpc.aio

from gateway.config import GatewayConfig
from gateway.session import SessionDocument, Suggestion, offset_of
from gateway.session_metrics import SessionMetrics
from gateway.session_serving import serve_chunks, start_model_call
from gateway.tenancy import Identity
from kvmesh.engine.sampling import SamplingParams
from kvmesh.mesh.errors import ServiceError, invalid
from kvmesh.v1 import common_pb2, gateway_pb2

if TYPE_CHECKING:
    from gateway.server import GatewayServicer

Source = common_pb2.UsageSource

PREDICTION_PRIORITY = 1
"""decode_pb2.GenerateRequest.priority of a predicted-ahead request: after every real one."""


class SessionService:
    """Runs Gateway.Session streams over a GatewayServicer's layout, routing and streaming, and holds the
    per-tenant session counts."""

    def __init__(self, gateway: GatewayServicer, config: GatewayConfig) -> None:
        self.gateway = gateway
        self.config = config
        self.metrics = SessionMetrics()
        self._open_by_tenant: Counter[str] = Counter()

    async def run(
        self, requests: AsyncIterator[gateway_pb2.SessionRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.SessionReply]:
        identity = self.gateway.authenticate(context)
        tenant = identity.tenant or ""
        if self._open_by_tenant[tenant] >= self.config.max_sessions_per_tenant:
            raise ServiceError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this tenant has {self._open_by_tenant[tenant]} sessions open, the limit "
                "(max_sessions_per_tenant): close one first",
            )
        self._open_by_tenant[tenant] += 1
        session = EditorSession(self, identity, context)
        reader = asyncio.create_task(session.read(requests))
        try:
            while True:
                reply = await session.replies.get()
                if isinstance(reply, BaseException):
                    raise reply
                if reply is None:
                    return
                yield reply
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            await session.close()
            self._open_by_tenant[tenant] -= 1


class EditorSession:
    """One stream's state: the document, the suggestion being served, the last one, the prediction."""

    def __init__(
        self, service: SessionService, identity: Identity, context: grpc.aio.ServicerContext
    ) -> None:
        self._service = service
        self._gateway = service.gateway
        self._metrics = service.metrics
        self._identity = identity
        self._context = context
        self._attributes = {"kvmesh.tenant": identity.tenant or ""}
        self.replies: asyncio.Queue[gateway_pb2.SessionReply | BaseException | None] = asyncio.Queue()
        self.document: SessionDocument | None = None
        self._predict_ahead = False
        self._serving: asyncio.Task[None] | None = None
        self._serving_id = (0, 0)
        """(version, completion_id) of the completion being served."""
        self._last: Suggestion | None = None
        """The suggestion last served (what an accept inserts), and the characters typed into it."""
        self._last_typed = 0
        self._last_version = 0
        self._prediction: Suggestion | None = None
        self._sampling: SamplingParams | None = None

    async def read(self, requests: AsyncIterator[gateway_pb2.SessionRequest]) -> None:
        """Handles requests until the client half-closes (then the current suggestion is finished and the
        stream ends) or an error ends the session (it goes to the reply queue)."""
        idle_s = self._service.config.session_idle_timeout_s
        iterator = aiter(requests)
        try:
            while True:
                try:
                    request = await asyncio.wait_for(anext(iterator), idle_s)
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    raise ServiceError(
                        grpc.StatusCode.DEADLINE_EXCEEDED,
                        f"the session sent nothing for {idle_s:g} s (session_idle_timeout_s): open a new one",
                    ) from None
                await self._handle(request)
            if self._serving is not None:
                await asyncio.gather(self._serving, return_exceptions=True)
            self.replies.put_nowait(None)
        except Exception as error:  # noqa: BLE001 - the RPC ends with its status (ErrorInterceptor)
            self.replies.put_nowait(error)

    async def _handle(self, request: gateway_pb2.SessionRequest) -> None:
        action = request.WhichOneof("action")
        if action is None:
            raise invalid("request has no action: send open, change, complete or accept")
        if action == "open":
            self._open(request.open)
            return
        if self.document is None:
            raise invalid(f"{action} came before open: send open (the document) first")
        if action == "change":
            self.document.apply(request.change)
            self._check_prediction()
        elif action == "complete":
            self._complete(request.complete, self.document)
        else:
            self._accept(request.accept, self.document)

    def _open(self, request: gateway_pb2.SessionOpen) -> None:
        if self.document is not None:
            raise invalid("open was sent twice: a session holds one document; open another session")
        limit = self._service.config.max_document_chars
        for name, text in (("open.text", request.text), ("open.context", request.context)):
            if len(text) > limit:
                raise invalid(
                    f"{name} is {len(text)} characters, more than the limit of {limit} "
                    "(max_document_chars): send a smaller document"
                )
        context_ids = self._gateway.layout.encode(request.context)
        self.document = SessionDocument(self._gateway.tokenizer, request.text, context_ids, limit)
        self._predict_ahead = request.predict_ahead

    def _complete(self, request: gateway_pb2.SessionComplete, document: SessionDocument) -> None:
        arrival_s = time.perf_counter()
        document.check_current(request.version, "complete.version")
        cursor = offset_of(document.text, request.line, request.column, "complete.")
        sampling = self._gateway.sampling_params(request.sampling)
        prefix, suffix = document.text[:cursor], document.text[cursor:]
        self._supersede()
        source, typed = Source.USAGE_SOURCE_MODEL, 0
        suggestion = None
        for candidate, candidate_source in (
            (self._prediction, Source.USAGE_SOURCE_PREDICTED),
            (self._last, Source.USAGE_SOURCE_REUSED),
        ):
            if candidate is not None and candidate.error is None:
                found = candidate.typed_into(prefix, suffix)
                # NOTE: a finished suggestion typed in full has nothing left to serve; an empty one that
                # answers this very cursor (found == 0) is still the answer.
                if found is not None and not (0 < found == len(candidate.text) and candidate.done):
                    suggestion, source, typed = candidate, candidate_source, found
                    break
        if suggestion is self._prediction and suggestion is not None:
            self._metrics.prediction(self._attributes, "used")
            self._prediction = None
        if suggestion is None:
            if self._last is not None and not self._last.done:
                self._drop(self._last, "superseded")  # cut before its end, and not typed into
            self._drop_prediction()
            suggestion = self._start((prefix, suffix), sampling, arrival_s, "completion")
        self._sampling = sampling
        self._last, self._last_typed, self._last_version = suggestion, typed, request.version
        self._serving_id = (request.version, request.completion_id)
        self._serving = asyncio.create_task(self._serve(suggestion, typed, source, arrival_s))

    def _start(
        self, cursor: tuple[str, str], sampling: SamplingParams, arrival_s: float, kind: str
    ) -> Suggestion:
        """A model call at cursor (prefix, suffix); kind "prediction" runs at PREDICTION_PRIORITY, which
        the decode worker's scheduler admits after and preempts before every real request."""
        assert self.document is not None
        priority = PREDICTION_PRIORITY if kind == "prediction" else 0
        suggestion = start_model_call(
            self._gateway,
            self.document,
            self._identity,
            self._context,
            cursor,
            sampling,
            arrival_s,
            priority,
            self._ended,
        )
        self._metrics.model_call(self._attributes, kind)
        return suggestion

    def _ended(self, suggestion: Suggestion) -> None:
        self._metrics.ended(self._attributes, suggestion)
        finished = suggestion.usage is not None and not suggestion.wasted
        if finished and self._predict_ahead and suggestion is self._last and suggestion.text:
            self._predict(suggestion)

    def _predict(self, suggestion: Suggestion) -> None:
        """Starts the next suggestion as if this one were accepted (at most one per session)."""
        if self.document is None or self._sampling is None or self._prediction is not None:
            return
        cursor = (suggestion.prefix + suggestion.text, suggestion.suffix)
        try:
            self._prediction = self._start(cursor, self._sampling, time.perf_counter(), "prediction")
        except ServiceError:
            return  # a prediction that does not fit the context is simply not made

    def _check_prediction(self) -> None:
        """A change other than typing into the last suggestion contradicts the prediction: cancel it."""
        prediction, last, document = self._prediction, self._last, self.document
        if prediction is None or last is None or document is None:
            return
        typed = len(document.text) - len(last.prefix) - len(last.suffix)
        if not (
            0 <= typed <= len(last.text)
            and document.text.startswith(last.prefix + last.text[:typed])
            and document.text.endswith(last.suffix)
        ):
            self._drop_prediction()

    def _drop_prediction(self) -> None:
        if self._prediction is not None:
            self._metrics.prediction(self._attributes, "wasted")
            self._drop(self._prediction, "prediction")
            self._prediction = None

    def _drop(self, suggestion: Suggestion, reason: str) -> None:
        """The suggestion will never be served: cancel its model call; its tokens count as wasted (when
        its call ends, or now if it has)."""
        if suggestion.wasted:
            return
        suggestion.wasted = reason
        if suggestion.task is not None and suggestion.task.done():
            self._metrics.wasted_after_end(self._attributes, suggestion)
        suggestion.cancel()

    def _accept(self, request: gateway_pb2.SessionAccept, document: SessionDocument) -> None:
        document.check_next(request.version, "accept.version")
        last = self._last
        if last is None or self._last_version != document.version:
            raise invalid(
                "accept.version: there is no suggestion for the current version to accept; send accept "
                "right after the suggestion's completion, before any change"
            )
        cursor = len(last.prefix) + self._last_typed
        document.insert(cursor, cursor, last.text[self._last_typed :], "accept")
        self._last_version = document.version

    def _supersede(self) -> None:
        if self._serving is None or self._serving.done():
            return
        self._serving.cancel()
        version, completion_id = self._serving_id
        self.replies.put_nowait(
            gateway_pb2.SessionReply(version=version, completion_id=completion_id, superseded=True)
        )
        self._metrics.superseded(self._attributes)

    async def _serve(self, suggestion: Suggestion, typed: int, source: int, arrival_s: float) -> None:
        """Streams the suggestion past the `typed` characters as replies to the current completion. An
        error ends the session with its status."""
        version, completion_id = self._serving_id

        def send(chunk: gateway_pb2.CompletionChunk) -> None:
            reply = gateway_pb2.SessionReply(version=version, completion_id=completion_id, chunk=chunk)
            self.replies.put_nowait(reply)

        try:
            if await serve_chunks(suggestion, typed, source, arrival_s, send):
                self._metrics.served(self._attributes, source)
        except Exception as error:  # noqa: BLE001 - the RPC ends with its status (ErrorInterceptor)
            self.replies.put_nowait(error)

    async def close(self) -> None:
        """Cancels everything the session started and waits for it to stop; a prediction never used is
        wasted."""
        tasks = [self._serving]
        for suggestion in (self._last, self._prediction):
            if suggestion is not None:
                tasks.append(suggestion.task)
        self._drop_prediction()
        if self._last is not None:
            self._last.cancel()
        pending = [task for task in tasks if task is not None]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
