"""Running roles: one in this process (`kvmesh serve`), or all four as child processes (`kvmesh up`).

A served role prints exactly one line to stdout once it is SERVING, `kvmesh: <role> serving on
<host:port>`; `kvmesh up` starts each role as `python -m kvmesh.cli serve ROLE` and waits for that line.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import logging
import os
import re
import secrets
import shutil
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpc_health.v1 import health_pb2

from kvmesh.cli.settings import RoleSettings
from kvmesh.mesh.server import RunningServer, ServerConfig, install_signal_handlers
from kvmesh.mesh.telemetry import setup_telemetry, start_metrics_server

logger = logging.getLogger(__name__)

SERVING_LINE = re.compile(r"^kvmesh: (?P<role>[\w-]+) serving on (?P<address>\S+)$")
STDERR_TAIL_LINES = 20
STOP_TIMEOUT_S = ServerConfig().grace_s + 5.0
"""Seconds a child of `kvmesh up` gets to stop after SIGTERM (its grace period and a margin) before SIGKILL."""


def serving_line(role: str, address: str) -> str:
    return f"kvmesh: {role} serving on {address}"


async def _start_role(settings: RoleSettings) -> RunningServer:
    # Role modules are imported only for the role being run: the cache store must not pay for torch.
    config = settings.config
    if settings.role == "cache-store":
        from cache_store.server import serve as serve_cache_store

        if settings.metrics_port is not None:  # its config has no metrics port; the others serve their own
            start_metrics_server(settings.metrics_port, settings.metrics_host)
        return await serve_cache_store(config)  # type: ignore[arg-type]
    if settings.role == "gateway":
        from gateway.server import serve as serve_gateway

        return await serve_gateway(config)  # type: ignore[arg-type]
    import torch

    if settings.num_threads is not None:
        torch.set_num_threads(settings.num_threads)
    if settings.role == "prefill":
        from prefill_service.server import serve as serve_prefill

        return await serve_prefill(config)  # type: ignore[arg-type]
    from decode_service.server import serve as serve_decode

    return await serve_decode(config)  # type: ignore[arg-type]


async def _until_serving(running: RunningServer, period_s: float = 0.05) -> None:
    request = health_pb2.HealthCheckRequest(service="")
    while True:
        reply = await running.health.Check(request, None)
        if reply.status == health_pb2.HealthCheckResponse.SERVING:
            return
        await asyncio.sleep(period_s)


async def serve_role(settings: RoleSettings, announce: Callable[[str], None]) -> None:
    """Runs one role until SIGTERM/SIGINT, then stops it with its configured grace.

    announce gets the serving line once health is SERVING (the gateway: once a decode worker is live).
    """
    setup_telemetry(f"kvmesh-{settings.role}")
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()

    async def request_stop() -> None:
        stop_requested.set()

    # Installed before the (slow) start, so a SIGTERM while the model loads still ends in a clean stop.
    install_signal_handlers(loop, request_stop)
    running = await _start_role(settings)
    grace_s = _grace_s(settings)
    serving = asyncio.create_task(_until_serving(running))
    stopping = asyncio.create_task(stop_requested.wait())
    try:
        done, _ = await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if serving in done:
            announce(serving_line(settings.role, running.address))
            await stopping
    finally:
        serving.cancel()
        stopping.cancel()
        await running.stop(grace_s)


def _grace_s(settings: RoleSettings) -> float:
    server = getattr(settings.config, "server", None)
    return server.grace_s if server is not None else settings.config.grace_s  # type: ignore[union-attr]


class MeshError(RuntimeError):
    """A role of `kvmesh up` failed to start or died; the message names it and quotes its stderr."""


@dataclass
class _Child:
    role: str
    process: asyncio.subprocess.Process
    address: asyncio.Future[str]
    stderr_tail: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=STDERR_TAIL_LINES)
    )
    forward_stderr: bool = False
    """After start-up, a child's log lines go to our stderr as they come, prefixed with its role."""
    readers: list[asyncio.Task[None]] = field(default_factory=list)

    def tail(self) -> str:
        lines = "\n".join(f"  {line}" for line in self.stderr_tail)
        return (
            f"last stderr lines of {self.role}:\n{lines}" if lines else f"{self.role} wrote nothing to stderr"
        )


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it if `kvmesh up` dies without stopping it (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


class LocalMesh:
    """The four roles as `kvmesh serve` child processes on loopback.

    start() brings them up (cache store first, then the others pointed at it) and returns the gateway's
    address; wait() returns when a child dies (raising MeshError); stop() stops them all, gateway first.
    """

    def __init__(
        self,
        *,
        port: int,
        model_path: str,
        transport: str = "auto",
        log_level: str = "warning",
        startup_timeout_s: float = 180.0,
        environ: dict[str, str] | None = None,
        mutual_tls: bool = True,
    ) -> None:
        """mutual_tls: the roles talk mutual TLS, with certificates from a throwaway CA made in a private
        temporary directory that stop() removes; False: plaintext."""
        self._port = port
        self._mutual_tls = mutual_tls
        self._tls_dir: Path | None = None
        self._model_path = model_path
        self._transport = transport
        self._log_level = log_level
        self._startup_timeout_s = startup_timeout_s
        self._environ = dict(environ if environ is not None else os.environ)
        self._children: dict[str, _Child] = {}
        self._salt_secret_file: Path | None = None
        """A secret this mesh generated for tenant salts; removed by stop()."""

    def _ensure_salt_secret(self) -> None:
        """With multi-tenancy on (KVMESH_API_KEYS_FILE) and no KVMESH_SALT_SECRET_FILE, writes a random
        secret to a private (0600) temp file for the gateway: salts, and so caches, last as long as the
        mesh."""
        if not self._environ.get("KVMESH_API_KEYS_FILE") or self._environ.get("KVMESH_SALT_SECRET_FILE"):
            return
        fd, name = tempfile.mkstemp(prefix="kvmesh-salt-", suffix=".key")  # mkstemp: mode 0600
        with os.fdopen(fd, "w") as file:
            file.write(secrets.token_hex(32))
        self._salt_secret_file = Path(name)
        self._environ["KVMESH_SALT_SECRET_FILE"] = name

    async def start(self) -> str:
        """Starts every role and waits until each is SERVING; raises MeshError naming the one that failed."""
        self._ensure_salt_secret()
        try:
            tls = ["--tls-dir", str(self._make_certs())] if self._mutual_tls else []
            store = await self._spawn("cache-store", ["--port", "0", *tls])
            store_address = await self._wait_serving(store)
            common = ["--cache-store", store_address, "--model", self._model_path, *tls]
            workers = [
                await self._spawn(role, ["--port", "0", *common, "--threads", "1"])
                for role in ("prefill", "decode")
            ]
            gateway = await self._spawn(
                "gateway", ["--port", str(self._port), *common, "--transport", self._transport]
            )
            addresses = await asyncio.gather(*(self._wait_serving(child) for child in (*workers, gateway)))
        except BaseException:
            await self.stop()
            raise
        for child in self._children.values():
            child.forward_stderr = True
        return addresses[-1]

    async def wait(self) -> None:
        """Returns never while all children run; raises MeshError when one exits."""
        waits = {asyncio.create_task(child.process.wait()): child for child in self._children.values()}
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
        child = waits[next(iter(done))]
        raise MeshError(f"{child.role} exited with code {child.process.returncode}")

    async def stop(self) -> None:
        """SIGTERM each child, gateway first, cache store last; SIGKILL one that outlives its grace."""
        order = ("gateway", "decode", "prefill", "cache-store")
        for role in sorted(self._children, key=order.index):
            await self._stop_child(self._children[role])
        for child in self._children.values():
            for reader in child.readers:
                reader.cancel()
            await asyncio.gather(*child.readers, return_exceptions=True)
        self._children.clear()
        if self._tls_dir is not None:
            shutil.rmtree(self._tls_dir, ignore_errors=True)
            self._tls_dir = None
        if self._salt_secret_file is not None:
            self._salt_secret_file.unlink(missing_ok=True)
            self._environ.pop("KVMESH_SALT_SECRET_FILE", None)
            self._salt_secret_file = None

    def _make_certs(self) -> Path:
        """A throwaway CA and a certificate per role, in a new directory only this user can read."""
        from kvmesh.mesh.tls import make_mesh_certs

        self._tls_dir = Path(tempfile.mkdtemp(prefix="kvmesh-tls-"))  # mkdtemp: mode 0700
        return make_mesh_certs(self._tls_dir)

    async def _spawn(self, role: str, args: Sequence[str]) -> _Child:
        command = [sys.executable, "-m", "kvmesh.cli", "serve", role, "--log-level", self._log_level, *args]
        # The children import the project the way this process did, installed or not.
        project_root = str(Path(__file__).resolve().parent.parent)
        environ = dict(self._environ)
        environ["PYTHONPATH"] = os.pathsep.join(p for p in (project_root, environ.get("PYTHONPATH", "")) if p)
        process = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=environ,
            # Their own session: a Ctrl-C reaches `kvmesh up` alone, which then stops them in order.
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        child = _Child(role, process, asyncio.get_running_loop().create_future())
        child.readers = [
            asyncio.create_task(self._read_stdout(child)),
            asyncio.create_task(self._read_stderr(child)),
        ]
        self._children[role] = child
        return child

    async def _wait_serving(self, child: _Child) -> str:
        exited = asyncio.create_task(child.process.wait())
        either: set[asyncio.Future[Any]] = {child.address, exited}
        try:
            done, _ = await asyncio.wait(
                either, timeout=self._startup_timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            exited.cancel()
        if child.address in done:
            return child.address.result()
        if exited in done:
            await asyncio.gather(*child.readers, return_exceptions=True)  # the last stderr lines
            raise MeshError(
                f"{child.role} exited with code {child.process.returncode} before SERVING; {child.tail()}"
            )
        raise MeshError(
            f"{child.role} did not report SERVING within {self._startup_timeout_s:g} s; {child.tail()}"
        )

    async def _read_stdout(self, child: _Child) -> None:
        assert child.process.stdout is not None
        async for raw in child.process.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            match = SERVING_LINE.match(line)
            if match and match["role"] == child.role and not child.address.done():
                child.address.set_result(match["address"])
            elif line:
                print(f"[{child.role}] {line}", file=sys.stderr, flush=True)

    async def _read_stderr(self, child: _Child) -> None:
        # Drained continuously: a child blocked on a full pipe would look hung.
        assert child.process.stderr is not None
        async for raw in child.process.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            child.stderr_tail.append(line)
            if child.forward_stderr:
                print(f"[{child.role}] {line}", file=sys.stderr, flush=True)

    async def _stop_child(self, child: _Child) -> None:
        if child.process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            child.process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(child.process.wait(), timeout=STOP_TIMEOUT_S)
        except TimeoutError:
            logger.warning("%s did not stop within its grace period; killing it", child.role)
            with contextlib.suppress(ProcessLookupError):
                child.process.kill()
            await child.process.wait()


async def run_until_signal(main: Awaitable[None]) -> bool:
    """Runs main until it ends or SIGINT/SIGTERM arrives; True when a signal ended it."""
    loop = asyncio.get_running_loop()
    signalled = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, signalled.set)
    main_task = asyncio.ensure_future(main)
    signal_task = asyncio.create_task(signalled.wait())
    try:
        await asyncio.wait({main_task, signal_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        signal_task.cancel()
        if not main_task.done():
            main_task.cancel()
            await asyncio.gather(main_task, return_exceptions=True)
    if signalled.is_set():
        return True
    main_task.result()  # re-raises main's error
    return False
