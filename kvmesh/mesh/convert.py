"""Every conversion between protobuf messages and our own types, used at the service edges only.

Decoding checks what the types cannot know (a field present, an address shaped host:port, a limit of
this server's config) and raises ServiceError (INVALID_ARGUMENT) naming the field; values the domain
type checks itself (SamplingParams) are left to it, and its ValueError becomes INVALID_ARGUMENT here.

NOTE: this module must import without torch: the cache store uses it and never loads torch. The
conversions of engine types that need torch (sampling, KV layouts) import it inside the function.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from kvmesh.engine.block_hash import HASH_BYTES
from kvmesh.engine.kv_event import KVEvent, KVEventKind
from kvmesh.mesh.errors import invalid
from kvmesh.mesh.workers import WorkerInfo, WorkerLoad, WorkerRole
from kvmesh.v1 import cache_store_pb2, common_pb2, prefill_pb2

if TYPE_CHECKING:
    from kvmesh.engine.kv_cache import KVLayout
    from kvmesh.engine.sampling import SamplingParams
    from kvmesh.transport.cuda_export import PoolExport

# ---- requests' sampling and finish reasons ------------------------------------------------------------

FINISH_REASON_TO_PROTO: dict[str | None, int] = {
    None: common_pb2.FINISH_REASON_UNSPECIFIED,
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
}
"""kvmesh.engine.sequence.FinishReason -> proto. NOTE: keyed by the values, which a StrEnum's members
look up, so that this module need not import kvmesh.engine.sequence (and torch)."""


DEFAULT_MAX_STOP_STRINGS = 16
"""Most stop strings a request may send, unless a server's config says otherwise."""
DEFAULT_MAX_STOP_STRING_CHARS = 256
"""Longest stop string a request may send, in characters, unless a server's config says otherwise."""


def sampling_from_proto(
    sampling: common_pb2.SamplingParams,
    default_max_tokens: int,
    max_tokens_limit: int,
    *,
    max_stop_strings: int = DEFAULT_MAX_STOP_STRINGS,
    max_stop_string_chars: int = DEFAULT_MAX_STOP_STRING_CHARS,
) -> SamplingParams:
    """The request's sampling, defaults filled in: max_tokens 0 is default_max_tokens, top_p unset is 1.

    The limits are this server's (the stop-string ones bound the per-token stop check); SamplingParams
    checks the other values. Raises ServiceError (INVALID_ARGUMENT) naming the field.
    """
    from kvmesh.engine.sampling import SamplingParams

    max_new_tokens = sampling.max_tokens or default_max_tokens
    if sampling.max_tokens < 0 or max_new_tokens > max_tokens_limit:
        raise invalid(
            f"sampling.max_tokens must be between 0 and {max_tokens_limit} (0 means the default, "
            f"{default_max_tokens}), got {sampling.max_tokens}"
        )
    _check_stop_strings(sampling.stop_strings, max_stop_strings, max_stop_string_chars)
    try:
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=sampling.temperature,
            # An explicit top_p is checked as sent (0 keeps no token: SamplingParams refuses it).
            top_p=sampling.top_p if sampling.HasField("top_p") else 1.0,
            top_k=sampling.top_k,
            seed=sampling.seed if sampling.HasField("seed") else None,
            stop_token_ids=tuple(sampling.stop_token_ids),
            stop_strings=tuple(sampling.stop_strings),
            ignore_eos=sampling.ignore_eos,
        )
    except ValueError as error:
        # SamplingParams' messages start with the field's name ("top_p must be in (0, 1], got 1.5").
        raise invalid(f"sampling.{error}") from None


def _check_stop_strings(stop_strings: Sequence[str], max_count: int, max_chars: int) -> None:
    if len(stop_strings) > max_count:
        raise invalid(
            f"sampling.stop_strings has {len(stop_strings)} strings, more than the limit of {max_count} "
            "(max_stop_strings)"
        )
    for i, stop in enumerate(stop_strings):
        if not stop:
            raise invalid(f"sampling.stop_strings[{i}] is empty: every stop string needs a character")
        if len(stop) > max_chars:
            raise invalid(
                f"sampling.stop_strings[{i}] is {len(stop)} characters, more than the limit of {max_chars} "
                "(max_stop_string_chars)"
            )


def sampling_to_proto(params: SamplingParams) -> common_pb2.SamplingParams:
    """The proto of params, every default already filled in."""
    sampling = common_pb2.SamplingParams(
        max_tokens=params.max_new_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        stop_token_ids=params.stop_token_ids,
        stop_strings=params.stop_strings,
        ignore_eos=params.ignore_eos,
    )
    if params.seed is not None:
        sampling.seed = params.seed
    return sampling


# ---- KV layouts ---------------------------------------------------------------------------------------


def layout_to_proto(layout: KVLayout) -> prefill_pb2.KVLayoutSpec:
    return prefill_pb2.KVLayoutSpec(
        num_layers=layout.num_layers,
        num_blocks=layout.num_blocks,
        block_size=layout.block_size,
        num_kv_heads=layout.num_kv_heads,
        head_dim=layout.head_dim,
        dtype=str(layout.dtype).removeprefix("torch."),
        latent=layout.latent,
    )


def layout_from_proto(spec: prefill_pb2.KVLayoutSpec) -> KVLayout:
    """The destination's layout of a PrefillRequest. Raises ServiceError for an unknown dtype."""
    import torch

    from kvmesh.engine.kv_cache import KVLayout

    dtype = getattr(torch, spec.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise invalid(f"destination.layout.dtype {spec.dtype!r} is not a torch dtype")
    return KVLayout(
        spec.num_layers,
        spec.num_blocks,
        spec.block_size,
        spec.num_kv_heads,
        spec.head_dim,
        dtype,
        spec.latent,
    )


def cuda_export_to_proto(export: PoolExport) -> prefill_pb2.CudaIpcExport:
    return prefill_pb2.CudaIpcExport(**dataclasses.asdict(export))


def cuda_export_from_proto(spec: prefill_pb2.CudaIpcExport) -> PoolExport:
    """A destination's CUDA IPC export, as sent; `PoolExport.check` validates it against the layout."""
    from kvmesh.transport.cuda_export import PoolExport

    if not spec.pool_id:
        raise invalid("destination.cuda_ipc.pool_id is empty: transport 'cuda_ipc' needs the pool's export")
    return PoolExport(
        pool_id=spec.pool_id,
        device_uuid=spec.device_uuid,
        pid=spec.pid,
        mem_handle=spec.mem_handle,
        storage_size_bytes=spec.storage_size_bytes,
        storage_offset_bytes=spec.storage_offset_bytes,
        ref_counter_handle=spec.ref_counter_handle,
        ref_counter_offset=spec.ref_counter_offset,
        event_handle=spec.event_handle,
        event_sync_required=spec.event_sync_required,
    )


# ---- workers ------------------------------------------------------------------------------------------

_ROLE_FROM_PROTO = {
    cache_store_pb2.WORKER_ROLE_PREFILL: WorkerRole.PREFILL,
    cache_store_pb2.WORKER_ROLE_DECODE: WorkerRole.DECODE,
}
_ROLE_TO_PROTO = {role: value for value, role in _ROLE_FROM_PROTO.items()}


def role_from_proto(role: cache_store_pb2.WorkerRole, field: str) -> WorkerRole | None:
    """A role filter: None for WORKER_ROLE_UNSPECIFIED (every role). Raises ServiceError for an unknown one."""
    if role == cache_store_pb2.WORKER_ROLE_UNSPECIFIED:
        return None
    if role not in _ROLE_FROM_PROTO:
        raise invalid(f"{field} {role} is not a known WorkerRole")
    return _ROLE_FROM_PROTO[role]


def load_from_proto(load: cache_store_pb2.WorkerLoad, field: str) -> WorkerLoad:
    """Decodes and checks a WorkerLoad; field names it in error messages. Raises ServiceError."""
    for name in ("num_running", "num_waiting", "num_blocks_free", "num_blocks_total"):
        if getattr(load, name) < 0:
            raise invalid(f"{field}.{name} must be >= 0, got {getattr(load, name)}")
    if load.num_blocks_free > load.num_blocks_total:
        raise invalid(
            f"{field}.num_blocks_free ({load.num_blocks_free}) exceeds "
            f"{field}.num_blocks_total ({load.num_blocks_total})"
        )
    return WorkerLoad(
        num_running=load.num_running,
        num_waiting=load.num_waiting,
        num_blocks_free=load.num_blocks_free,
        num_blocks_total=load.num_blocks_total,
    )


def load_to_proto(load: WorkerLoad) -> cache_store_pb2.WorkerLoad:
    return cache_store_pb2.WorkerLoad(**dataclasses.asdict(load))


def worker_from_proto(worker: cache_store_pb2.WorkerInfo, field: str = "worker") -> WorkerInfo:
    """Decodes and checks a WorkerInfo; field names it in error messages. Raises ServiceError."""
    if not worker.worker_id:
        raise invalid(f"{field}.worker_id is empty: set a unique id for the worker")
    role = _ROLE_FROM_PROTO.get(worker.role)
    if role is None:
        raise invalid(f"{field}.role must be WORKER_ROLE_PREFILL or WORKER_ROLE_DECODE")
    if not worker.address:
        raise invalid(f"{field}.address is empty: set the worker's gRPC address as host:port")
    host, sep, port = worker.address.rpartition(":")
    if not (sep and host and port.isdigit()):
        raise invalid(f"{field}.address must be host:port, got {worker.address!r}")
    if worker.block_size_tokens == 0:
        raise invalid(f"{field}.block_size_tokens is 0: send the engine's tokens per KV block")
    if any(not t for t in worker.transports):
        raise invalid(f"{field}.transports holds an empty name")
    return WorkerInfo(
        worker_id=worker.worker_id,
        role=role,
        address=worker.address,
        block_size=worker.block_size_tokens,
        host_id=worker.host_id,
        transports=tuple(worker.transports),
        load=load_from_proto(worker.load, f"{field}.load"),
        model_fingerprint=worker.model_fingerprint,
    )


def worker_to_proto(worker: WorkerInfo) -> cache_store_pb2.WorkerInfo:
    return cache_store_pb2.WorkerInfo(
        worker_id=worker.worker_id,
        role=_ROLE_TO_PROTO[worker.role],
        address=worker.address,
        block_size_tokens=worker.block_size,
        host_id=worker.host_id,
        transports=list(worker.transports),
        load=load_to_proto(worker.load),
        model_fingerprint=worker.model_fingerprint,
    )


# ---- KV events and block hashes -----------------------------------------------------------------------

_KIND_FROM_PROTO = {
    cache_store_pb2.KV_EVENT_KIND_STORED: KVEventKind.STORED,
    cache_store_pb2.KV_EVENT_KIND_REMOVED: KVEventKind.REMOVED,
    cache_store_pb2.KV_EVENT_KIND_CLEARED: KVEventKind.CLEARED,
}
_KIND_TO_PROTO = {kind: value for value, kind in _KIND_FROM_PROTO.items()}


def block_hashes_from_proto(block_hashes: Sequence[bytes], field: str) -> tuple[bytes, ...]:
    """Checks that every hash is a SHA-256 digest; field names the list in error messages.

    Raises ServiceError (INVALID_ARGUMENT) naming the first bad hash.
    """
    for position, block_hash in enumerate(block_hashes):
        if len(block_hash) != HASH_BYTES:
            raise invalid(
                f"{field}[{position}] is {len(block_hash)} bytes: block hashes are {HASH_BYTES}-byte "
                "SHA-256 digests from kvmesh.engine.block_hash"
            )
    return tuple(block_hashes)


def kv_events_from_proto(batch: cache_store_pb2.KVEventBatch) -> list[KVEvent]:
    """Decodes and checks a batch's events, all of them before any is applied. Raises ServiceError."""
    events: list[KVEvent] = []
    for position, event in enumerate(batch.events):
        field = f"events[{position}]"
        kind = _KIND_FROM_PROTO.get(event.kind)
        if kind is None:
            raise invalid(
                f"{field}.kind must be KV_EVENT_KIND_STORED, KV_EVENT_KIND_REMOVED or KV_EVENT_KIND_CLEARED"
            )
        if kind is KVEventKind.CLEARED and event.block_hashes:
            raise invalid(f"{field}.block_hashes must be empty for KV_EVENT_KIND_CLEARED")
        events.append(KVEvent(kind, block_hashes_from_proto(event.block_hashes, f"{field}.block_hashes")))
    return events


def kv_events_to_proto(events: Iterable[KVEvent]) -> list[cache_store_pb2.KVEvent]:
    return [cache_store_pb2.KVEvent(kind=_KIND_TO_PROTO[e.kind], block_hashes=e.block_hashes) for e in events]
