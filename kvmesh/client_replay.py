"""Replays a typing trace (kvmesh.client_trace) against a gateway, through an editor session
(Gateway.Session) or through stateless Complete requests, and records what the typist saw per keystroke.

Both replays send a request at every keystroke (a typed or deleted character, an accept), at the trace's
times, without waiting for suggestions (except at a look step, for at most the trace's look_ms):
- "session": a change (or an accept) and a complete at the new cursor, over one Session stream; the
  gateway supersedes, reuses and (predict_ahead) predicts.
- "stateless": a Complete carrying the whole document; the previous call, if still running, is cancelled
  (what an editor without sessions does).

What each keystroke saw: kvmesh.client_keystrokes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence

import grpc
import grpc.aio

from kvmesh.client_keystrokes import Keystroke
from kvmesh.client_trace import Trace
from kvmesh.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc

MODES = ("session", "stateless")


def cursor_of(text: str, offset: int) -> tuple[int, int]:
    """(line, column) of a character offset."""
    line = text.count("\n", 0, offset)
    return line, offset - (text.rfind("\n", 0, offset) + 1)


class _Replayer(ABC):
    """The typist's document and cursor; subclasses send the requests."""

    def __init__(
        self,
        stub: gateway_pb2_grpc.GatewayStub,
        sampling: common_pb2.SamplingParams,
        metadata: Sequence[tuple[str, str]],
    ) -> None:
        self._stub = stub
        self._sampling = sampling
        self._metadata = tuple(metadata) or None
        self.document = ""
        self.cursor = 0
        self.keystrokes: list[Keystroke] = []
        self.error: grpc.aio.AioRpcError | None = None
        """The status a call ended with, when not OK (and not cancelled by the replay)."""

    async def open(self, document: str, cursor: int) -> None:
        self.document, self.cursor = document, cursor

    async def edit(self, text: str, kind: str, num_deleted: int = 0) -> Keystroke:
        """Types text at the cursor, after deleting the num_deleted characters before it (one line's)."""
        start = self.cursor - num_deleted
        self.document = self.document[:start] + text + self.document[self.cursor :]
        self.cursor = start + len(text)
        return await self._send(kind, start, num_deleted, text)

    async def close(self) -> None:  # noqa: B027 (a no-op default: a stateless replay holds no stream)
        """End what the replay holds open."""

    @abstractmethod
    async def _send(self, kind: str, start: int, num_deleted: int, text: str) -> Keystroke:
        """Tell the gateway of the change (a session's change, or a stateless request); the keystroke."""


class SessionReplayer(_Replayer):
    def __init__(
        self,
        stub: gateway_pb2_grpc.GatewayStub,
        sampling: common_pb2.SamplingParams,
        metadata: Sequence[tuple[str, str]],
        predict_ahead: bool,
    ) -> None:
        super().__init__(stub, sampling, metadata)
        self._predict_ahead = predict_ahead
        self._requests: asyncio.Queue[gateway_pb2.SessionRequest | None] = asyncio.Queue()
        self._pending: dict[int, Keystroke] = {}
        self._version = 0
        self._call: grpc.aio.StreamStreamCall | None = None
        self._reader: asyncio.Task[None] | None = None

    async def _request_stream(self) -> AsyncIterator[gateway_pb2.SessionRequest]:
        while (request := await self._requests.get()) is not None:
            yield request

    async def open(self, document: str, cursor: int) -> None:
        await super().open(document, cursor)
        self._call = self._stub.Session(self._request_stream(), metadata=self._metadata)
        self._reader = asyncio.create_task(self._read(self._call))
        open_request = gateway_pb2.SessionOpen(text=document, predict_ahead=self._predict_ahead)
        self._requests.put_nowait(gateway_pb2.SessionRequest(open=open_request))
        self._version = 1

    async def _read(self, call: grpc.aio.StreamStreamCall) -> None:
        try:
            async for reply in call:
                keystroke = self._pending.get(reply.completion_id)
                if keystroke is None:
                    continue
                if reply.superseded:
                    keystroke.cancelled = True
                    keystroke.end()
                else:
                    keystroke.add(reply.chunk)
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.CANCELLED:
                self.error = error
        finally:
            for keystroke in self.keystrokes:  # the session is over: nothing more comes for them
                keystroke.end()

    async def _send(self, kind: str, start: int, num_deleted: int, text: str) -> Keystroke:
        self._version += 1
        if kind == "accept":
            request = gateway_pb2.SessionRequest(accept=gateway_pb2.SessionAccept(version=self._version))
        else:
            change = gateway_pb2.DocumentChange(version=self._version, text=text)
            change.range.start_line, change.range.start_column = cursor_of(self.document, start)
            # The range is in the document before the change: the deleted characters were at start.
            change.range.end_line = change.range.start_line
            change.range.end_column = change.range.start_column + num_deleted
            request = gateway_pb2.SessionRequest(change=change)
        keystroke = Keystroke(kind, time.perf_counter())
        self._pending[self._version] = keystroke
        line, column = cursor_of(self.document, self.cursor)
        complete = gateway_pb2.SessionComplete(
            version=self._version,
            line=line,
            column=column,
            completion_id=self._version,
            sampling=self._sampling,
        )
        self._requests.put_nowait(request)
        self._requests.put_nowait(gateway_pb2.SessionRequest(complete=complete))
        self.keystrokes.append(keystroke)
        return keystroke

    async def close(self) -> None:
        self._requests.put_nowait(None)
        if self._call is not None:
            self._call.cancel()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await self._reader


class StatelessReplayer(_Replayer):
    def __init__(
        self,
        stub: gateway_pb2_grpc.GatewayStub,
        sampling: common_pb2.SamplingParams,
        metadata: Sequence[tuple[str, str]],
    ) -> None:
        super().__init__(stub, sampling, metadata)
        self._task: asyncio.Task[None] | None = None

    async def _send(self, kind: str, start: int, num_deleted: int, text: str) -> Keystroke:
        await self.close()  # the newer keystroke makes the running call useless
        line, column = cursor_of(self.document, self.cursor)
        request = gateway_pb2.CompleteRequest(
            document=gateway_pb2.TextDocument(text=self.document, line=line, column=column),
            sampling=self._sampling,
        )
        keystroke = Keystroke(kind, time.perf_counter())
        self._task = asyncio.create_task(self._run(request, keystroke))
        self.keystrokes.append(keystroke)
        return keystroke

    async def _run(self, request: gateway_pb2.CompleteRequest, keystroke: Keystroke) -> None:
        try:
            async for chunk in self._stub.Complete(request, metadata=self._metadata):
                keystroke.add(chunk)
        except grpc.aio.AioRpcError as error:
            self.error = error
        except asyncio.CancelledError:
            keystroke.cancelled = True
            raise
        finally:
            keystroke.end()

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.keystrokes and not self.keystrokes[-1].done.is_set():  # cancelled before it started
            self.keystrokes[-1].cancelled = True
            self.keystrokes[-1].end()


async def replay(
    stub: gateway_pb2_grpc.GatewayStub,
    trace: Trace,
    mode: str,
    *,
    max_tokens: int = 16,
    stop: Sequence[str] = ("\n",),
    predict_ahead: bool = True,
    speed: float = 1.0,
    metadata: Sequence[tuple[str, str]] = (),
) -> tuple[list[Keystroke], int]:
    """Types the trace's region through a session or stateless requests (mode); speed > 1 shortens every
    delay. Returns the keystrokes and the number of accepts. Raises grpc.aio.AioRpcError when the gateway
    ends a call with an error."""
    sampling = common_pb2.SamplingParams(max_tokens=max_tokens, stop_strings=list(stop))
    replayer: _Replayer
    if mode == "session":
        replayer = SessionReplayer(stub, sampling, metadata, predict_ahead)
    elif mode == "stateless":
        replayer = StatelessReplayer(stub, sampling, metadata)
    else:
        raise ValueError(f"mode is {mode!r}: one of {', '.join(MODES)}")
    region, num_accepts, position = trace.region, 0, 0
    await replayer.open(trace.document, trace.start)
    try:
        while position < len(region) and replayer.error is None:
            step = trace.steps[position]
            await asyncio.sleep(step.delay_ms / 1000.0 / speed)
            if step.typo:
                await replayer.edit(step.typo, "type")
                await asyncio.sleep(trace.steps[position].delay_ms / 1000.0 / speed)
                await replayer.edit("", "delete", 1)
                await asyncio.sleep(trace.steps[position].delay_ms / 1000.0 / speed)
            last = await replayer.edit(region[position], "type")
            position += 1
            if not step.look or position >= len(region):
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(last.done.wait(), trace.look_ms / 1000.0)
            suggestion = last.text if last.usage is not None else ""
            num_matching = len(
                os.path.commonprefix([suggestion, region[position : position + len(suggestion)]])
            )
            if suggestion and num_matching >= min(len(suggestion), trace.accept_min_chars):
                await asyncio.sleep(trace.accept_ms / 1000.0 / speed)
                await replayer.edit(suggestion, "accept")
                position += num_matching
                num_accepts += 1
                if num_matching < len(suggestion):  # the rest is wrong: deleted at once
                    await asyncio.sleep(step.delay_ms / 1000.0 / speed)
                    await replayer.edit("", "delete", len(suggestion) - num_matching)
        pending = [k for k in replayer.keystrokes if not k.done.is_set()]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(k.done.wait() for k in pending)), 30)
    finally:
        await replayer.close()
    if replayer.error is not None:
        raise replayer.error
    return replayer.keystrokes, num_accepts
