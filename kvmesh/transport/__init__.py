"""KV transports: moving blocks from a prefill worker's pool into a decode worker's reserved blocks.

`base` is the interface (destinations, stats, the sender registry, choosing a transport); `inproc`,
`shm` and `grpc_stream` are the transports. Importing this package registers the push senders.
"""

from kvmesh.transport.base import (
    STREAM_TRANSPORT,
    KVDestination,
    KVSender,
    TransferError,
    TransferStats,
    TransportInfo,
    check_transfer,
    choose_transport,
    copy_blocks,
    make_sender,
    process_id,
    register_sender,
    supported_transports,
)
from kvmesh.transport.grpc_stream import (
    DEFAULT_CHUNK_BYTES,
    KVChunk,
    KVChunkEncoder,
    KVChunkReceiver,
    crc32_combine,
    iter_chunks,
)
from kvmesh.transport.inproc import (
    LOCAL_POOLS,
    InprocSender,
    LocalPools,
    register_local_pool,
    unregister_local_pool,
)
from kvmesh.transport.shm import SharedKVPool, ShmSender, attach

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "LOCAL_POOLS",
    "STREAM_TRANSPORT",
    "InprocSender",
    "KVChunk",
    "KVChunkEncoder",
    "KVChunkReceiver",
    "KVDestination",
    "KVSender",
    "LocalPools",
    "SharedKVPool",
    "ShmSender",
    "TransferError",
    "TransferStats",
    "TransportInfo",
    "attach",
    "check_transfer",
    "choose_transport",
    "copy_blocks",
    "crc32_combine",
    "iter_chunks",
    "make_sender",
    "process_id",
    "register_local_pool",
    "register_sender",
    "supported_transports",
    "unregister_local_pool",
]
