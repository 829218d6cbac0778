"""Supervised background tasks: a worker's registration or KV event stream that fails is logged and
restarted with backoff, and one that keeps failing gives up loudly instead of ending in silence.

A background task that ends without a word is the worst failure a worker can have: it drops out of the
mesh (no heartbeat) while its health still says SERVING, so nothing restarts it. `supervised` turns
that into a WARNING per restart and, past `max_failures` in a row, an exception that the caller
(RunningServer) turns into NOT_SERVING.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)


class TaskEnded(RuntimeError):
    """A task meant to run until cancelled returned."""


@dataclass(frozen=True)
class RestartPolicy:
    """How a supervised task is restarted."""

    max_failures: int = 5
    """Failures in a row after which the task is given up (its supervisor raises the last error)."""
    backoff_s: float = 0.1
    """Pause before the first restart, in seconds; doubled after each failure in a row."""
    max_backoff_s: float = 5.0
    """Longest pause between restarts, in seconds."""
    healthy_after_s: float = 30.0
    """A run that lasted this long, in seconds, resets the count of failures in a row."""

    def __post_init__(self) -> None:
        if self.max_failures < 1:
            raise ValueError(f"max_failures must be >= 1, got {self.max_failures}")
        if not 0 <= self.backoff_s <= self.max_backoff_s:
            raise ValueError(
                f"need 0 <= backoff_s ({self.backoff_s}) <= max_backoff_s ({self.max_backoff_s})"
            )


DEFAULT_RESTART_POLICY = RestartPolicy()


async def supervised(name: str, run: Callable[[], Awaitable[None]], policy: RestartPolicy) -> None:
    """Runs `run()` until cancelled, restarting it after each failure (an exception, or a return: it is
    meant to run forever), with exponential backoff and jitter.

    Raises the last failure (TaskEnded for a return) once `policy.max_failures` runs in a row have
    failed. Cancelling the supervisor cancels the run in progress.
    """
    loop = asyncio.get_running_loop()
    num_failures = 0
    while True:
        started = loop.time()
        try:
            await run()
            error: BaseException = TaskEnded(f"background task {name} returned")
        except asyncio.CancelledError:
            raise
        except Exception as failure:
            error = failure
        if loop.time() - started >= policy.healthy_after_s:
            num_failures = 0
        num_failures += 1
        if num_failures >= policy.max_failures:
            raise error
        pause_s = min(policy.max_backoff_s, policy.backoff_s * 2 ** (num_failures - 1))
        pause_s *= 1.0 + 0.2 * random.random()  # several workers failing alike do not retry in step
        logger.warning(
            "background task %s failed (%d of %d in a row): %s: %s; restarting in %.2f s",
            name,
            num_failures,
            policy.max_failures,
            type(error).__name__,
            error,
            pause_s,
            exc_info=error,
        )
        await asyncio.sleep(pause_s)
