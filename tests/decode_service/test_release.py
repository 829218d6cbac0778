"""The blocks of a cancelled shm transfer go back to the pool as soon as the prefill worker confirms that
its writer stopped, and after the quarantine at the latest when it cannot."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from decode_service.server import DecodeServicer


class FakeLoop:
    def __init__(self) -> None:
        self.released: list[tuple[object, float, float]] = []

    def release_soon(self, seq: object, quarantine_s: float = 0.0) -> None:
        self.released.append((seq, quarantine_s, asyncio.get_running_loop().time()))


class FakePrefill:
    def __init__(self, answer_after_s: float, stopped: bool) -> None:
        self.answer_after_s = answer_after_s
        self.stopped = stopped
        self.calls: list[tuple[str, str, float]] = []

    async def stop_writer(self, address: str, transfer_id: str, timeout_s: float) -> bool:
        self.calls.append((address, transfer_id, timeout_s))
        await asyncio.sleep(min(self.answer_after_s, timeout_s))
        return self.stopped and self.answer_after_s < timeout_s


@pytest.mark.parametrize(
    ("answer_after_s", "stopped", "expected_quarantine_s"),
    [
        (0.01, True, 0.0),  # confirmed: released at once
        (0.01, False, 0.49),  # refused fast (the prefill worker died): the rest of the quarantine
        (5.0, True, 0.0),  # no answer within the quarantine: released when it ends
    ],
)
def test_blocks_go_back_once_the_writer_is_confirmed_stopped_or_after_the_quarantine(
    answer_after_s: float, stopped: bool, expected_quarantine_s: float
) -> None:
    async def scenario() -> None:
        loop, prefill = FakeLoop(), FakePrefill(answer_after_s, stopped)
        config = SimpleNamespace(kv_quarantine_s=0.5)
        servicer = DecodeServicer(None, loop, prefill, config)  # type: ignore[arg-type]
        started = asyncio.get_running_loop().time()
        servicer._release_once_written("seq", "prefill:1", "t-1")
        await asyncio.sleep(0.7)
        assert prefill.calls == [("prefill:1", "t-1", 0.5)]
        [(seq, quarantine_s, at)] = loop.released
        assert seq == "seq"
        assert quarantine_s == pytest.approx(expected_quarantine_s, abs=0.05)
        released_after_s = at - started + quarantine_s
        assert released_after_s == pytest.approx(min(answer_after_s, 0.5) if stopped else 0.5, abs=0.08)
        assert servicer.num_quarantined == (0 if stopped and answer_after_s < 0.5 else 1)

    asyncio.run(scenario())
