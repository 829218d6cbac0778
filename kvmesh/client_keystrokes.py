"""What a typing replay (kvmesh.client_replay) records per keystroke, and its summary.

Perceived latency of a keystroke: its request sent -> the first chunk of a suggestion for its version
with text (or its last chunk, for an empty suggestion) received. A keystroke whose suggestion is
superseded before that has none.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvmesh.v1 import common_pb2, gateway_pb2


@dataclass
class Keystroke:
    """One keystroke's request and what came back for it."""

    kind: str
    """"type", "delete" or "accept"."""
    sent_s: float
    visible_s: float | None = None
    """When the first chunk with text (or the last chunk) arrived; None if superseded before."""
    text: str = ""
    num_tokens: int = 0
    """Tokens received for it (stateless: what this call computed, as far as the client saw)."""
    usage: common_pb2.Usage | None = None
    cancelled: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def latency_ms(self) -> float | None:
        return None if self.visible_s is None else (self.visible_s - self.sent_s) * 1000.0

    def add(self, chunk: gateway_pb2.CompletionChunk) -> None:
        self.text += chunk.text
        self.num_tokens += len(chunk.token_ids)
        if self.visible_s is None and (chunk.text or chunk.HasField("usage")):
            self.visible_s = time.perf_counter()
        if chunk.HasField("usage"):
            self.usage = chunk.usage
            self.done.set()

    def end(self) -> None:
        self.done.set()


@dataclass(frozen=True)
class Summary:
    """What a replay's typist saw, from the client's side."""

    num_keystrokes: int
    num_accepts: int
    num_visible: int
    """Keystrokes whose suggestion became visible (the others were superseded first)."""
    latency_p50_ms: float
    latency_p90_ms: float
    after_accept_p50_ms: float
    """Perceived latency of the keystroke right after each accept (the accept itself)."""
    route_p50_ms: float
    """usage.stage_ms.route_ms of the suggestions that finished."""
    sources: dict[str, int]
    """Finished suggestions by usage.source ("" outside a session)."""
    num_tokens: int
    """Tokens received (stateless: computed; cancelled calls included)."""
    num_cancelled_tokens: int
    """Tokens received for keystrokes whose call was cancelled or superseded."""


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (nearest rank) of values; nan for none."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarize(keystrokes: Sequence[Keystroke], num_accepts: int) -> Summary:
    latencies = [k.latency_ms for k in keystrokes if k.latency_ms is not None]
    after_accept = [k.latency_ms for k in keystrokes if k.kind == "accept" and k.latency_ms is not None]
    finished = [k.usage for k in keystrokes if k.usage is not None]
    sources: dict[str, int] = {}
    for usage in finished:
        name = common_pb2.UsageSource.Name(usage.source).removeprefix("USAGE_SOURCE_")
        sources[name] = sources.get(name, 0) + 1
    return Summary(
        num_keystrokes=len(keystrokes),
        num_accepts=num_accepts,
        num_visible=len(latencies),
        latency_p50_ms=percentile(latencies, 0.5),
        latency_p90_ms=percentile(latencies, 0.9),
        after_accept_p50_ms=percentile(after_accept, 0.5),
        route_p50_ms=percentile([u.stage_ms.route_ms for u in finished], 0.5),
        sources=sources,
        num_tokens=sum(k.num_tokens for k in keystrokes),
        num_cancelled_tokens=sum(k.num_tokens for k in keystrokes if k.cancelled or k.usage is None),
    )
