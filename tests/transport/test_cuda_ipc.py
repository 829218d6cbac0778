"""The CUDA IPC transport: its export, grants and refusals on CPU; bit-exact transfers between two real
processes on a GPU (marked gpu).

On CPU, `open_export` (the one call that needs CUDA IPC) is replaced by a lookup of a host buffer laid
out exactly as `ExportedKVPool.create` lays out the device buffer, so what the prefill worker checks
(export fields, header, grant) runs for real.
"""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from multiprocessing.connection import Connection

import grpc
import pytest
import torch

from kvmesh.engine.kv_cache import KVLayout, KVPool
from kvmesh.mesh.convert import cuda_export_from_proto, cuda_export_to_proto, layout_to_proto
from kvmesh.transport import KVDestination, make_sender
from kvmesh.transport.base import TransferError
from kvmesh.transport.cuda_export import REF_COUNTER_SLOTS, CudaIpcUnavailable, PoolExport
from kvmesh.transport.cuda_ipc import CudaIpcSender, ExportedKVPool
from kvmesh.transport.grant import GRANT_KEY_BYTES, GrantError
from kvmesh.transport.shm import HEADER_BYTES, SHM_DIR, layout_header
from kvmesh.v1 import prefill_pb2

LAYOUT = KVLayout(num_layers=3, num_blocks=16, block_size=4, num_kv_heads=2, head_dim=8, dtype=torch.bfloat16)
GPU_LAYOUT = KVLayout(
    num_layers=4, num_blocks=64, block_size=16, num_kv_heads=4, head_dim=64, dtype=torch.bfloat16
)


def make_source(layout: KVLayout, seed: int, device: str = "cpu") -> KVPool:
    """A pool of random bits (every bf16 pattern, NaNs included: equality is checked on the bits)."""
    pool = KVPool(layout, device)
    generator = torch.Generator().manual_seed(seed)
    bits = torch.randint(-(2**15), 2**15, pool.kv.shape, generator=generator, dtype=torch.int32)
    pool.kv.copy_(bits.to(torch.int16).view(torch.bfloat16).to(device))
    return pool


def bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.int16).cpu()


# ---- on CPU: the export, what the prefill worker checks, refusals ---------------------------------------


@pytest.fixture
def ref_counter() -> Iterator[bytes]:
    """A file shaped like torch's CUDA IPC reference counters, named as torch names them."""
    name = f"torch_{os.getpid()}_{uuid.uuid4().int % 10**9}_0"
    path = os.path.join(SHM_DIR, name)
    with open(path, "wb") as f:
        f.truncate(8 * REF_COUNTER_SLOTS)
    yield ("/" + name).encode()
    os.unlink(path)


class HostExport:
    """A decode pool laid out like an exported device buffer, in host memory, and its export."""

    def __init__(self, layout: KVLayout, ref_counter: bytes, pid: int | None = None) -> None:
        key = os.urandom(GRANT_KEY_BYTES)
        self.buffer = torch.zeros(HEADER_BYTES + layout.num_bytes, dtype=torch.uint8)
        header = layout_header(layout) + key
        self.buffer[: len(header)] = torch.frombuffer(bytearray(header), dtype=torch.uint8)
        self.kv = self.buffer[HEADER_BYTES:].view(layout.dtype).view(layout.shape)
        self.export = PoolExport(
            pool_id=f"cuda-{uuid.uuid4().hex}",
            device_uuid="GPU-test",
            pid=os.getpid() if pid is None else pid,
            mem_handle=b"\x01" * 64,
            storage_size_bytes=self.buffer.numel(),
            storage_offset_bytes=0,
            ref_counter_handle=ref_counter,
            ref_counter_offset=3,
        )
        self.pool = ExportedKVPool(layout, self.export, key, self.buffer)


@pytest.fixture
def host_export(ref_counter, monkeypatch) -> HostExport:
    exported = HostExport(LAYOUT, ref_counter)
    opened: list[str] = []

    def open_export(export: PoolExport) -> torch.Tensor:
        assert export == exported.export
        opened.append(export.pool_id)
        return exported.buffer

    monkeypatch.setattr("kvmesh.transport.cuda_ipc.open_export", open_export)
    exported.opened = opened  # type: ignore[attr-defined]
    return exported


def test_the_export_round_trips_through_the_proto(ref_counter) -> None:
    export = replace(
        HostExport(LAYOUT, ref_counter).export, event_handle=b"\x02" * 64, event_sync_required=True
    )
    message = prefill_pb2.KVDestination(transport="cuda_ipc", cuda_ipc=cuda_export_to_proto(export))
    wire = prefill_pb2.KVDestination.FromString(message.SerializeToString())
    assert cuda_export_from_proto(wire.cuda_ipc) == export


def test_a_granted_destination_is_authorized_once_opened_and_cached(host_export) -> None:
    sender = CudaIpcSender()
    first = host_export.pool.destination("req-1", [3, 1, 7], "host-a")
    assert first.cuda_ipc == host_export.export and first.transport == "cuda_ipc"
    assert sender.authorize(first).data_ptr() == host_export.kv.data_ptr()
    sender.authorize(host_export.pool.destination("req-2", [0], "host-a"))
    assert host_export.opened == [host_export.export.pool_id]  # opened once, then cached


def test_only_the_owners_grant_for_exactly_these_blocks_authorizes_a_write(host_export) -> None:
    sender = CudaIpcSender()
    granted = host_export.pool.destination("req-1", [3, 1, 7], "host-a")
    attempts = [
        replace(granted, grant=b""),  # none
        replace(granted, block_ids=(3, 1, 8)),  # other blocks
        replace(granted, request_id="req-2"),  # another request
        replace(granted, grant_expires_unix_ms=granted.grant_expires_unix_ms + 60_000),  # stretched
        # Signed by another pool's key: the key is read from the exported memory, never from a message.
        replace(
            granted,
            grant=HostExport(LAYOUT, granted.cuda_ipc.ref_counter_handle)
            .pool.destination("req-1", [3, 1, 7], "host-a")
            .grant,
        ),
    ]
    for dest in attempts:
        with pytest.raises(GrantError):
            sender.authorize(dest)
    expired = host_export.pool.destination("req-1", [3, 1, 7], "host-a", timeout_s=-1)
    with pytest.raises(GrantError, match="expired"):
        sender.authorize(expired)


def test_an_export_that_does_not_match_the_memory_or_the_layout_is_refused(host_export) -> None:
    sender = CudaIpcSender()
    dest = host_export.pool.destination("req-1", [0, 1], "host-a")
    other = LAYOUT.with_blocks(LAYOUT.num_blocks + 1)
    with pytest.raises(ValueError, match="storage_size_bytes"):
        sender.authorize(replace(dest, layout=other))
    host_export.buffer[:16] = 0  # not a kvmesh pool's header
    with pytest.raises(ValueError, match="does not match the pool"):
        sender.authorize(dest)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ref_counter_handle": b"/etc/passwd"}, "reference-counter name"),
        ({"ref_counter_handle": b"/torch_1_2_3"}, "reference-counter name"),  # not the exporter's pid
        ({"ref_counter_offset": REF_COUNTER_SLOTS}, "ref_counter_offset"),
        ({"ref_counter_offset": -1}, "ref_counter_offset"),
        ({"mem_handle": b""}, "mem_handle"),
        ({"pool_id": ""}, "pool_id"),
        ({"event_sync_required": True}, "event_handle"),
        ({"storage_offset_bytes": -8}, "storage_offset_bytes"),
    ],
)
def test_export_fields_that_torch_would_act_on_are_checked_before_opening(
    host_export, change, message
) -> None:
    dest = host_export.pool.destination("req-1", [0], "host-a")
    bad = replace(dest, cuda_ipc=replace(host_export.export, **change))
    with pytest.raises(ValueError, match=message):
        CudaIpcSender().authorize(bad)
    assert host_export.opened == []


def test_a_reference_counter_name_for_a_missing_file_is_refused(host_export) -> None:
    name = f"/torch_{os.getpid()}_1_999999".encode()
    dest = host_export.pool.destination("req-1", [0], "host-a")
    with pytest.raises(ValueError, match="does not exist"):
        CudaIpcSender().authorize(
            replace(dest, cuda_ipc=replace(host_export.export, ref_counter_handle=name))
        )


def test_the_pool_of_a_process_that_is_gone_is_not_written(ref_counter, monkeypatch) -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    exported = HostExport(LAYOUT, ref_counter, pid=int(done.stdout))
    monkeypatch.setattr("kvmesh.transport.cuda_ipc.open_export", lambda export: exported.buffer)
    with pytest.raises(TransferError, match="not running on this host"):
        CudaIpcSender().authorize(exported.pool.destination("req-1", [0], "host-a"))


def test_without_cuda_every_side_refuses_with_a_clear_error(host_export, monkeypatch) -> None:
    with pytest.raises(CudaIpcUnavailable, match="CUDA pools.*cpu"):
        ExportedKVPool.create(LAYOUT, "cpu")
    dest = host_export.pool.destination("req-1", [0, 1], "host-a")
    with pytest.raises(CudaIpcUnavailable, match="CUDA pools"):
        asyncio.run(make_sender("cuda_ipc").send(make_source(LAYOUT, 1), [2, 3], dest))
    assert not host_export.kv.any()  # nothing written
    if not torch.cuda.is_available():
        with pytest.raises(CudaIpcUnavailable, match="sees no CUDA device"):
            ExportedKVPool.create(LAYOUT, "cuda")
        monkeypatch.undo()  # the real open_export
        with pytest.raises(CudaIpcUnavailable, match="sees no CUDA device"):
            CudaIpcSender().authorize(dest)


def test_a_cpu_prefill_worker_refuses_to_offer_cuda_ipc() -> None:
    from kvmesh.mesh.worker_config import RegistrationSettings
    from prefill_service.config import PrefillConfig
    from prefill_service.server import PrefillServicer
    from tests.factories import make_engine

    registration = RegistrationSettings("127.0.0.1:1", transports=("cuda_ipc", "grpc"))
    config = PrefillConfig(None, None, registration)  # type: ignore[arg-type] (unused before the refusal)
    with pytest.raises(CudaIpcUnavailable, match="CUDA pools"):
        PrefillServicer(make_engine(), None, config)  # type: ignore[arg-type]


def test_a_prefill_worker_that_does_not_offer_cuda_ipc_says_so(mesh_model_path) -> None:
    from kvmesh.v1 import prefill_pb2_grpc
    from tests.factories import random_ids
    from tests.mesh_harness import MeshInThread, MeshSpec

    with MeshInThread(MeshSpec(str(mesh_model_path), worker_transports=("grpc",), num_decode=1)) as mesh:
        request = prefill_pb2.PrefillRequest(
            request_id="r",
            token_ids=random_ids(20),
            destination=prefill_pb2.KVDestination(
                transport="cuda_ipc", block_ids=[0, 1], layout=layout_to_proto(LAYOUT), host_id="h"
            ),
        )
        with (
            grpc.insecure_channel(mesh.servers["prefill-0"].address) as channel,
            pytest.raises(grpc.RpcError) as raised,
        ):
            list(prefill_pb2_grpc.PrefillStub(channel).Prefill(request, timeout=30))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "'cuda_ipc' is not offered" in raised.value.details()


# ---- on a GPU: two real processes -----------------------------------------------------------------------


def _prefill_main(conn: Connection, layout: KVLayout, seed: int) -> None:
    """The prefill worker's side: a CUDA source pool; for each destination received, send its blocks."""

    async def main() -> None:
        sender = make_sender("cuda_ipc")
        pool = make_source(layout, seed, "cuda")
        while (message := await asyncio.to_thread(conn.recv)) is not None:
            src_ids, dest, layerwise = message

            async def layer_ready(layer: int) -> None:
                await asyncio.sleep(0.001)

            try:
                stats = await sender.send(pool, src_ids, dest, layer_ready if layerwise else None)
                conn.send(("ok", stats.num_bytes))
            except Exception as error:  # noqa: BLE001 (reported to the test)
                conn.send(("error", f"{type(error).__name__}: {error}"))
        sender.close()

    asyncio.run(main())


@pytest.fixture
def prefill_process() -> Iterator[Connection]:
    ctx = mp.get_context("spawn")
    ours, theirs = ctx.Pipe()
    process = ctx.Process(target=_prefill_main, args=(theirs, GPU_LAYOUT, 11), daemon=True)
    process.start()
    yield ours
    ours.send(None)
    process.join(timeout=30)
    if process.is_alive():
        process.kill()


@pytest.mark.gpu
@pytest.mark.timeout(180)
def test_cuda_ipc_transfers_are_bit_exact_into_scattered_blocks_between_processes(prefill_process) -> None:
    pool, exported = ExportedKVPool.create(GPU_LAYOUT, "cuda")
    source = make_source(GPU_LAYOUT, 11, "cuda")
    cases = [
        ([5, 1, 9, 2], [60, 3, 11, 0], False),
        (list(range(10, 30)), list(range(30, 50)), False),  # one run on both sides
        ([7, 7, 40], [1, 63, 20], True),  # repeated source, layer by layer
    ]
    for src_ids, dst_ids, layerwise in cases:
        before = pool.kv.clone()
        prefill_process.send((src_ids, exported.destination("req", dst_ids, "host"), layerwise))
        status, detail = prefill_process.recv()
        assert status == "ok", detail
        assert detail == len(dst_ids) * GPU_LAYOUT.bytes_per_block
        assert torch.equal(bits(pool.kv[:, :, dst_ids]), bits(source.kv[:, :, src_ids]))
        untouched = [b for b in range(GPU_LAYOUT.num_blocks) if b not in dst_ids]
        assert torch.equal(bits(pool.kv[:, :, untouched]), bits(before[:, :, untouched]))


@pytest.mark.gpu
@pytest.mark.timeout(180)
def test_cuda_ipc_refuses_a_forged_grant_and_writes_nothing(prefill_process) -> None:
    pool, exported = ExportedKVPool.create(GPU_LAYOUT, "cuda")
    dest = exported.destination("req", [0, 1], "host")
    prefill_process.send(([2, 3], replace(dest, grant=bytes(32)), False))
    status, detail = prefill_process.recv()
    assert status == "error" and "GrantError" in detail
    time.sleep(0.1)
    assert not pool.kv.any()


@pytest.mark.gpu
def test_cuda_ipc_sends_within_one_process_too() -> None:
    pool, exported = ExportedKVPool.create(GPU_LAYOUT, "cuda")
    source = make_source(GPU_LAYOUT, 5, "cuda")
    dest: KVDestination = exported.destination("req", [9, 4], "host")
    stats = asyncio.run(make_sender("cuda_ipc").send(source, [1, 2], dest))
    assert stats.num_bytes == 2 * GPU_LAYOUT.bytes_per_block
    assert torch.equal(bits(pool.kv[:, :, [9, 4]]), bits(source.kv[:, :, [1, 2]]))
