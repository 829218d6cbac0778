"""CancelPrefill's bookkeeping: a cancel stops the running call and returns only once it has ended; a
call that arrives after its cancel is refused."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from kvmesh.mesh.errors import ServiceError
from prefill_service.transfers import Transfers


def test_cancel_stops_the_writer_and_returns_once_it_has_ended() -> None:
    async def scenario() -> None:
        transfers = Transfers()
        events: list[str] = []

        async def handler() -> None:
            writer = transfers.begin("t1")
            try:
                await asyncio.Event().wait()  # computing, say
            finally:
                await asyncio.sleep(0.05)  # a copy in progress runs to its end (run_copy)
                events.append("copy done")
                writer.end()

        task = asyncio.create_task(handler())
        await asyncio.sleep(0.01)
        assert transfers.num_running == 1
        assert await transfers.cancel("t1") is True
        events.append("cancel answered")
        assert events == ["copy done", "cancel answered"]
        assert task.cancelled() or task.done()
        assert transfers.num_running == 0

    asyncio.run(scenario())


def test_a_call_after_its_cancel_is_refused_and_unknown_ids_answer_at_once() -> None:
    async def scenario() -> None:
        transfers = Transfers(max_cancelled=2)
        assert await transfers.cancel("late") is False
        with pytest.raises(ServiceError) as refused:
            transfers.begin("late")
        assert refused.value.code == grpc.StatusCode.CANCELLED
        await transfers.cancel("a")
        await transfers.cancel("b")  # "late" falls out of the bounded memory
        transfers.begin("late").end()
        transfers.begin("").end()  # no id: not cancellable, not tracked
        assert transfers.num_running == 0

    asyncio.run(scenario())


def test_one_call_per_transfer_id() -> None:
    async def scenario() -> None:
        transfers = Transfers()
        writer = transfers.begin("t")
        with pytest.raises(ServiceError) as refused:
            transfers.begin("t")
        assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
        writer.end()
        writer.end()  # idempotent
        transfers.begin("t").end()

    asyncio.run(scenario())
