"""Adversarial tests (session 5, advlife): a create whose answer was lost, looked up while the
lookups themselves fail."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

import voiceapi
from tests._raw_server import raw_server
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


def _answer_ok(writer: asyncio.StreamWriter, data: dict[str, object]) -> None:
    """A 200 with a success envelope around ``data``."""
    body = json.dumps({"code": 0, "message": "SUCCEED", "request_id": "r",
                       "data": data}).encode()
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


async def test_a_create_answered_about_another_task_is_never_adopted() -> None:
    # The POST itself is answered with someone else's task (a cache or a misrouting gateway):
    # before, create() returned it, and the caller went on to wait for a stranger's voice.
    other: dict[str, object] = {"task_id": "999", "task_status": "succeed",
                                "task_info": {"external_task_id": "someone-else"}}

    async def answer(method: str, target: str, writer: asyncio.StreamWriter) -> bool:
        if method == "POST":
            payload: dict[str, object] = other
        else:  # the lookup by our own external id finds our task
            payload = {"task_id": "1", "task_status": "submitted",
                       "task_info": {"external_task_id": target.rsplit("/", 1)[1]}}
        _answer_ok(writer, payload)
        return True

    async with raw_server(answer) as (base, seen), voiceapi.AsyncVoiceClient(
            api_key="k" * 24, base_url=base, retry_policy=FAST_RETRY, timeout=5) as client:
        task = await client.custom_voices.create(voice_name="n", voice_url="https://x/a.wav",
                                                 external_task_id="mine-1")
    assert (task.task_id, task.external_task_id) == ("1", "mine-1")
    assert seen.count("POST") == 1 and seen.count("GET") >= 1


async def test_a_create_answer_with_our_id_as_a_number_is_ours() -> None:
    async def answer(method: str, target: str, writer: asyncio.StreamWriter) -> bool:
        _answer_ok(writer, {"task_id": 7, "task_status": "submitted",
                            "task_info": {"external_task_id": 12345}})
        return True

    async with raw_server(answer) as (base, seen), voiceapi.AsyncVoiceClient(
            api_key="k" * 24, base_url=base, retry_policy=FAST_RETRY, timeout=5) as client:
        task = await client.custom_voices.create(voice_name="n", voice_url="https://x/a.wav",
                                                 external_task_id="12345")
    assert task.external_task_id == "12345" and seen.count("POST") == 1
    assert seen.count("GET") == 0
