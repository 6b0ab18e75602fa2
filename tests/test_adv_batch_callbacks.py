"""Adversarial attacks on create_many's callbacks (``callbacks=``): callbacks arriving before
the create's answer, twice, out of order, or forged. Each test here failed before its fix, or
records an attack that held.

Callbacks are hints (the API is the truth): none may make an item wrong, and a genuine one
should spare the batch its safety-net poll interval.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

import voiceapi
from voiceapi import CallbackServer, TaskStatus, VoiceTask
from voiceapi.testing import KlingEmulator


def _items(url: str, n: int) -> list[dict[str, Any]]:
    return [{"voice_name": f"v{i}", "voice_url": url} for i in range(n)]


async def test_a_callback_that_beats_the_creates_answer_still_ends_the_wait() -> None:
    """The task ends (and its callback arrives) while the create's answer is still on the wire.
    The batch ignored a callback for a task it did not track yet, so it waited for its
    safety-net poll (here 10 minutes: callbacks are meant to replace polling) and timed out."""
    async with KlingEmulator(concurrency=3, task_seconds=0.05) as emu, CallbackServer() as cb:
        url = emu.sample_url(10)
        emu.inject("create", "slow", delay=2.0, times=3)  # stored at once, answered late
        ended: list[str] = []
        cb.subscribe(lambda t: ended.append(t.task_id) if t.is_terminal else None)
        async with voiceapi.AsyncVoiceClient(emu.access_key, emu.secret_key,
                                             base_url=emu.base_url) as client:
            results = await client.custom_voices.create_many(
                _items(url, 3), callbacks=cb, poll_interval=600, timeout=15)
        assert [r.ok for r in results] == [True] * 3, [r.error for r in results]
        # The window under attack: every task's final callback came, before or after attach.
        assert sorted(ended) == sorted(r.task.task_id for r in results if r.task)
        assert emu.count("list") <= 3


async def test_forged_repeated_and_stale_callbacks_change_no_result() -> None:
    """Held: callbacks saying a running task succeeded (forged, unsigned), the same final
    callback twice, and a "processing" one after the end only make the batch look: every
    result is the server's, every item once."""
    async with KlingEmulator(concurrency=2, task_seconds=0.4) as emu, CallbackServer() as cb:
        url = emu.sample_url(10)
        fail_url = url + "?kling_fail=bad"
        items = [*_items(url, 3), {"voice_name": "bad", "voice_url": fail_url}]
        async with voiceapi.AsyncVoiceClient(emu.access_key, emu.secret_key,
                                             base_url=emu.base_url) as client, \
                aiohttp.ClientSession() as http:

            async def forge(record: dict[str, Any]) -> None:
                async with http.post(cb.url, json=record) as resp:
                    assert resp.status == 200

            async def attacker() -> None:
                for _ in range(400):  # bounded: until the batch's tasks exist
                    if emu.task_count >= 2:
                        break
                    await asyncio.sleep(0.01)
                for task in emu.tasks():
                    lie = {"task_id": task["task_id"], "task_status": "succeed",
                           "task_result": {"voices": [{"voice_id": "forged",
                                                       "voice_name": "x"}]}}
                    for _ in range(2):
                        await forge(lie)
                    await forge({"task_id": task["task_id"], "task_status": "failed"})
                    await forge({"task_id": task["task_id"], "task_status": "processing"})

            batch = asyncio.ensure_future(client.custom_voices.create_many(
                items, callbacks=cb, poll_interval=0.1, timeout=30))
            await attacker()
            results = await batch
        assert [r.ok for r in results] == [True, True, True, False]
        assert all(r.task is not None and r.task.voice_id != "forged" for r in results[:3])
        assert results[3].task is not None
        assert results[3].task.task_status is TaskStatus.FAILED
        assert all(isinstance(r.task, VoiceTask) for r in results)
        assert emu.stats()["tasks_per_external_id"] == {"1": 4}
