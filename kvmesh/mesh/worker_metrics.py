"""A worker's Prometheus metrics, read from the engine when scraped (nothing is counted on the hot path).

Names follow vLLM's where its dashboards already plot the same thing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import REGISTRY, Collector

from kvmesh.engine.block_manager import BlockAllocator
from kvmesh.mesh.workers import WorkerLoad


class WorkerCollector(Collector):
    def __init__(self, role: str, allocator: BlockAllocator, load: Callable[[], WorkerLoad]) -> None:
        self._role = role
        self._allocator = allocator
        self._load = load

    def collect(self) -> Iterator[Metric]:
        labels = ["role"]
        allocator, load = self._allocator, self._load()

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=labels)
            family.add_metric([self._role], value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=labels)
            family.add_metric([self._role], value)
            return family

        yield counter(
            "vllm:prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache",
            allocator.num_queried_tokens,
        )
        yield counter(
            "vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache", allocator.num_hit_tokens
        )
        yield gauge(
            "vllm:kv_cache_usage_perc",
            "Share of KV blocks in use (0 to 1)",
            allocator.num_used / allocator.num_blocks,
        )
        yield gauge("vllm:num_requests_running", "Requests in the engine", load.num_running)
        yield gauge(
            "vllm:num_requests_waiting", "Requests admitted, waiting for KV or a turn", load.num_waiting
        )
        yield gauge("kvmesh_kv_blocks_total", "KV blocks in the pool", allocator.num_blocks)
        yield gauge("kvmesh_kv_blocks_used", "KV blocks owned by requests", allocator.num_used)
        yield gauge(
            "kvmesh_kv_blocks_cached", "KV blocks findable by hash (in use or not)", allocator.num_cached
        )


def register_worker_metrics(
    role: str, allocator: BlockAllocator, load: Callable[[], WorkerLoad]
) -> WorkerCollector:
    """Adds the worker's metrics to the default registry (what `start_metrics_server` serves)."""
    collector = WorkerCollector(role, allocator, load)
    REGISTRY.register(collector)
    return collector
