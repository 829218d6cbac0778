"""Sampling parameters and the sampler: greedy, temperature, top-k, top-p, a seed per request."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens and when it stops."""

    max_new_tokens: int = 64
    """Most tokens to generate."""
    temperature: float = 0.0
    """0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1 = off)."""
    top_k: int = 0
    """Keep the k most likely tokens (0 = off)."""
    seed: int | None = None
    """Seed of this request's own generator, so a sampled answer can be reproduced."""
    stop_token_ids: tuple[int, ...] = ()
    """Stop after generating any of these (the token is part of the output ids)."""
    stop_strings: tuple[str, ...] = ()
    """Stop once the output text contains any of these."""
    ignore_eos: bool = False
    """Keep generating past the model's end-of-sequence tokens."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p:g}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @classmethod
    def from_options(cls, max_new_tokens: int, **options: object) -> SamplingParams:
        """`generate`-style keyword options; lists given for the tuple fields become tuples."""
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
        return cls(max_new_tokens=max_new_tokens, **fields)  # type: ignore[arg-type]

    @functools.cached_property
    def max_stop_string_bytes(self) -> int:
        """UTF-8 length of the longest stop string (0 without any): how far back the stop check looks."""
        return max((len(s.encode()) for s in self.stop_strings), default=0)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def make_generator(self, device: torch.device | str = "cpu") -> torch.Generator | None:
        if self.greedy:
            return None
        generator = torch.Generator(device=device)
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed)
        return generator


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[V] float32 logits -> temperature-scaled logits with tokens outside top-k / top-p set to -inf."""
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, -1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p; the first token always stays.
        drop_sorted = (cumulative - torch.softmax(sorted_logits, -1)) >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick one token from [V] float32 logits."""
    if params.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(filter_logits(logits, params), -1)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample_batch(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """[B, V] float32 logits -> one token per row; greedy rows share one argmax."""
    greedy = torch.argmax(logits, -1).tolist()
    return [
        greedy[row] if p.greedy else sample_token(logits[row], p, generators[row])
        for row, p in enumerate(params)
    ]
