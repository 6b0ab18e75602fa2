"""Shared fixtures.

aioresponses compatibility shim
-------------------------------
aioresponses 0.7.9 builds ``ClientResponse`` objects itself and does not pass the
``stream_writer`` argument that aiohttp 3.14 made required (pnuckowski/aioresponses#289, open).
Rather than pin aiohttp below 3.14 (which carries a security fix), we hand aioresponses a
``ClientResponse`` subclass whose ``stream_writer`` defaults to a stand-in reporting zero bytes
written — the only thing aiohttp reads from it for an already-sent request. Delete this shim
once aioresponses ships a fix.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aioresponses.core
import pytest
from aiohttp import ClientResponse, web
from aiohttp.abc import AbstractStreamWriter

import voiceapi
from voiceapi.testing import KlingEmulator
from voiceapi.testing._pytest_plugin import fail_on_internal_errors


class _SentStreamWriter:
    output_size = 0


class _CompatClientResponse(ClientResponse):
    def __init__(self, method: str, url: Any, *, stream_writer: AbstractStreamWriter | None = None,
                 **kw: Any) -> None:
        writer = stream_writer if stream_writer is not None else _SentStreamWriter()
        super().__init__(method, url, stream_writer=writer, **kw)  # type: ignore[arg-type]


aioresponses.core.ClientResponse = _CompatClientResponse  # type: ignore[attr-defined]

#: Backoff small enough for tests; the policy logic is unchanged.
FAST_RETRY = voiceapi.RetryPolicy(initial_delay=0.001, max_delay=0.01, rate_limit_min_delay=0.01,
                                  retry_after_max=0.05)
BASE = "https://kling.test"


@pytest.fixture
def mocked() -> Iterator[aioresponses.aioresponses]:
    with aioresponses.aioresponses() as m:
        yield m


@pytest.fixture
async def mock_client() -> AsyncIterator[voiceapi.AsyncVoiceClient]:
    async with voiceapi.AsyncVoiceClient("ak", "sk-secret-value", base_url=BASE,
                                         retry_policy=FAST_RETRY) as client:
        yield client


@pytest.fixture(autouse=True)
def _emulator_bugs_fail_the_test(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every emulator a test starts (not only the fixtures') is checked for internal errors
    when the test ends, so an emulator bug cannot hide behind the SDK retrying its 5000."""
    started: list[KlingEmulator] = []
    original = KlingEmulator.start

    async def start(self: KlingEmulator) -> None:
        started.append(self)
        await original(self)

    monkeypatch.setattr(KlingEmulator, "start", start)
    yield
    for emulator in started:
        fail_on_internal_errors(emulator)


@pytest.fixture
async def emu() -> AsyncIterator[KlingEmulator]:
    """A fresh emulator on the test's loop; the test fails if the emulator hit its own bug."""
    async with KlingEmulator(concurrency=5, task_seconds=0.1) as e:
        yield e
    fail_on_internal_errors(e)


@pytest.fixture
async def client(emu: KlingEmulator) -> AsyncIterator[voiceapi.AsyncVoiceClient]:
    async with voiceapi.AsyncVoiceClient(emu.access_key, emu.secret_key, base_url=emu.base_url,
                                         retry_policy=FAST_RETRY, timeout=5) as c:
        yield c


@contextlib.asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[str]:
    """Run a small aiohttp app on a loopback port for the block; yields its base URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def envelope(data: Any = None, code: int = 0, message: str = "SUCCEED",
             request_id: str = "rid-1") -> dict[str, Any]:
    out: dict[str, Any] = {"code": code, "message": message, "request_id": request_id}
    if data is not None:
        out["data"] = data
    return out


def task_json(task_id: str = "930801301486305328", status: str = "submitted",
              **extra: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"task_id": task_id, "task_status": status, "task_status_msg": "",
                           "task_info": {"external_task_id": "ext-1"},
                           "created_at": 1790605869865, "updated_at": 1790605869865}
    out.update(extra)
    return out
