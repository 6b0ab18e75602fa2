"""Smaller promises: env-driven logging, wait() on unknown statuses, the pytest fixture."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from aioresponses import aioresponses

import voiceapi
from tests.conftest import BASE, FAST_RETRY, envelope, task_json
from voiceapi.testing import KlingEmulator

LOG_SCRIPT = """
import asyncio, voiceapi
from voiceapi.testing import KlingEmulator
async def main():
    async with KlingEmulator() as emu:
        async with voiceapi.AsyncVoiceClient(api_key=emu.api_key, base_url=emu.base_url) as c:
            await c.preset_voices.list(page_size=1)
asyncio.run(main())
"""


def test_voiceapi_log_env_prints_one_line_per_attempt() -> None:
    env = {"VOICEAPI_LOG": "info", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", LOG_SCRIPT], capture_output=True, text=True,
                         timeout=60, env=env, check=True)
    lines = [line for line in out.stderr.splitlines() if "voiceapi" in line]
    assert len(lines) == 1
    assert "GET /v1/general/presets-voices -> 200 code=0 request_id=" in lines[0]
    assert "Bearer" not in out.stderr


async def test_wait_on_an_unknown_status_ends_at_the_deadline(
        mocked: aioresponses, mock_client: voiceapi.AsyncVoiceClient) -> None:
    mocked.get(f"{BASE}/v1/general/custom-voices/1", repeat=True,
               payload=envelope(task_json("1", status="queued-for-review")))
    start = time.monotonic()
    with pytest.raises(voiceapi.WaitTimeoutError) as info:
        await mock_client.custom_voices.wait("1", timeout=0.3, poll_interval=0.02)
    # Ends at its deadline instead of polling an unknown status for ever; the bound only has
    # to tell those apart (2 s could be hit by a loaded machine).
    assert time.monotonic() - start < 60
    assert info.value.task is not None
    assert info.value.task.task_status is voiceapi.TaskStatus.UNKNOWN


def test_pytest_fixture_is_registered(kling_emulator: KlingEmulator) -> None:
    with voiceapi.VoiceClient(api_key=kling_emulator.api_key,
                              base_url=kling_emulator.base_url,
                              retry_policy=FAST_RETRY) as client:
        assert len(client.preset_voices.list(page_size=4)) == 4


async def test_requests_per_second_limit_paces_calls(emu: KlingEmulator) -> None:
    async with voiceapi.AsyncVoiceClient(api_key=emu.api_key, base_url=emu.base_url,
                                         max_requests_per_second=20) as client:
        start = time.monotonic()
        for _ in range(6):
            await client.preset_voices.list(page_size=1)
        elapsed = time.monotonic() - start
    assert elapsed >= 5 / 20 * 0.9  # six calls need five intervals of 50 ms

