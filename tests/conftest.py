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
import os
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any

import aioresponses.core
import pytest
from aiohttp import ClientResponse, web
from aiohttp.abc import AbstractStreamWriter
from hypothesis import HealthCheck, settings

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

# --- hypothesis profiles -------------------------------------------------------------------
# "quick" (the default) keeps a plain `pytest` run fast on a small machine; CI sets
# HYPOTHESIS_PROFILE=thorough for ten times the examples. No deadlines: on a shared 2-core
# machine a slow example is load, not a bug. A test that needs a size of its own uses
# `scaled_examples(n)` (n in the quick profile) instead of a fixed max_examples, so the profile
# still scales it.
HYPOTHESIS_PROFILES: dict[str, int] = {"quick": 200, "thorough": 2000}
for _name, _examples in HYPOTHESIS_PROFILES.items():
    settings.register_profile(_name, max_examples=_examples, deadline=None, print_blob=True,
                              suppress_health_check=[HealthCheck.too_slow])


def load_hypothesis_profile(environ: Mapping[str, str] = os.environ) -> str:
    """Load the profile named by HYPOTHESIS_PROFILE (default "quick"); return its name."""
    name = environ.get("HYPOTHESIS_PROFILE", "").strip() or "quick"
    if name not in HYPOTHESIS_PROFILES:
        raise pytest.UsageError(f"HYPOTHESIS_PROFILE must be one of "
                                f"{sorted(HYPOTHESIS_PROFILES)}, got {name!r}")
    settings.load_profile(name)
    return name


def scaled_examples(quick: int) -> int:
    """``quick`` examples under the quick profile, proportionally more under thorough."""
    return max(1, quick * int(settings().max_examples) // HYPOTHESIS_PROFILES["quick"])


load_hypothesis_profile()


# --- the quick default run ----------------------------------------------------------------
SLOW_TESTS_ENV = "VOICEAPI_SLOW_TESTS"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``slow`` (real worker processes, long scenarios) run when
    VOICEAPI_SLOW_TESTS=1, as CI does; the default run stays quick for everyday work."""
    if os.environ.get(SLOW_TESTS_ENV, "").strip() in ("1", "true", "yes"):
        return
    skip = pytest.mark.skip(reason=f"slow: set {SLOW_TESTS_ENV}=1 to run it (CI does)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)

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
def _emulator_bugs_fail_the_test(monkeypatch: pytest.MonkeyPatch) -> Iterator[set[int]]:
    """Every emulator a test starts (not only the fixtures') is checked for internal errors
    when the test ends, so an emulator bug cannot hide behind the SDK retrying its 5000.

    Yields the ids of emulators a fixture has checked already (one report per bug)."""
    started: list[KlingEmulator] = []
    checked: set[int] = set()
    original = KlingEmulator.start

    async def start(self: KlingEmulator) -> None:
        started.append(self)
        await original(self)

    monkeypatch.setattr(KlingEmulator, "start", start)
    yield checked
    for emulator in started:
        if id(emulator) not in checked:
            fail_on_internal_errors(emulator)


@pytest.fixture
async def emu(_emulator_bugs_fail_the_test: set[int]) -> AsyncIterator[KlingEmulator]:
    """A fresh emulator on the test's loop; the test fails if the emulator hit its own bug."""
    async with KlingEmulator(concurrency=5, task_seconds=0.1) as e:
        yield e
    _emulator_bugs_fail_the_test.add(id(e))
    fail_on_internal_errors(e)


#: Readings of the API the SDK must survive (kling-api.md §11.1), as KlingEmulator options.
#: Parametrize over them (or use the ``reading_emu`` fixture) to prove a feature under each.
EMULATOR_READINGS: dict[str, dict[str, Any]] = {
    "default": {},
    "strict-real": {"profile": "strict-real"},
    "oldest-first-500": {"list_order": "oldest", "max_page_size": 500},
    "deleted-dropped-no-status": {"deleted_voices": "drop", "voice_status": False},
    "numeric-money-null-voices": {"numeric_money": True, "pending_voices": "null"},
    # The older guess: the server refuses a voice_url without a media extension.
    "no-task-result-until-done": {"pending_voices": "absent", "check_url_extension": True},
    "repeats-accepted": {"unique_external_ids": False},
}


@pytest.fixture(params=sorted(EMULATOR_READINGS))
async def reading_emu(request: pytest.FixtureRequest,
                      _emulator_bugs_fail_the_test: set[int]) -> AsyncIterator[KlingEmulator]:
    """Like ``emu``, once per reading in EMULATOR_READINGS (the test id names the reading)."""
    async with KlingEmulator(concurrency=5, task_seconds=0.1,
                             **EMULATOR_READINGS[request.param]) as e:
        yield e
    _emulator_bugs_fail_the_test.add(id(e))
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
