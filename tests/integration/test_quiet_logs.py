"""Expected events log quietly: a client that cancels, a storm of cancellations, a cache store restart
(every worker's KV-event stream reconnects) and a shutdown leave nothing at ERROR and no traceback in any
role's log (the roles share this process's logging)."""

from __future__ import annotations

import contextlib
import gc
import random
import threading
import time
from pathlib import Path

import grpc
import pytest

from gateway.routing_cost import RoutingConfig
from kvmesh.client import Client
from kvmesh.mesh.telemetry import setup_telemetry
from kvmesh.v1 import gateway_pb2
from tests.loud_logs import loud, recorded_logs
from tests.mesh_harness import MeshInThread, MeshSpec

PREFIX = "import os\n\ndef read_config(path):\n    with open(path) as f:\n        "
SUFFIX = "\n    return config\n"


@pytest.fixture(scope="module")
def model_path(mesh_model_path: Path) -> Path:
    setup_telemetry("kvmesh-tests")  # as `kvmesh serve` does: traced servers and channels
    return mesh_model_path


def complete(address: str, prefix: str, max_tokens: int = 4) -> None:
    with Client(address, timeout_s=60) as client:
        list(client.complete(prefix=prefix, suffix=SUFFIX, max_tokens=max_tokens))


def cancel_storm(address: str, num_calls: int, seed: int) -> None:
    """num_calls completions, each cancelled at a random point: before prefill, during it, mid-stream."""
    rng = random.Random(seed)
    with Client(address) as client:
        stub = client._stub

        def cancel_one(i: int) -> None:
            request = gateway_pb2.CompleteRequest(prefix=PREFIX * 6 + str(i), suffix=SUFFIX)
            request.sampling.max_tokens = 40
            call = stub.Complete(request, timeout=30)
            if rng.random() < 0.5:
                with contextlib.suppress(grpc.RpcError):  # a full pool sheds load: also expected
                    for _ in range(rng.randint(1, 4)):
                        next(call, None)
            else:
                time.sleep(rng.uniform(0, 0.02))
            call.cancel()

        threads = [threading.Thread(target=cancel_one, args=(i,)) for i in range(num_calls)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()


@pytest.mark.parametrize("transport", ["shm", "grpc"])
def test_cancels_resets_and_reconnects_log_no_error_and_no_traceback(
    model_path: Path, transport: str
) -> None:
    spec = MeshSpec(
        str(model_path), num_blocks=1024, routing=RoutingConfig(transport=transport, disagg_min_tokens=0)
    )
    with recorded_logs() as records:
        with MeshInThread(spec) as mesh:
            address = mesh.gateway_address
            complete(address, PREFIX * 6)
            # One client that reads a few tokens and goes away, then a storm of them.
            cancel_storm(address, 1, seed=1)
            cancel_storm(address, 40, seed=2)
            # The cache store restarts: every worker's KV-event stream breaks and reconnects.
            mesh.run(mesh.restart_cache_store())
            mesh.run(mesh._wait_for_workers())
            time.sleep(0.5)
            complete(address, PREFIX * 6 + "x")
            cancel_storm(address, 10, seed=3)
            complete(address, PREFIX)
            # Dropped generators and tasks are finalized (and would complain) when collected.
            gc.collect()
            time.sleep(0.5)
        gc.collect()
    assert not loud(records), "\n".join(loud(records))
    assert any(r.name.startswith(("gateway", "kvmesh", "decode", "prefill", "cache")) for r in records), (
        "the premise: the roles' records reach the recorder"
    )
