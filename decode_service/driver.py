"""Continuous batching: one task drives the engine, a forward pass at a time, for every live stream.

Every engine mutation (reserving, freeing, stepping) happens in this loop's task, between forward
passes, so request handlers never race the step that runs in a worker thread. Handlers talk to the
loop through `call` (run something between steps and get its result), `join` (start decoding a
sequence and receive its tokens) and `release_soon` (drop a sequence; never blocks, so it is safe in
a `finally` of a cancelled handler).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from kvmesh.engine.engine import Engine
from kvmesh.engine.kv_cache import OutOfBlocks
from kvmesh.engine.sequence import FinishReason, Sequence
from kvmesh.engine.speculative import DraftCursor, speculative_step

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class TokenEvent:
    """One sampled token, and why the sequence stopped if this token ended it."""

    token_id: int
    finish_reason: FinishReason | None


@dataclass
class Stream:
    """A sequence the loop is decoding, and where its tokens go."""

    seq: Sequence
    events: asyncio.Queue[TokenEvent | BaseException] = field(default_factory=asyncio.Queue)
    joined_at: float = field(default_factory=time.perf_counter)
    first_step_at: float | None = None
    """When the first forward pass that included this stream started."""
    first_token_at: float | None = None
    cursor: DraftCursor | None = None
    """The draft (an edit's original code) that speculative steps verify; None: plain decoding."""
    num_forward_passes: int = 0


class DecodeLoop:
    def __init__(self, engine: Engine, max_batch_size: int) -> None:
        self.engine = engine
        self.max_batch_size = max_batch_size
        self._ops: deque[tuple[Callable[[], Any], asyncio.Future[Any] | None]] = deque()
        self._streams: list[Stream] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # ---- what handlers call -------------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self._run(), name="decode-loop")
        return self._task

    @property
    def num_running(self) -> int:
        return len(self._streams)

    async def call(self, fn: Callable[[], T], undo: Callable[[T], None] | None = None) -> T:
        """Run fn in the loop between two forward passes; returns its result or raises its exception.

        If the caller is cancelled before fn ran, fn never runs; if after, `undo` gets fn's result (a
        cancelled handler must not leak the blocks that fn took for it).
        """
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._ops.append((fn, future))
        self._wakeup.set()
        try:
            return await future
        except asyncio.CancelledError:
            if undo is not None and future.done() and not future.cancelled() and future.exception() is None:
                undo(future.result())
            raise

    def join(self, seq: Sequence, cursor: DraftCursor | None = None) -> Stream:
        """Start decoding seq (its uncomputed tokens first). Its tokens arrive on the stream's queue.

        With a cursor, each decode step verifies the next tokens of its draft in the same forward pass.
        """
        stream = Stream(seq, cursor=cursor)
        self._ops.append((lambda: self._streams.append(stream), None))
        self._wakeup.set()
        return stream

    def release_soon(self, seq: Sequence, quarantine_s: float = 0.0) -> None:
        """Stop decoding seq and return its blocks to the pool, after `quarantine_s` seconds if given."""

        def release() -> None:
            self._streams = [s for s in self._streams if s.seq is not seq]
            if quarantine_s > 0:
                asyncio.get_running_loop().call_later(quarantine_s, self._free_later, seq)
            else:
                self.engine.free(seq)

        self._ops.append((release, None))
        self._wakeup.set()

    def _free_later(self, seq: Sequence) -> None:
        self._ops.append((lambda: self.engine.free(seq), None))
        self._wakeup.set()

    # ---- the loop -------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            self._run_ops()
            if not self._streams:
                self._wakeup.clear()
                if not self._ops:
                    await self._wakeup.wait()
                continue
            # NOTE: a prompt chunk runs alone: padded into one batch with single-token decodes it would
            # make every decode row as wide as the chunk.
            prefilling = [s for s in self._streams if s.seq.num_uncomputed_tokens > 1]
            batch = prefilling[:1] or self._streams[: self.max_batch_size]
            started = time.perf_counter()
            for stream in batch:
                if stream.first_step_at is None:
                    stream.first_step_at = started
            speculative = not prefilling and any(s.cursor is not None for s in batch)
            try:
                if speculative:
                    pairs = [(s.seq, s.cursor) for s in batch]
                    new_tokens = await asyncio.to_thread(speculative_step, self.engine, pairs)
                else:
                    logits = await asyncio.to_thread(self.engine.step, [s.seq for s in batch])
            except OutOfBlocks as error:
                self._evict_newest(error)
                continue
            except Exception as error:  # a bug in a step must not hang every stream
                logger.exception("decode step failed")
                for stream in batch:
                    self._fail(stream, error)
                continue
            if speculative:
                self._emit_appended(batch, new_tokens)
            else:
                self._emit(batch, logits)

    def _run_ops(self) -> None:
        while self._ops:
            fn, future = self._ops.popleft()
            if future is not None and future.done():  # its caller was cancelled: nobody wants it
                continue
            try:
                result = fn()
            except Exception as error:
                if future is None:
                    logger.exception("decode loop operation failed")
                elif not future.done():
                    future.set_exception(error)
                continue
            if future is not None and not future.done():
                future.set_result(result)

    def _emit(self, batch: list[Stream], logits: list[Any]) -> None:
        now = time.perf_counter()
        ready = []
        for stream in batch:
            stream.num_forward_passes += 1
            if stream.seq.num_uncomputed_tokens == 0:
                ready.append(stream)
        if not ready:
            return
        index = {id(s): i for i, s in enumerate(batch)}
        tokens = self.engine.sample([s.seq for s in ready], [logits[index[id(s)]] for s in ready])
        for stream, token in zip(ready, tokens, strict=True):
            if stream.first_token_at is None:
                stream.first_token_at = now
            reason = self.engine.append_token(stream.seq, token)
            if reason is None and stream.cursor is not None:
                # A plain step gives a cursor's stream only its first token, after its own prefill.
                stream.cursor.record([], token, stream.seq.token_ids)
            stream.events.put_nowait(TokenEvent(token, reason))
            if reason is not None:
                self._streams.remove(stream)

    def _emit_appended(self, batch: list[Stream], new_tokens: list[list[int]]) -> None:
        """Tokens a speculative step already appended (a verified draft chunk and the model's own)."""
        now = time.perf_counter()
        for stream, tokens in zip(batch, new_tokens, strict=True):
            stream.num_forward_passes += 1
            if stream.first_token_at is None:
                stream.first_token_at = now
            for i, token in enumerate(tokens):
                last = i == len(tokens) - 1
                stream.events.put_nowait(TokenEvent(token, stream.seq.finish_reason if last else None))
            if stream.seq.finished:
                self._streams.remove(stream)

    def _evict_newest(self, error: OutOfBlocks) -> None:
        """The pool cannot hold the next tokens of every stream: the newest stream gives way."""
        self._fail(self._streams[-1], error)

    def _fail(self, stream: Stream, error: BaseException) -> None:
        stream.events.put_nowait(error)
        if stream in self._streams:
            self._streams.remove(stream)
