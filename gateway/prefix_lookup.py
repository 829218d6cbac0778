"""Which worker holds how much of a prompt: block hashes, then the cache store's Lookup.

The prompt's full blocks (of the block size the workers advertise) are hashed with kvmesh.engine.block_hash
(the one function every role uses), in the namespace of the model fingerprint and the tenant's salt, so a
worker's hits are its own model's KV of this tenant's prompts. Workers of different fingerprints (a
rollout in progress) get one Lookup each.

The cache store is soft state and an optimization: when it fails or is slow, the answer is "no hits"
and the request routes by load alone. After a lookup ran into its deadline, lookups are skipped for
backoff_s, so a hung cache store costs one deadline per backoff_s, not one per request; a store that is
down fails fast and is simply asked again next time (it may be back: a restart takes a moment).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import grpc
import grpc.aio

from kvmesh.engine.block_hash import hash_blocks, namespace_hash
from kvmesh.v1 import cache_store_pb2, cache_store_pb2_grpc

logger = logging.getLogger(__name__)

BlockHashes = Callable[[str, int], Sequence[bytes]]
"""(model fingerprint, block size) -> the prompt's block hashes in that namespace (the salt's included)."""


@dataclass(frozen=True)
class LookupResult:
    """Leading blocks of one prompt held per worker, and how the answer was obtained."""

    cached_blocks: dict[str, int] = field(default_factory=dict)
    """worker_id -> leading blocks held; workers with no hit are absent."""
    num_prompt_blocks: int = 0
    status: str = "ok"
    """"ok"; "failed" (the cache store did not answer, or not in time); "skipped" (backing off after a
    lookup that ran into its deadline, or nothing to look up)."""
    lookup_ms: float = 0.0


class PrefixLookup:
    """Asks the cache store which workers hold a prompt's leading blocks."""

    def __init__(
        self,
        channel: Callable[[], grpc.aio.Channel],
        timeout_s: float,
        backoff_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """channel: returns the (shared) channel to the cache store. timeout_s: each Lookup's deadline."""
        self._channel = channel
        self._timeout_s = timeout_s
        self._backoff_s = backoff_s
        self._clock = clock
        self._skip_until = 0.0

    async def find(
        self,
        token_ids: Sequence[int],
        cache_salt: str,
        workers: Iterable[tuple[str, str]],
        block_size: int,
        block_hashes: BlockHashes | None = None,
    ) -> LookupResult:
        """Leading blocks held per worker. workers: (worker_id, model_fingerprint) of the candidates;
        block_size: the tokens per KV block they advertise, which the prompt is hashed in. block_hashes:
        the prompt's hashes already known (an editor session keeps them); None: hashed here.

        Never raises for a cache store problem: it answers no hits, with status "failed".
        """
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        num_prompt_blocks = len(token_ids) // block_size
        by_fingerprint: dict[str, set[str]] = {}
        for worker_id, fingerprint in workers:
            by_fingerprint.setdefault(fingerprint, set()).add(worker_id)
        if num_prompt_blocks == 0 or not by_fingerprint:
            return LookupResult(num_prompt_blocks=num_prompt_blocks, status="skipped")
        if self._clock() < self._skip_until:
            return LookupResult(num_prompt_blocks=num_prompt_blocks, status="skipped")
        started = time.perf_counter()
        stub = cache_store_pb2_grpc.CacheStoreStub(self._channel())
        fingerprints = sorted(by_fingerprint)
        try:
            replies = await asyncio.gather(
                *(
                    stub.Lookup(
                        cache_store_pb2.LookupRequest(
                            block_hashes=hash_blocks(
                                namespace_hash(fingerprint, cache_salt), token_ids, block_size
                            )
                            if block_hashes is None
                            else block_hashes(fingerprint, block_size)
                        ),
                        timeout=self._timeout_s,
                    )
                    for fingerprint in fingerprints
                )
            )
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                self._skip_until = self._clock() + self._backoff_s
                logger.warning(
                    "cache store lookup took over %.0f ms; routing by load alone for %.1f s",
                    self._timeout_s * 1000.0,
                    self._backoff_s,
                )
            else:
                logger.debug("cache store lookup failed (%s); routing by load alone", error.code().name)
            return LookupResult(
                num_prompt_blocks=num_prompt_blocks,
                status="failed",
                lookup_ms=(time.perf_counter() - started) * 1000.0,
            )
        cached_blocks: dict[str, int] = {}
        for fingerprint, reply in zip(fingerprints, replies, strict=True):
            for match in reply.matches:
                # A worker's hit counts only under its own model's namespace.
                if match.worker_id in by_fingerprint[fingerprint] and match.num_blocks > 0:
                    cached_blocks[match.worker_id] = min(match.num_blocks, num_prompt_blocks)
        return LookupResult(
            cached_blocks=cached_blocks,
            num_prompt_blocks=num_prompt_blocks,
            status="ok",
            lookup_ms=(time.perf_counter() - started) * 1000.0,
        )
