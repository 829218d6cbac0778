"""KV transports: moving blocks from a prefill worker's pool into a decode worker's reserved blocks.

`base` is the interface (destinations, stats, the sender registry); `shm`, `cuda_ipc` (device to
device on one node), `grpc_stream` and `collective` (NCCL, and its gloo twin on CPU) are the transports;
`layerwise` lets blocks leave layer by layer while the last chunk of a prompt is computed. Which one a
request uses, the gateway chooses (gateway.routing_cost.choose_transport).
Importing this package registers the push senders.
"""

from kvmesh.transport.base import (
    STREAM_TRANSPORT,
    KVDestination,
    KVSender,
    TransferError,
    TransferStats,
    check_transfer,
    copy_blocks,
    make_sender,
    register_sender,
)
from kvmesh.transport.collective import CollectiveSender, PeerLost
from kvmesh.transport.collective_receiver import CollectiveReceiver
from kvmesh.transport.cuda_export import CudaIpcUnavailable, PoolExport
from kvmesh.transport.cuda_ipc import CudaIpcSender, ExportedKVPool
from kvmesh.transport.grpc_stream import (
    DEFAULT_CHUNK_BYTES,
    KVChunk,
    KVChunkEncoder,
    KVChunkReceiver,
    crc32_combine,
    iter_chunks,
)
from kvmesh.transport.shm import SharedKVPool, ShmSender, attach

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "CollectiveReceiver",
    "CollectiveSender",
    "CudaIpcSender",
    "CudaIpcUnavailable",
    "ExportedKVPool",
    "PeerLost",
    "PoolExport",
    "STREAM_TRANSPORT",
    "KVChunk",
    "KVChunkEncoder",
    "KVChunkReceiver",
    "KVDestination",
    "KVSender",
    "SharedKVPool",
    "ShmSender",
    "TransferError",
    "TransferStats",
    "attach",
    "check_transfer",
    "copy_blocks",
    "crc32_combine",
    "iter_chunks",
    "make_sender",
    "register_sender",
]
