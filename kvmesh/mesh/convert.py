"""Conversions between protobuf messages and our own types, used at the service edges only."""

from __future__ import annotations

import grpc
import torch

from kvmesh.engine.kv_cache import KVLayout
from kvmesh.engine.sampling import SamplingParams
from kvmesh.engine.sequence import FinishReason
from kvmesh.mesh.server import ServiceError
from kvmesh.v1 import common_pb2, prefill_pb2

FINISH_REASON_TO_PROTO = {
    None: common_pb2.FINISH_REASON_UNSPECIFIED,
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
}


def invalid(message: str) -> ServiceError:
    return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, message)


def sampling_from_proto(
    sampling: common_pb2.SamplingParams, default_max_tokens: int, max_tokens_limit: int
) -> SamplingParams:
    """Validate request sampling options; raises ServiceError(INVALID_ARGUMENT) naming the field."""
    max_tokens = sampling.max_tokens or default_max_tokens
    if sampling.max_tokens < 0 or max_tokens > max_tokens_limit:
        raise invalid(
            f"sampling.max_tokens must be between 1 and {max_tokens_limit}, got {sampling.max_tokens}"
        )
    try:
        return SamplingParams(
            max_new_tokens=max_tokens,
            temperature=sampling.temperature,
            # proto3 cannot tell 0 from unset: 0 means off, like 1.
            top_p=sampling.top_p or 1.0,
            top_k=sampling.top_k,
            seed=sampling.seed if sampling.HasField("seed") else None,
            stop_token_ids=tuple(sampling.stop_token_ids),
            stop_strings=tuple(sampling.stop_strings),
            ignore_eos=sampling.ignore_eos,
        )
    except ValueError as error:
        raise invalid(f"sampling.{error}") from error


def layout_to_proto(layout: KVLayout) -> prefill_pb2.KVLayoutSpec:
    return prefill_pb2.KVLayoutSpec(
        num_layers=layout.num_layers,
        num_blocks=layout.num_blocks,
        block_size=layout.block_size,
        num_kv_heads=layout.num_kv_heads,
        head_dim=layout.head_dim,
        dtype=str(layout.dtype).removeprefix("torch."),
    )


def layout_from_proto(spec: prefill_pb2.KVLayoutSpec) -> KVLayout:
    dtype = getattr(torch, spec.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise invalid(f"destination.layout.dtype {spec.dtype!r} is not a torch dtype")
    return KVLayout(
        spec.num_layers, spec.num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim, dtype
    )
