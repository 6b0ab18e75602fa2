"""Run the Kling emulator in its own process, so its CPU is never billed to the client measured.

``python -m voiceapi.testing`` (no click needed) prints one JSON line with the base URL and
credentials, and serves ``GET /_emulator/stats`` with what the server saw.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from typing import Any

import attrs


@attrs.frozen
class Emulator:
    """Where a running emulator process listens and how to authenticate against it."""

    base_url: str
    access_key: str
    secret_key: str
    api_key: str

    def stats(self) -> dict[str, Any] | None:
        """What the server saw (``GET /_emulator/stats``), or None on emulators without it."""
        try:
            with urllib.request.urlopen(self.base_url + "/_emulator/stats", timeout=10) as resp:
                data: dict[str, Any] = json.loads(resp.read())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) and "in_progress" in data else None


def command(concurrency: int, task_seconds: float) -> list[str]:
    # A 100k-item batch sends millions of requests: keep the emulator's request log small.
    return [sys.executable, "-m", "voiceapi.testing", "--port", "0", "--concurrency",
            str(concurrency), "--task-seconds", str(task_seconds),
            "--max-recorded-requests", "1000"]


@contextlib.contextmanager
def emulator(concurrency: int, task_seconds: float) -> Iterator[Emulator]:
    """A fresh emulator (a fresh account) for the block; stopped by PID afterwards."""
    proc = subprocess.Popen(command(concurrency, task_seconds), stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        try:
            info = json.loads(line)
        except ValueError:
            raise RuntimeError(f"emulator did not start: {line!r}") from None
        yield Emulator(base_url=info["base_url"], access_key=info["access_key"],
                       secret_key=info["secret_key"], api_key=info["api_key"])
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
