"""The prefill worker's running transfers by id, so that a decode worker can stop one and know when it has.

A decode worker whose request is cancelled while a prefill worker writes into its shared-memory pool
cannot reuse the reserved blocks until that writer has stopped: cancelling the gRPC call ends it on the
decode side at once, but the prefill handler only notices at its next await, and a copy in progress runs
to its end (`run_copy`). CancelPrefill answers once the handler has ended, so the blocks can go back to
the pool then rather than after a fixed quarantine.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from dataclasses import dataclass, field

import grpc

from kvmesh.mesh.errors import ServiceError, invalid

MAX_CANCELLED = 4096
"""Cancelled transfer ids remembered, so that a Prefill call overtaken by its cancel is refused."""


@dataclass
class Writer:
    """One running Prefill call; end() it when the handler can no longer write (in its `finally`)."""

    transfer_id: str
    task: asyncio.Task[object] | None
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    _transfers: Transfers | None = None

    def end(self) -> None:
        """Marks the call as ended; idempotent."""
        if self._transfers is not None:
            self._transfers._end(self)
        self.ended.set()


class Transfers:
    """Running Prefill calls by transfer id, and the ids cancelled lately."""

    def __init__(self, max_cancelled: int = MAX_CANCELLED) -> None:
        self._running: dict[str, Writer] = {}
        self._cancelled: OrderedDict[str, None] = OrderedDict()
        self._max_cancelled = max_cancelled

    def begin(self, transfer_id: str) -> Writer:
        """Registers the calling task as the writer of transfer_id (an empty id: not cancellable).

        Raises ServiceError(CANCELLED) when the transfer was cancelled before its call arrived, and
        INVALID_ARGUMENT when another call of the same transfer still runs.
        """
        if not transfer_id:
            return Writer(transfer_id, None)
        if transfer_id in self._cancelled:
            raise ServiceError(grpc.StatusCode.CANCELLED, f"transfer {transfer_id} was cancelled")
        if transfer_id in self._running:
            raise invalid(
                f"transfer_id {transfer_id} is in use by a running call: send a new id per transfer"
            )
        writer = Writer(transfer_id, asyncio.current_task(), _transfers=self)
        self._running[transfer_id] = writer
        return writer

    async def cancel(self, transfer_id: str) -> bool:
        """Stops transfer_id's call, if it runs, and returns once it has ended (whether it ran).

        From then on, no call of transfer_id writes: a later one is refused by begin().
        """
        self._cancelled[transfer_id] = None
        self._cancelled.move_to_end(transfer_id)
        while len(self._cancelled) > self._max_cancelled:
            self._cancelled.popitem(last=False)
        writer = self._running.get(transfer_id)
        if writer is None:
            return False
        if writer.task is not None:
            writer.task.cancel()
        await writer.ended.wait()
        return True

    @property
    def num_running(self) -> int:
        return len(self._running)

    def _end(self, writer: Writer) -> None:
        if self._running.get(writer.transfer_id) is writer:
            del self._running[writer.transfer_id]
