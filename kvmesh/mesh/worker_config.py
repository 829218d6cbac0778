"""Settings every worker role (prefill, decode) shares: the model it loads and how it joins the mesh."""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvmesh.engine.config import EngineConfig
from kvmesh.engine.engine import Engine
from kvmesh.engine.kv_cache import KVLayout


def default_host_id() -> str:
    """Identifies the machine: two workers with the same host id can share memory."""
    boot_id = Path("/proc/sys/kernel/random/boot_id")
    suffix = boot_id.read_text().strip() if boot_id.is_file() else ""
    return f"{socket.gethostname()}/{suffix}"


@dataclass(frozen=True)
class ModelSettings:
    """The checkpoint a worker serves, where it runs, and how its engine pages and batches KV."""

    path: str
    """Hugging Face-format checkpoint directory."""
    dtype: str = "float32"
    """Weights and KV dtype: float32, bfloat16 or float16."""
    device: str = "cpu"
    """torch device ("cpu", "cuda", "cuda:1")."""
    num_threads: int = 1
    """torch intra-op threads; one each keeps four roles on two cores from fighting."""
    engine: EngineConfig = EngineConfig()
    """The KV pool and the scheduler's limits."""


@dataclass(frozen=True)
class RegistrationSettings:
    """How a worker announces itself to the cache store."""

    cache_store_address: str
    """host:port of the cache store."""
    advertise_host: str = "127.0.0.1"
    """Host that other roles dial to reach this worker (a pod IP on Kubernetes)."""
    worker_id: str = ""
    """Unique id; empty: derived from the advertised address."""
    host_id: str = field(default_factory=default_host_id)
    """Machine identity for choosing the shared-memory transport."""
    transports: tuple[str, ...] = ("shm", "grpc")
    """KV transports this worker offers, best first."""


def load_engine(
    model: ModelSettings, make_pool_storage: Callable[[KVLayout], torch.Tensor] | None = None
) -> Engine:
    """The engine a worker serves, sized by its settings (and torch's threads set for it)."""
    torch.set_num_threads(model.num_threads)
    return Engine.from_pretrained(model.path, model.dtype, model.device, model.engine, make_pool_storage)
