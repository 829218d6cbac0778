"""Settings every worker role (prefill, decode) shares: the model it loads and how it joins the mesh."""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvmesh.engine.engine import DEFAULT_KV_CACHE_BYTES, Engine
from kvmesh.engine.kv_cache import KVLayout


def default_host_id() -> str:
    """Identifies the machine: two workers with the same host id can share memory."""
    boot_id = Path("/proc/sys/kernel/random/boot_id")
    suffix = boot_id.read_text().strip() if boot_id.is_file() else ""
    return f"{socket.gethostname()}/{suffix}"


@dataclass(frozen=True)
class ModelSettings:
    """The checkpoint a worker serves and how its engine pages KV."""

    path: str
    """Hugging Face-format checkpoint directory."""
    dtype: str = "float32"
    """Weights and KV dtype: float32, bfloat16 or float16."""
    device: str = "cpu"
    """torch device ("cpu", "cuda", "cuda:1")."""
    block_size: int = 16
    """Tokens per KV block."""
    kv_cache_bytes: int = DEFAULT_KV_CACHE_BYTES
    """KV pool size in bytes (ignored when num_blocks is set)."""
    num_blocks: int | None = None
    """KV pool size in blocks."""
    prefill_chunk_size: int = 512
    """Most prompt tokens one sequence computes per forward pass."""
    enable_prefix_caching: bool = True
    """Keep computed blocks findable by hash and reuse them for prompts that start the same way."""
    num_threads: int = 1
    """torch intra-op threads; one each keeps four roles on two cores from fighting."""


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
    return Engine.from_pretrained(
        model.path,
        model.dtype,
        model.device,
        block_size=model.block_size,
        num_blocks=model.num_blocks,
        kv_cache_bytes=model.kv_cache_bytes,
        prefill_chunk_size=model.prefill_chunk_size,
        enable_prefix_caching=model.enable_prefix_caching,
        make_pool_storage=make_pool_storage,
    )
