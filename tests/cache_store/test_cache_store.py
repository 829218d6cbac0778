"""Cache store: the registry on a fake clock, then the real server on loopback through a real client."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cache_store.registry import IncompatibleWorker, WorkerRegistry
from cache_store.server import SERVICE_NAME, CacheStoreConfig, serve
from kvmesh.mesh.server import wait_for_serving
from kvmesh.mesh.workers import WorkerInfo, WorkerLoad, WorkerRole
from kvmesh.v1 import cache_store_pb2 as pb
from kvmesh.v1 import cache_store_pb2_grpc

T = TypeVar("T")


class FakeClock:
    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def make_worker(
    worker_id: str = "d0", role: WorkerRole = WorkerRole.DECODE, block_size: int = 16
) -> WorkerInfo:
    return WorkerInfo(
        worker_id=worker_id, role=role, address=f"127.0.0.1:{9000 + len(worker_id)}", block_size=block_size
    )


def make_worker_proto(
    worker_id: str = "d0",
    role: pb.WorkerRole = pb.WORKER_ROLE_DECODE,
    address: str = "127.0.0.1:9001",
    block_size_tokens: int = 16,
) -> pb.WorkerInfo:
    return pb.WorkerInfo(
        worker_id=worker_id,
        role=role,
        address=address,
        block_size_tokens=block_size_tokens,
        host_id="host-a",
        transports=["shm", "grpc"],
        load=pb.WorkerLoad(num_blocks_free=10, num_blocks_total=16),
        model_fingerprint="0123456789abcdef",
    )


# --- registry ---------------------------------------------------------------------------------------


def test_registry_lists_live_workers_by_role() -> None:
    registry = WorkerRegistry(expiry_ms=1000, clock=FakeClock())
    registry.register(make_worker("p0", WorkerRole.PREFILL))
    registry.register(make_worker("d1"))
    registry.register(make_worker("d0"))
    assert [w.worker_id for w in registry.list_workers()] == ["d0", "d1", "p0"]
    assert [w.worker_id for w in registry.list_workers(WorkerRole.DECODE)] == ["d0", "d1"]
    assert [w.worker_id for w in registry.list_workers(WorkerRole.PREFILL)] == ["p0"]


def test_registry_heartbeat_renews_and_updates_load() -> None:
    clock = FakeClock()
    registry = WorkerRegistry(expiry_ms=1000, clock=clock)
    registry.register(make_worker("d0"))
    clock.now_s += 0.9
    assert registry.heartbeat("d0", WorkerLoad(num_running=3, num_blocks_total=8))
    clock.now_s += 0.9  # 1.8 s after register, 0.9 s after the heartbeat
    assert registry.expire() == []
    [worker] = registry.list_workers()
    assert worker.load == WorkerLoad(num_running=3, num_blocks_total=8)


def test_registry_expires_silent_workers() -> None:
    clock = FakeClock()
    registry = WorkerRegistry(expiry_ms=1000, clock=clock)
    registry.register(make_worker("d0"))
    registry.register(make_worker("d1"))
    clock.now_s += 0.6
    assert registry.heartbeat("d1", WorkerLoad())
    clock.now_s += 0.6
    # Hidden from lists at once, before any sweep.
    assert [w.worker_id for w in registry.list_workers()] == ["d1"]
    assert registry.expire() == ["d0"]
    assert not registry.heartbeat("d0", WorkerLoad()), "an expired worker must re-register"
    registry.register(make_worker("d0"))
    assert [w.worker_id for w in registry.list_workers()] == ["d0", "d1"]


def test_registry_expire_reports_a_worker_that_heartbeats_too_late() -> None:
    clock = FakeClock()
    registry = WorkerRegistry(expiry_ms=1000, clock=clock)
    registry.register(make_worker("d0"))
    registry.register(make_worker("d1"))
    assert registry.is_live("d0")
    assert registry.live_worker_ids() == {"d0", "d1"}
    clock.now_s += 1.5
    assert registry.heartbeat("d1", WorkerLoad()) is False
    assert not registry.is_live("d1")
    assert registry.live_worker_ids() == set()
    # Whoever follows expire() (the block index) must hear of d1 too, though its heartbeat came first.
    assert registry.expire() == ["d0", "d1"]
    assert not registry.is_live("ghost")


def test_registry_register_again_replaces() -> None:
    registry = WorkerRegistry(expiry_ms=1000, clock=FakeClock())
    registry.register(make_worker("d0"))
    moved = WorkerInfo(worker_id="d0", role=WorkerRole.DECODE, address="10.0.0.2:7000", block_size=16)
    registry.register(moved)
    assert registry.list_workers() == [moved]


def test_registry_refuses_a_worker_of_another_block_size() -> None:
    clock = FakeClock()
    registry = WorkerRegistry(expiry_ms=1000, clock=clock)
    registry.register(make_worker("d0"))
    registry.register(make_worker("p1", WorkerRole.PREFILL))
    with pytest.raises(IncompatibleWorker) as raised:
        registry.register(make_worker("d2", block_size=32))
    assert str(raised.value).startswith("worker d2 has block_size 32, the mesh's workers have 16")
    with pytest.raises(IncompatibleWorker):  # re-registering does not change a worker's block size either
        registry.register(make_worker("d0", block_size=32))
    assert [(w.worker_id, w.block_size) for w in registry.list_workers()] == [("d0", 16), ("p1", 16)]
    # Once the old workers are gone (expired, even before a sweep), the next one sets the block size.
    clock.now_s += 1.5
    registry.register(make_worker("d2", block_size=32))
    assert [(w.worker_id, w.block_size) for w in registry.list_workers()] == [("d2", 32)]
    registry.register(make_worker("d2", block_size=8))  # a lone worker may restart with another one
    assert [w.block_size for w in registry.list_workers()] == [8]


def test_registry_unknown_heartbeat() -> None:
    assert not WorkerRegistry(expiry_ms=1000, clock=FakeClock()).heartbeat("ghost", WorkerLoad())


# --- server -----------------------------------------------------------------------------------------


def run_with_store(
    body: Callable[[cache_store_pb2_grpc.CacheStoreStub, grpc.aio.Channel], Awaitable[T]],
    config: CacheStoreConfig | None = None,
) -> T:
    async def main() -> T:
        running = await serve(config or CacheStoreConfig(port=0))
        try:
            async with grpc.aio.insecure_channel(running.address) as channel:
                return await body(cache_store_pb2_grpc.CacheStoreStub(channel), channel)
        finally:
            await running.stop(0)

    return asyncio.run(main())


def test_register_list_heartbeat() -> None:
    async def body(stub: cache_store_pb2_grpc.CacheStoreStub, _: grpc.aio.Channel) -> None:
        reply = await stub.Register(pb.RegisterRequest(worker=make_worker_proto("d0")), timeout=10)
        assert (reply.heartbeat_interval_ms, reply.expiry_ms) == (1000, 5000)
        await stub.Register(
            pb.RegisterRequest(worker=make_worker_proto("p0", pb.WORKER_ROLE_PREFILL, "127.0.0.1:9002")),
            timeout=10,
        )

        everyone = await stub.ListWorkers(pb.ListWorkersRequest(), timeout=10)
        assert [w.worker_id for w in everyone.workers] == ["d0", "p0"]
        assert everyone.workers[0] == make_worker_proto("d0")
        decoders = await stub.ListWorkers(pb.ListWorkersRequest(role=pb.WORKER_ROLE_DECODE), timeout=10)
        assert [w.worker_id for w in decoders.workers] == ["d0"]

        load = pb.WorkerLoad(num_running=2, num_waiting=1, num_blocks_free=4, num_blocks_total=16)
        beat = await stub.Heartbeat(pb.HeartbeatRequest(worker_id="d0", load=load), timeout=10)
        assert beat.known
        decoders = await stub.ListWorkers(pb.ListWorkersRequest(role=pb.WORKER_ROLE_DECODE), timeout=10)
        assert decoders.workers[0].load == load

        ghost = await stub.Heartbeat(pb.HeartbeatRequest(worker_id="ghost"), timeout=10)
        assert not ghost.known

    run_with_store(body)


def test_silent_worker_expires() -> None:
    async def body(stub: cache_store_pb2_grpc.CacheStoreStub, _: grpc.aio.Channel) -> None:
        reply = await stub.Register(pb.RegisterRequest(worker=make_worker_proto("d0")), timeout=10)
        assert reply.expiry_ms == 300
        await asyncio.sleep(0.7)
        listed = await stub.ListWorkers(pb.ListWorkersRequest(), timeout=10)
        assert list(listed.workers) == []
        beat = await stub.Heartbeat(pb.HeartbeatRequest(worker_id="d0"), timeout=10)
        assert not beat.known

    run_with_store(body, CacheStoreConfig(port=0, heartbeat_interval_ms=100, expiry_ms=300))


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        (pb.RegisterRequest(worker=make_worker_proto(address="")), "worker.address"),
        (pb.RegisterRequest(worker=make_worker_proto(address="no-port")), "worker.address"),
        (pb.RegisterRequest(worker=make_worker_proto(worker_id="")), "worker.worker_id"),
        (pb.RegisterRequest(worker=make_worker_proto(role=pb.WORKER_ROLE_UNSPECIFIED)), "worker.role"),
        (
            pb.RegisterRequest(
                worker=pb.WorkerInfo(
                    worker_id="d0",
                    role=pb.WORKER_ROLE_DECODE,
                    address="127.0.0.1:1",
                    block_size_tokens=16,
                    load=pb.WorkerLoad(num_blocks_free=5, num_blocks_total=4),
                )
            ),
            "worker.load.num_blocks_free",
        ),
        (pb.RegisterRequest(worker=make_worker_proto(block_size_tokens=0)), "worker.block_size_tokens"),
    ],
)
def test_register_rejects_bad_input(request_: pb.RegisterRequest, field: str) -> None:
    async def body(stub: cache_store_pb2_grpc.CacheStoreStub, _: grpc.aio.Channel) -> str:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Register(request_, timeout=10)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        return raised.value.details() or ""

    assert field in run_with_store(body)


def test_register_refuses_a_worker_of_another_block_size() -> None:
    async def body(stub: cache_store_pb2_grpc.CacheStoreStub, _: grpc.aio.Channel) -> None:
        await stub.Register(pb.RegisterRequest(worker=make_worker_proto("d0")), timeout=10)
        mismatched = make_worker_proto("p1", pb.WORKER_ROLE_PREFILL, "127.0.0.1:9002", block_size_tokens=32)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub.Register(pb.RegisterRequest(worker=mismatched), timeout=10)
        assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "worker p1 has block_size 32, the mesh's workers have 16" in (raised.value.details() or "")
        listed = await stub.ListWorkers(pb.ListWorkersRequest(), timeout=10)
        assert [(w.worker_id, w.block_size_tokens) for w in listed.workers] == [("d0", 16)]

    run_with_store(body)


def test_heartbeat_rejects_bad_input() -> None:
    async def body(stub: cache_store_pb2_grpc.CacheStoreStub, _: grpc.aio.Channel) -> list[str]:
        details = []
        for request in (
            pb.HeartbeatRequest(worker_id=""),
            pb.HeartbeatRequest(worker_id="d0", load=pb.WorkerLoad(num_running=-1)),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await stub.Heartbeat(request, timeout=10)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            details.append(raised.value.details() or "")
        return details

    missing_id, negative = run_with_store(body)
    assert "worker_id" in missing_id
    assert "load.num_running" in negative


def test_health_and_reflection() -> None:
    async def body(_: cache_store_pb2_grpc.CacheStoreStub, channel: grpc.aio.Channel) -> list[str]:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service

        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        replies = [r async for r in call]
        return [s.name for s in replies[0].list_services_response.service]

    assert SERVICE_NAME == "kvmesh.v1.CacheStore"
    services = run_with_store(body)
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= set(services)


def test_stop_reports_not_serving_and_wait_for_serving() -> None:
    async def main() -> None:
        running = await serve(CacheStoreConfig(port=0))
        await wait_for_serving(running.address, timeout_s=10)
        await running.stop(grace_s=1.0)
        await running.stop(grace_s=1.0)  # idempotent
        # Asked of the servicer itself: the server no longer answers once stopped.
        reply = await running.health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME), None)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(TimeoutError, match="not SERVING"):
            await wait_for_serving(running.address, timeout_s=0.3)

    asyncio.run(main())


_SERVE_UNTIL_SIGNAL = """
import asyncio
from cache_store.server import CacheStoreConfig, serve
from kvmesh.mesh.server import install_signal_handlers

async def main() -> None:
    running = await serve(CacheStoreConfig(port=0))
    install_signal_handlers(asyncio.get_running_loop(), lambda: running.stop(1.0))
    print(running.address, flush=True)
    await running.wait_for_termination()

asyncio.run(main())
"""


def test_sigterm_stops_the_process_cleanly() -> None:
    process = subprocess.Popen(
        [sys.executable, "-c", _SERVE_UNTIL_SIGNAL],
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        address = process.stdout.readline().strip()
        asyncio.run(wait_for_serving(address, timeout_s=20))
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_config_rejects_expiry_below_heartbeat() -> None:
    with pytest.raises(ValueError, match="heartbeat_interval_ms"):
        CacheStoreConfig(heartbeat_interval_ms=500, expiry_ms=500)
