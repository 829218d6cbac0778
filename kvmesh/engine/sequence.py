"""A request's state in the engine: its tokens, how many of them have KV in the pool, its blocks.

"Prefill" is nothing special: it is `num_computed_tokens` catching up with `len(token_ids)`.
"""

from __future__ import annotations

import itertools
from enum import StrEnum
from typing import TYPE_CHECKING

import torch

from kvmesh.engine.sampling import SamplingParams
from kvmesh.engine.tokenizer import Tokenizer

if TYPE_CHECKING:
    from kvmesh.engine.speculative import DraftCursor

_ids = itertools.count()


class FinishReason(StrEnum):
    STOP = "stop"
    """A stop token, an end-of-sequence token or a stop string."""
    LENGTH = "length"
    """max_new_tokens, or the model's context is full."""


class Sequence:
    def __init__(
        self, prompt_token_ids: list[int], params: SamplingParams, device: torch.device | str = "cpu"
    ):
        if not prompt_token_ids:
            raise ValueError("a sequence needs at least one prompt token")
        self.seq_id = next(_ids)
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        """Tokens whose K and V are in the pool; always <= len(token_ids)."""
        self.block_table: list[int] = []
        self.num_cached_tokens = 0
        """Prompt tokens whose KV came from the prefix cache."""
        self.namespace = b""
        """h(-1) of this sequence's block-hash chain (model, tenant salt)."""
        self.block_hashes: list[bytes] = []
        """Hashes of the leading full, computed blocks, in order."""
        self.params = params
        self.generator = params.make_generator(device)
        self.finish_reason: FinishReason | None = None
        self.cursor: DraftCursor | None = None
        """The draft that decode steps verify (an edit's original, prompt lookup); None: plain decoding."""
        self.prefill_only = False
        """Compute the prompt's KV and stop there, sampling nothing (a prefill worker's request)."""
        self.use_prefix_cache = True
        """Start from the longest cached prefix of the tokens (at admission, and again after preemption)."""
        self.num_forward_passes = 0
        """Forward passes this sequence took part in, prefill chunks included."""
        self.num_preemptions = 0
        self.priority = 0
        """0: a real request; higher: less urgent (a prediction), admitted later and preempted first."""

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class StopChecker:
    """Decides after each new token whether a sequence is done."""

    def __init__(self, tokenizer: Tokenizer, eos_token_ids: tuple[int, ...], max_context_tokens: int) -> None:
        self._tokenizer = tokenizer
        self._eos = frozenset(eos_token_ids)
        self._max_context = max_context_tokens

    def check(self, seq: Sequence) -> FinishReason | None:
        """Inspect the last appended token; sets and returns seq.finish_reason when the sequence must stop."""
        token = seq.token_ids[-1]
        params = seq.params
        reason: FinishReason | None = None
        if (
            token in params.stop_token_ids
            or (not params.ignore_eos and token in self._eos)
            or params.stop_strings
            and self._hits_stop_string(seq)
        ):
            reason = FinishReason.STOP
        elif seq.num_output_tokens >= params.max_new_tokens or len(seq) >= self._max_context:
            reason = FinishReason.LENGTH
        seq.finish_reason = reason
        return reason

    def _hits_stop_string(self, seq: Sequence) -> bool:
        # Only the tail can hold a stop string that the newest token completed; a token is at least
        # one byte, so this many tokens cover the longest stop string.
        # NOTE: O(longest stop string) per token, never O(output): the slice is taken straight from
        # token_ids (output_token_ids would copy the whole output first).
        start = max(seq.num_prompt_tokens, len(seq.token_ids) - seq.params.max_stop_string_bytes - 1)
        tail = self._tokenizer.decode(seq.token_ids[start:])
        return any(s in tail for s in seq.params.stop_strings)


def truncate_at_stop_string(text: str, stop_strings: tuple[str, ...]) -> str:
    """The text before the earliest stop string (the stop string itself is not part of the answer)."""
    cut = min((i for i in (text.find(s) for s in stop_strings) if i >= 0), default=len(text))
    return text[:cut]
