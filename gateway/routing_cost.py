"""Where a prompt goes: the cache- and load-aware cost model, as one pure function.

    plan_route(pool snapshot, prefix hits, prompt length, config) -> RoutePlan

Inputs are a frozen snapshot of the live workers with their loads and the block size they advertise
(WorkerPool.snapshot()) and, per worker, how many leading blocks of this prompt it already holds (the
cache store's Lookup). The rules:

1. Decode worker. Among the decode workers not excluded, the ones whose load exceeds the least loaded
   one's by more than max_load_imbalance are overloaded and left out, so a hot prefix spreads instead
   of piling onto one worker. Of the rest, the one holding the longest prefix of the prompt wins; ties
   go to the lower total cost (below), then to the lower load, the most free blocks, the lowest id.
2. Prefill. The decode worker's need is the prompt tokens it does not hold. A short need (below
   disagg_min_tokens, whatever fraction of the prompt it is) is prefilled by the decode worker itself,
   in chunks that share forward passes with its running streams: conditional disaggregation. Otherwise the prefill worker minimizing (blocks it must compute,
   i.e. prompt blocks it does not hold itself) * (1 + its load) computes it and ships the KV.
3. Cost of a pair: decode_load_weight * decode load + prefill cost, the prefill cost being blocks to
   compute * (1 + load) of whichever worker computes them.

A prefill worker is only paired with a decode worker of the same model (model_fingerprint): KV of other
weights would be garbage. Loads count running + waiting requests plus the gateway's own in flight.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace

from kvmesh.mesh.workers import WorkerInfo

TRANSPORT_CHOICES = ("auto", "shm", "grpc")


_SAME_HOST_TRANSPORTS = ("cuda_ipc", "shm")
"""Transports that write into the destination's memory, so only between workers of one host, best first."""


def choose_transport(prefill_worker: WorkerInfo, decode_worker: WorkerInfo) -> str:
    """KV transport for a pair of workers, the first that both offer of: on one host, "cuda_ipc" (GPU
    pools, device to device) then "shm" (CPU pools); on any hosts, "nccl" (its gloo twin for CPU pools);
    else "grpc", which every worker offers."""
    both = set(prefill_worker.transports) & set(decode_worker.transports)
    same_host = bool(prefill_worker.host_id) and prefill_worker.host_id == decode_worker.host_id
    for transport in _SAME_HOST_TRANSPORTS:
        if same_host and transport in both:
            return transport
    return "nccl" if "nccl" in both else "grpc"


@dataclass(frozen=True)
class Route:
    """Where one attempt at a request goes."""

    decode_worker: WorkerInfo
    prefill_worker: WorkerInfo | None = None
    """None: the decode worker prefills the prompt itself."""
    transport: str = ""
    """KV transport from the prefill worker to the decode worker; "" without a prefill worker."""


@dataclass(frozen=True)
class RoutingConfig:
    """The cost model's knobs."""

    disagg_min_tokens: int = 256
    """An uncached part shorter than this many tokens is prefilled by the decode worker itself."""
    decode_load_weight: float = 1.0
    """Cost of one request of decode load, in blocks of prefill."""
    max_load_imbalance: int = 4
    """A decode worker more than this many requests busier than the least loaded one is not chosen,
    however long a prefix it holds."""
    use_prefill_min_tokens: int = 0
    """Prompts shorter than this many tokens never use a prefill worker."""
    transport: str = "auto"
    """"auto" (choose_transport: cuda_ipc or shm on one host, else nccl, else grpc), "shm" (only
    same-host prefill workers, over shm) or "grpc"."""

    def __post_init__(self) -> None:
        if self.disagg_min_tokens < 0:
            raise ValueError(f"disagg_min_tokens must be >= 0, got {self.disagg_min_tokens}")
        if self.decode_load_weight < 0:
            raise ValueError(f"decode_load_weight must be >= 0, got {self.decode_load_weight}")
        if self.max_load_imbalance < 0:
            raise ValueError(f"max_load_imbalance must be >= 0, got {self.max_load_imbalance}")
        if self.use_prefill_min_tokens < 0:
            raise ValueError(f"use_prefill_min_tokens must be >= 0, got {self.use_prefill_min_tokens}")
        if self.transport not in TRANSPORT_CHOICES:
            raise ValueError(
                f"transport must be one of {', '.join(TRANSPORT_CHOICES)}, got {self.transport!r}"
            )


@dataclass(frozen=True)
class Candidate:
    """A live worker and its load when the snapshot was taken."""

    worker: WorkerInfo
    load: int
    """Reported running + waiting requests plus the gateway's requests in flight to it."""

    @property
    def worker_id(self) -> str:
        return self.worker.worker_id


@dataclass(frozen=True)
class PoolSnapshot:
    """The live workers by role, each ordered by worker_id, and the block size they all advertise."""

    decode: tuple[Candidate, ...] = ()
    prefill: tuple[Candidate, ...] = ()
    block_size: int = 0
    """Tokens per KV block of every worker here (the cache store admits no other); 0 without workers."""

    def __post_init__(self) -> None:
        sizes = {c.worker.block_size for c in (*self.decode, *self.prefill)}
        if sizes - {self.block_size}:
            raise ValueError(f"workers advertise block sizes {sorted(sizes)}, the snapshot {self.block_size}")


@dataclass(frozen=True)
class RoutePlan:
    """A route and the inputs that chose it (the route span's attributes)."""

    route: Route
    num_prompt_tokens: int
    num_prompt_blocks: int
    """Full blocks of the prompt (the ones that have hashes)."""
    decode_cached_blocks: int
    """Leading prompt blocks the decode worker already holds."""
    decode_load: int
    decode_cost: float
    """decode_load_weight * decode_load."""
    prefill_cached_blocks: int
    """Leading prompt blocks the prefill worker holds; 0 without a prefill worker."""
    prefill_load: int
    """The load of whichever worker prefills (the decode worker itself when not disaggregated)."""
    prefill_cost: float
    """Blocks to compute * (1 + prefill_load)."""
    prefill_reason: str
    """Why this prefill choice: "disaggregated", "short-uncached", "short-prompt" or "no-prefill-worker"."""
    num_overloaded: int
    """Decode workers left out as overloaded."""

    @property
    def disaggregated(self) -> bool:
        return self.route.prefill_worker is not None

    @property
    def total_cost(self) -> float:
        return self.decode_cost + self.prefill_cost

    def attributes(self) -> dict[str, str | int | float | bool]:
        """Span attributes: worker ids, sizes and costs, never request text."""
        route = self.route
        return {
            "kvmesh.prompt_tokens": self.num_prompt_tokens,
            "kvmesh.prompt_blocks": self.num_prompt_blocks,
            "kvmesh.decode_worker": route.decode_worker.worker_id,
            "kvmesh.prefill_worker": route.prefill_worker.worker_id if route.prefill_worker else "",
            "kvmesh.transport": route.transport,
            "kvmesh.disaggregated": self.disaggregated,
            "kvmesh.prefill_reason": self.prefill_reason,
            "kvmesh.decode_cached_blocks": self.decode_cached_blocks,
            "kvmesh.prefill_cached_blocks": self.prefill_cached_blocks,
            "kvmesh.decode_load": self.decode_load,
            "kvmesh.prefill_load": self.prefill_load,
            "kvmesh.decode_cost": self.decode_cost,
            "kvmesh.prefill_cost": self.prefill_cost,
            "kvmesh.num_overloaded": self.num_overloaded,
        }


def _blocks_to_compute(num_prompt_tokens: int, num_cached_blocks: int, block_size: int) -> int:
    # At least one block: a worker always computes the prompt's last token, for its logits.
    num_tokens = max(1, num_prompt_tokens - num_cached_blocks * block_size)
    return -(-num_tokens // block_size)


@dataclass(frozen=True)
class _Prompt:
    """What plan_route knows of the prompt: its length and who holds how much of it."""

    num_tokens: int
    block_size: int
    """Tokens per KV block, the workers'."""
    num_blocks: int
    cached_blocks: Mapping[str, int]

    def cached(self, candidate: Candidate) -> int:
        """Leading blocks the candidate holds, within the prompt's full blocks."""
        return min(max(self.cached_blocks.get(candidate.worker_id, 0), 0), self.num_blocks)


def plan_route(
    snapshot: PoolSnapshot,
    cached_blocks: Mapping[str, int],
    num_prompt_tokens: int,
    config: RoutingConfig,
    exclude: AbstractSet[str] = frozenset(),
) -> RoutePlan | None:
    """The cheapest route by the rules in the module docstring; None when there is no decode worker.

    cached_blocks: worker_id -> leading blocks of this prompt that the worker holds (workers with no
    hit may be left out). exclude: worker_ids that failed this request already; when every decode
    worker failed, they are all candidates again rather than giving up. Pure: same inputs, same plan.
    """
    decode = [c for c in snapshot.decode if c.worker_id not in exclude] or list(snapshot.decode)
    if not decode:
        return None
    prompt = _Prompt(
        num_prompt_tokens, snapshot.block_size, num_prompt_tokens // snapshot.block_size, cached_blocks
    )
    min_load = min(c.load for c in decode)
    eligible = [c for c in decode if c.load - min_load <= config.max_load_imbalance]
    num_overloaded = len(decode) - len(eligible)
    plans = [_plan_for(d, prompt, snapshot.prefill, config, exclude, num_overloaded) for d in eligible]
    return min(
        plans,
        key=lambda p: (
            -p.decode_cached_blocks,
            p.total_cost,
            p.decode_load,
            -p.route.decode_worker.load.num_blocks_free,
            p.route.decode_worker.worker_id,
        ),
    )


def _plan_for(
    decode: Candidate,
    prompt: _Prompt,
    prefill_workers: Sequence[Candidate],
    config: RoutingConfig,
    exclude: AbstractSet[str],
    num_overloaded: int,
) -> RoutePlan:
    """The best plan with this decode worker."""
    block_size = prompt.block_size
    decode_cached = prompt.cached(decode)
    plan = RoutePlan(
        route=Route(decode.worker),
        num_prompt_tokens=prompt.num_tokens,
        num_prompt_blocks=prompt.num_blocks,
        decode_cached_blocks=decode_cached,
        decode_load=decode.load,
        decode_cost=config.decode_load_weight * decode.load,
        prefill_cached_blocks=0,
        prefill_load=decode.load,
        prefill_cost=float(
            _blocks_to_compute(prompt.num_tokens, decode_cached, block_size) * (1 + decode.load)
        ),
        prefill_reason="",
        num_overloaded=num_overloaded,
    )
    need_tokens = prompt.num_tokens - decode_cached * block_size
    if prompt.num_tokens < config.use_prefill_min_tokens:
        return replace(plan, prefill_reason="short-prompt")
    if need_tokens < config.disagg_min_tokens:
        return replace(plan, prefill_reason="short-uncached")
    candidates = [
        c
        for c in prefill_workers
        if c.worker_id not in exclude
        and c.worker.model_fingerprint == decode.worker.model_fingerprint
        and (config.transport != "shm" or choose_transport(c.worker, decode.worker) == "shm")
    ]
    if not candidates:
        return replace(plan, prefill_reason="no-prefill-worker")

    def prefill_cost(c: Candidate) -> int:
        return _blocks_to_compute(prompt.num_tokens, prompt.cached(c), block_size) * (1 + c.load)

    chosen = min(
        candidates, key=lambda c: (prefill_cost(c), c.load, -c.worker.load.num_blocks_free, c.worker_id)
    )
    transport = "grpc" if config.transport == "grpc" else choose_transport(chosen.worker, decode.worker)
    return replace(
        plan,
        route=Route(decode.worker, chosen.worker, transport),
        prefill_cached_blocks=prompt.cached(chosen),
        prefill_load=chosen.load,
        prefill_cost=float(prefill_cost(chosen)),
        prefill_reason="disaggregated",
    )
