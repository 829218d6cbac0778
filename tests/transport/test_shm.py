"""The shared-memory transport: transfers from another process, segment lifetime, and write grants (a
prefill worker writes only the blocks the pool's owner reserved for the request)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from kvmesh.transport import KVDestination, SharedKVPool, ShmSender, TransferError, attach
from kvmesh.transport.grant import GrantError, check_grant, sign_grant
from kvmesh.transport.shm import SHM_DIR
from tests.transport.conftest import shm_segments
from tests.transport.test_transport import DTYPES, REPO_ROOT, bits, make_layout, make_pool, reference_copy

# -- shared memory across real processes -----------------------------------------------------------

_CHILD = """
import asyncio, sys, torch
from kvmesh.engine.kv_cache import KVLayout
from kvmesh.transport import KVDestination, ShmSender
sys.path.insert(0, sys.argv[1])
from test_transport import make_layout, make_pool

sender = ShmSender()
for job in sys.argv[2:]:
    name, dtype, src_ids, dst_ids, grant, expires = job.split(":")
    dtype = getattr(torch, dtype)
    src_ids = [int(i) for i in src_ids.split(",")]
    dst_ids = tuple(int(i) for i in dst_ids.split(","))
    layout = make_layout(dtype, num_blocks=16)
    dest = KVDestination("shm", dst_ids, layout, name, "", "request-1", bytes.fromhex(grant), int(expires))
    asyncio.run(sender.send(make_pool(make_layout(dtype), seed=7), src_ids, dest))
sender.close()
print("sent", len(sys.argv) - 2)
"""


def test_shm_transfer_from_another_process(no_leaked_segments: None) -> None:
    src_ids, dst_ids = [3, 4, 5, 10, 1], [0, 15, 7, 8, 2]
    jobs, pools = [], []
    for dtype in DTYPES:
        layout = make_layout(dtype, num_blocks=16)
        pool, segment = SharedKVPool.create(layout)
        pools.append((pool, segment, bits(pool.kv).clone()))
        dest = segment.destination("request-1", dst_ids, host_id="")
        ids = f"{','.join(map(str, src_ids))}:{','.join(map(str, dst_ids))}"
        jobs.append(
            f"{segment.name}:{str(dtype).removeprefix('torch.')}:{ids}:{dest.grant.hex()}:{dest.grant_expires_unix_ms}"
        )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", _CHILD, str(Path(__file__).parent), *jobs],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "sent 3"
    # The attaching process neither warned about nor unlinked the segments (resource tracker).
    assert result.stderr == ""
    for (pool, segment, before), dtype in zip(pools, DTYPES, strict=True):
        assert os.path.exists(os.path.join(SHM_DIR, segment.name))
        expected = reference_copy(make_pool(make_layout(dtype), seed=7), src_ids, before, dst_ids)
        assert torch.equal(bits(pool.kv), expected), dtype
        segment.close()


def test_shm_close_unlinks_and_attach_keeps_memory_alive(no_leaked_segments: None) -> None:
    layout = make_layout()
    before = shm_segments()
    pool, segment = SharedKVPool.create(layout)
    assert shm_segments() == before | {segment.name}
    attached = attach(segment.name, layout)
    attached[0, 0, 0] = 1.5  # one memory, two mappings
    assert pool.kv[0, 0, 0, 0, 0, 0].item() == 1.5
    segment.close()
    segment.close()  # idempotent
    assert shm_segments() == before
    attached[1] = 2.0  # still mapped after unlink
    assert bool((pool.kv[1] == 2.0).all())
    with pytest.raises(FileNotFoundError):
        attach(segment.name, layout)


def test_shm_sender_follows_a_recreated_segment(no_leaked_segments: None) -> None:
    layout = make_layout()
    src = make_pool(layout, seed=8)
    sender = ShmSender()
    first, segment = SharedKVPool.create(layout, name="kvmesh-test-recreated")
    dest = segment.destination("request-1", (0, 1), host_id="")
    asyncio.run(sender.send(src, [4, 5], dest))
    segment.close()
    with pytest.raises(TransferError, match="not found"):
        asyncio.run(sender.send(src, [4, 5], dest))
    second, segment = SharedKVPool.create(layout, name="kvmesh-test-recreated")
    # The new segment has a new key: the old owner's grant does not open it.
    with pytest.raises(GrantError):
        asyncio.run(sender.send(src, [6, 7], dest))
    asyncio.run(sender.send(src, [6, 7], segment.destination("request-2", (0, 1), host_id="")))
    assert torch.equal(bits(second.kv[:, :, :2]), bits(src.kv[:, :, 6:8]))
    assert torch.equal(bits(first.kv[:, :, :2]), bits(src.kv[:, :, 4:6]))
    sender.close()
    segment.close()


def test_shm_create_errors(no_leaked_segments: None) -> None:
    layout = make_layout()
    _, segment = SharedKVPool.create(layout, name="kvmesh-test-taken")
    with pytest.raises(FileExistsError):
        SharedKVPool.create(layout, name="kvmesh-test-taken")
    segment.close()
    with pytest.raises(ValueError, match="bad shared memory name"):
        SharedKVPool.create(layout, name="../etc/x")


def test_shm_attach_rejects_another_layout(no_leaked_segments: None) -> None:
    layout = make_layout(torch.bfloat16)
    with SharedKVPool.create(layout)[1] as segment:
        # Same byte size, other dtype: only the segment's header can tell.
        with pytest.raises(ValueError, match="does not match the pool"):
            attach(segment.name, make_layout(torch.float16))
        with pytest.raises(ValueError, match="does not match the pool"):
            attach(segment.name, make_layout(num_blocks=13))
        dest = KVDestination("shm", (0,), make_layout(torch.float16), segment.name)
        with pytest.raises(ValueError, match="dtype"):  # caught before attaching: source vs destination
            asyncio.run(ShmSender().send(make_pool(layout, 0), [0], dest))


# -- writes only where the pool's owner reserved -----------------------------------------------------


def test_shm_writes_need_the_owners_grant_for_exactly_those_blocks(no_leaked_segments: None) -> None:
    layout = make_layout()
    src = make_pool(layout, seed=11)
    sender = ShmSender()
    with SharedKVPool.create(layout)[1] as segment:
        pool = attach(segment.name, layout)
        fill = bits(pool).clone()
        granted = segment.destination("request-1", (2, 3), host_id="")
        forged = [
            replace(granted, grant=b""),  # no grant
            replace(granted, grant=bytes(32)),  # a made-up one
            replace(granted, block_ids=(2, 4)),  # other blocks than reserved
            replace(granted, request_id="request-2"),  # another request
            replace(granted, grant_expires_unix_ms=granted.grant_expires_unix_ms + 60_000),  # stretched
            segment.destination("request-1", (2, 3), host_id="", timeout_s=-1.0),  # expired
        ]
        for dest in forged:
            with pytest.raises(GrantError):
                asyncio.run(sender.send(src, [0, 1], dest))
        assert torch.equal(bits(pool), fill)  # nothing was written
        asyncio.run(sender.send(src, [0, 1], granted))
        assert torch.equal(bits(pool[:, :, 2:4]), bits(src.kv[:, :, 0:2]))
        del pool
    sender.close()


def test_a_grant_signs_every_field() -> None:
    key = bytes(range(32))
    grant = sign_grant(key, "r", "pool", [1, 2], 1000)
    check_grant(key, grant, "r", "pool", [1, 2], 1000, now_unix_ms=999)
    for args in (("r", "pool", [1, 2, 3], 1000), ("r", "pool", [12], 1000), ("r", "poo", [1, 2], 1000)):
        with pytest.raises(GrantError):
            check_grant(key, grant, *args, now_unix_ms=999)  # type: ignore[arg-type]
    with pytest.raises(GrantError, match="expired"):
        check_grant(key, grant, "r", "pool", [1, 2], 1000, now_unix_ms=1001)
    with pytest.raises(GrantError):
        check_grant(bytes(32), grant, "r", "pool", [1, 2], 1000, now_unix_ms=999)
