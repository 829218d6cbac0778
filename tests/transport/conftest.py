"""Shared by the transport tests: no test may leave a shared-memory segment behind."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from kvmesh.transport.shm import SHM_DIR


def shm_segments() -> set[str]:
    """Names of kvmesh's shared-memory segments that exist now."""
    return {name for name in os.listdir(SHM_DIR) if name.startswith("kvmesh-")}


@pytest.fixture
def no_leaked_segments() -> Iterator[None]:
    before = shm_segments()
    yield
    assert shm_segments() == before, "a test left shared memory segments behind"
