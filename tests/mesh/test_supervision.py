"""Background tasks of a role's server: a failing one is logged and restarted with backoff; one that
keeps failing, or dies unsupervised, turns health NOT_SERVING."""

from __future__ import annotations

import asyncio
import logging

import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvmesh.mesh.server import RunningServer, ServerConfig, start_server
from kvmesh.mesh.supervision import RestartPolicy, TaskEnded, supervised

FAST = RestartPolicy(max_failures=3, backoff_s=0.01, max_backoff_s=0.02)
SERVICE = "kvmesh.test.Nothing"


async def health_of(running: RunningServer) -> str:
    async with grpc.aio.insecure_channel(running.address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


async def wait_until(condition, timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise TimeoutError


def test_a_failing_task_is_logged_and_restarted_until_it_runs(caplog: pytest.LogCaptureFixture) -> None:
    runs: list[int] = []

    async def flaky() -> None:
        runs.append(len(runs))
        if len(runs) < 3:
            raise ValueError(f"boom {len(runs)}")
        await asyncio.Event().wait()  # the third run stays up

    async def scenario() -> None:
        running = await start_server([], [SERVICE], ServerConfig())
        await running.set_serving()
        try:
            running.supervise("flaky", flaky, RestartPolicy(max_failures=3, backoff_s=0.01))
            await wait_until(lambda: len(runs) == 3)
            await asyncio.sleep(0.05)
            assert await health_of(running) == "SERVING"
            assert running.failure is None
        finally:
            await running.stop(0)

    with caplog.at_level(logging.WARNING):
        asyncio.run(scenario())
    warnings = [r for r in caplog.records if "background task flaky failed" in r.getMessage()]
    assert [r.levelno for r in warnings] == [logging.WARNING] * 2
    assert "ValueError: boom 1" in warnings[0].getMessage() and warnings[0].exc_info is not None


def test_a_task_that_keeps_failing_turns_health_not_serving(caplog: pytest.LogCaptureFixture) -> None:
    async def broken() -> None:
        raise RuntimeError("no luck")

    async def scenario() -> None:
        running = await start_server([], [SERVICE], ServerConfig())
        await running.set_serving()
        try:
            running.supervise("broken", broken, FAST)
            await wait_until(lambda: running.failure is not None)
            await asyncio.sleep(0.05)
            assert await health_of(running) == "NOT_SERVING"
            await running.set_serving()  # a server whose task died stays NOT_SERVING
            assert await health_of(running) == "NOT_SERVING"
        finally:
            await running.stop(0)

    with caplog.at_level(logging.WARNING):
        asyncio.run(scenario())
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "background task broken failed: RuntimeError: no luck" in errors[0].getMessage()


@pytest.mark.parametrize("ending", ["raises", "returns"])
def test_an_unsupervised_background_task_that_ends_turns_health_not_serving(
    ending: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def decode_loop() -> None:
        await asyncio.sleep(0.02)
        if ending == "raises":
            raise KeyError("a bug")

    async def scenario() -> None:
        running = await start_server([], [SERVICE], ServerConfig())
        await running.set_serving()
        try:
            running.add_background_task(asyncio.create_task(decode_loop(), name="engine-loop"))
            await wait_until(lambda: running.failure is not None)
            await asyncio.sleep(0.05)
            assert await health_of(running) == "NOT_SERVING"
        finally:
            await running.stop(0)

    with caplog.at_level(logging.ERROR):
        asyncio.run(scenario())
    [error] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "background task engine-loop" in error.getMessage()
    assert ("KeyError" in error.getMessage()) == (ending == "raises")


def test_stopping_the_server_cancels_supervised_tasks_without_a_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        running = await start_server([], [SERVICE], ServerConfig())
        ready = asyncio.Event()

        async def forever() -> None:
            ready.set()
            await asyncio.Event().wait()

        running.supervise("forever", forever, FAST)
        await ready.wait()
        await running.stop(0)
        assert running.failure is None

    with caplog.at_level(logging.WARNING):
        asyncio.run(scenario())
    assert not [r for r in caplog.records if "background task" in r.getMessage()]


def test_supervised_gives_up_with_the_last_error_and_counts_returns_as_failures() -> None:
    calls = []

    async def returns() -> None:
        calls.append(1)

    with pytest.raises(TaskEnded, match="background task quiet returned"):
        asyncio.run(supervised("quiet", returns, FAST))
    assert len(calls) == FAST.max_failures
