"""Catch log records that should not be there: ERROR or worse, or any record carrying a traceback."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


class _Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def recorded_logs(level: int = logging.INFO) -> Iterator[list[logging.LogRecord]]:
    """Every record at `level` or above, from every thread (the mesh's roles log from their own loop),
    while the block runs. asyncio's "Task was destroyed" and grpc's own errors come through here too."""
    recorder = _Recorder()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(recorder)
    root.setLevel(min(old_level, level) if old_level else level)
    try:
        yield recorder.records
    finally:
        root.removeHandler(recorder)
        root.setLevel(old_level)


def loud(records: list[logging.LogRecord]) -> list[str]:
    """The records that fail a quiet-logs check, as readable lines: ERROR or worse, or a traceback."""
    return [
        f"{r.levelname} {r.name}: {r.getMessage()}"
        + (" [with traceback]" if r.exc_info or r.exc_text else "")
        for r in records
        if r.levelno >= logging.ERROR or r.exc_info or r.exc_text or "Traceback" in r.getMessage()
    ]
