"""What every part of `python -m bench.gpu` shares: the run's settings, a synchronized timer, checks.

The parts live in bench/gpu_ipc.py, bench/gpu_engine.py and bench/gpu_mesh.py; bench/gpu.py runs them.
A part is a function of the Settings (and, when it can stop early, a deadline on time.monotonic())
returning a dict of figures; `check` adds a pass/fail entry under "checks" that the runner reports.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

CONTEXT_TOKENS = 4096
"""The long context of the GPU run: a 4k-token prompt, a 4k-token context per decode stream."""


@dataclass(frozen=True)
class Settings:
    device: str
    """"cuda" (the real run) or "cpu" (a smoke run)."""
    quick: bool
    """Small shapes and few repeats."""

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


def timed(settings: Settings, fn: Callable[[], object], reps: int, warmup: int = 1) -> float:
    """Median seconds of fn over reps runs, device synchronized around each."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        settings.sync()
        started = time.perf_counter()
        fn()
        settings.sync()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def check(figures: dict[str, Any], name: str, passed: bool, detail: str = "") -> None:
    """Record a pass/fail check; a failed one turns the part's status into FAILED."""
    figures.setdefault("checks", []).append({"name": name, "passed": bool(passed), "detail": detail})
