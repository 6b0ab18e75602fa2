"""Adversarial tests (session 5, advlife): a create whose answer was lost, looked up while the
lookups themselves fail."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

import voiceapi
from voiceapi.testing import KlingEmulator

from .conftest import FAST_RETRY


@pytest.fixture
async def lenient_emu(
        _emulator_bugs_fail_the_test: set[int]) -> AsyncIterator[KlingEmulator]:
    """A server that does not refuse a repeated external_task_id (kling-api.md §11.1 leaves
    it open): a second POST of the same create is a second, billed voice."""
    async with KlingEmulator(unique_external_ids=False, task_seconds=0.1) as e:
        yield e


@pytest.mark.parametrize(("code", "times"), [(1302, 3), (1303, 3), (1004, 2), (1003, 2)])
async def test_a_lookup_refused_after_a_lost_create_never_resends_it_blind(
        lenient_emu: KlingEmulator, code: int, times: int) -> None:
    # The create lands but is answered 5000. The lookup that must settle it is refused (rate
    # limit, or a token refused twice) until its own retries are spent. Before, the create's
    # retry loop read that refusal as its own ("refused: resend") and POSTed again: two tasks.
    emu = lenient_emu
    async with voiceapi.AsyncVoiceClient(emu.access_key, emu.secret_key, base_url=emu.base_url,
                                         retry_policy=FAST_RETRY, timeout=5,
                                         max_retries=2) as client:
        emu.inject("create", "commit_then_5000")
        emu.inject("get", code, times=times)
        task = await client.custom_voices.create(voice_name="n", voice_url=emu.sample_url())
    assert emu.count("create") == 1
    assert emu.stats()["tasks_per_external_id"] == {"1": 1}
    (only,) = emu.tasks()
    assert task.task_id == only["task_id"]


async def test_a_lookup_that_keeps_failing_ends_in_an_unknown_outcome_not_a_resend(
        lenient_emu: KlingEmulator) -> None:
    emu = lenient_emu
    async with voiceapi.AsyncVoiceClient(emu.access_key, emu.secret_key, base_url=emu.base_url,
                                         retry_policy=FAST_RETRY, timeout=5, max_retries=2,
                                         retry_budget=5) as client:
        emu.inject("create", "commit_then_5000")
        emu.inject("get", 1302, times=1000)
        with pytest.raises(voiceapi.VoiceAPIError) as info:
            await client.custom_voices.create(voice_name="n", voice_url=emu.sample_url())
    assert emu.count("create") == 1
    # The caller learns that the create may exist (look it up before creating it again).
    assert isinstance(info.value, voiceapi.APIConnectionError)
    assert "may exist" in str(info.value)
