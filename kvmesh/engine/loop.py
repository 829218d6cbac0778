"""The engine's async driver: one task runs schedule -> forward pass (in a worker thread) -> postprocess,
for every sequence a worker serves.

Every engine mutation (matching, reserving, freeing, scheduling) happens in this task, between forward
passes, so request handlers never race the pass that runs in the thread. Handlers talk to the loop
through `call` (run something between passes and get its result), `submit` (queue a sequence and
receive what each pass does for it) and `release_soon` (drop a sequence and free its blocks at the next
pass boundary; never blocks, so it is safe in a `finally` of a cancelled handler).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from kvmesh.engine.batch import Batch, SeqOutput
from kvmesh.engine.engine import Engine
from kvmesh.engine.kv_cache import OutOfBlocks, num_blocks_for_tokens
from kvmesh.engine.scheduler import Scheduler
from kvmesh.engine.sequence import Sequence

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Stream:
    """A submitted sequence and where the outcome of each pass that touched it goes."""

    seq: Sequence
    outputs: asyncio.Queue[SeqOutput | BaseException] = field(default_factory=asyncio.Queue)
    """A SeqOutput per pass that produced tokens (or finished a prefill-only prompt); an exception when
    the sequence failed (OutOfBlocks: it outgrew the pool)."""
    submitted_at: float = field(default_factory=time.perf_counter)
    first_step_at: float | None = None
    """When the first forward pass that included this sequence started."""
    first_token_at: float | None = None


class PassObserver(Protocol):
    """Told about each forward pass (layer-wise KV transfer watches the passes that finish prompts)."""

    def before_pass(self, batch: Batch) -> None:
        """In the loop's task, just before the pass starts in its thread."""

    def after_pass(self, batch: Batch, error: BaseException | None) -> None:
        """In the loop's task, once the pass ended (error: it failed)."""


class EngineLoop:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.scheduler = Scheduler(engine)
        self.pass_observers: list[PassObserver] = []
        self._ops: deque[tuple[Callable[[], Any], asyncio.Future[Any] | None]] = deque()
        self._streams: dict[int, Stream] = {}
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self._run(), name="engine-loop")
        return self._task

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    # ---- what handlers call -------------------------------------------------------------------

    async def call(self, fn: Callable[[], T], undo: Callable[[T], None] | None = None) -> T:
        """Run fn in the loop between two forward passes; returns its result or raises its exception.

        If the caller is cancelled before fn ran, fn never runs; if after, `undo` gets fn's result (a
        cancelled handler must not leak the blocks that fn took for it).
        """
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._push(fn, future)
        try:
            return await future
        except asyncio.CancelledError:
            if undo is not None and future.done() and not future.cancelled() and future.exception() is None:
                undo(future.result())
            raise

    async def submit(self, seq: Sequence) -> Stream:
        """Queue seq with the scheduler; what each pass does for it arrives on the stream's queue. Raises
        OutOfBlocks when seq could never fit the pool."""
        stream = Stream(seq)

        def add() -> None:
            self.scheduler.add(seq)
            self._streams[seq.seq_id] = stream

        await self.call(add)
        return stream

    def release_soon(self, seq: Sequence, quarantine_s: float = 0.0) -> None:
        """Stop scheduling seq and return its blocks to the pool at the next pass boundary (after
        `quarantine_s` seconds, if given: someone else may still be writing into them)."""

        def release() -> None:
            self._streams.pop(seq.seq_id, None)
            self.scheduler.remove(seq)
            if quarantine_s > 0:
                asyncio.get_running_loop().call_later(quarantine_s, self._push, lambda: self.engine.free(seq))
            else:
                self.engine.free(seq)

        self._push(release)

    def _push(self, fn: Callable[[], Any], future: asyncio.Future[Any] | None = None) -> None:
        self._ops.append((fn, future))
        self._wakeup.set()

    # ---- the loop -------------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            self._run_ops()
            batch = self.scheduler.schedule() if self.scheduler.has_work() else Batch()
            self._fail_outgrown(batch)
            if not batch.items:
                # Nothing runnable: wait for a request, or for blocks to come back.
                self._wakeup.clear()
                if not self._ops:
                    await self._wakeup.wait()
                continue
            started = time.perf_counter()
            for seq in batch.seqs:
                stream = self._streams.get(seq.seq_id)
                if stream is not None and stream.first_step_at is None:
                    stream.first_step_at = started
            for observer in self.pass_observers:
                observer.before_pass(batch)
            try:
                logits = await asyncio.to_thread(self.engine.run, batch)
                for observer in self.pass_observers:
                    observer.after_pass(batch, None)
                outputs = self.scheduler.postprocess(batch, logits)
            except Exception as error:  # a bug in a pass must not hang every stream
                logger.exception("forward pass failed")
                for observer in self.pass_observers:
                    observer.after_pass(batch, error)
                for seq in batch.seqs:
                    self.scheduler.abort(seq)
                    self._deliver(seq, error)
                continue
            now = time.perf_counter()
            for output in outputs:
                stream = self._streams.get(output.seq.seq_id)
                if stream is not None and stream.first_token_at is None and output.new_token_ids:
                    stream.first_token_at = now
                self._deliver(output.seq, output)

    def _fail_outgrown(self, batch: Batch) -> None:
        for seq in batch.failed:
            needed = num_blocks_for_tokens(len(seq) + 1, self.engine.block_size)
            self._deliver(seq, OutOfBlocks(needed, self.engine.pool.layout.num_blocks))

    def _deliver(self, seq: Sequence, outcome: SeqOutput | BaseException) -> None:
        stream = self._streams.get(seq.seq_id)
        if stream is None:
            return
        stream.outputs.put_nowait(outcome)
        if isinstance(outcome, BaseException) or outcome.finish_reason is not None or outcome.prefilled:
            del self._streams[seq.seq_id]

    def _run_ops(self) -> None:
        while self._ops:
            fn, future = self._ops.popleft()
            if future is not None and future.done():  # its caller was cancelled: nobody wants it
                continue
            try:
                result = fn()
            except Exception as error:
                if future is None:
                    logger.exception("engine loop operation failed")
                elif not future.done():
                    future.set_exception(error)
                continue
            if future is not None and not future.done():
                future.set_result(result)
