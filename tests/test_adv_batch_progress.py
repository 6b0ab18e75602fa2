"""Adversarial ``on_progress`` callbacks (advbatch): ones that raise, that are slow, that call
back into the client. Every attack here held; they record the behaviour: a raising callback's
own exception ends the batch (nothing left running, a journal rerun creates nothing twice), a
slow one only slows reports, and a blocking client called from it is refused, not deadlocked.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import voiceapi
from voiceapi import BatchProgress
from voiceapi.testing import KlingEmulator


def _items(url: str, n: int) -> list[dict[str, Any]]:
    return [{"voice_name": f"v{i}", "voice_url": url} for i in range(n)]


class Boom(Exception):
    pass


async def test_a_raising_callback_ends_the_batch_and_the_rerun_creates_nothing_twice(
        tmp_path: Path) -> None:
    journal = str(tmp_path / "batch.journal")
    async with KlingEmulator(concurrency=3, task_seconds=0.3,
                             unique_external_ids=False) as emu, \
            voiceapi.AsyncVoiceClient(emu.access_key, emu.secret_key,
                                      base_url=emu.base_url) as client:
        url = emu.sample_url(10)

        def explode(p: BatchProgress) -> None:
            if p.submitted + p.processing >= 2:
                raise Boom("my callback is wrong")

        with pytest.raises(Boom):
            await client.custom_voices.create_many(_items(url, 8), journal=journal,
                                                   on_progress=explode, poll_interval=0.05)
        results = await client.custom_voices.create_many(_items(url, 8), journal=journal,
                                                         poll_interval=0.05, timeout=30)
        assert [r.ok for r in results] == [True] * 8, [r.error for r in results]
        assert emu.stats()["tasks_per_external_id"] == {"1": 8}


async def test_a_slow_callback_and_one_that_calls_the_client_change_no_result() -> None:
    async with KlingEmulator(concurrency=3, task_seconds=0.2) as emu, \
            voiceapi.AsyncVoiceClient(emu.access_key, emu.secret_key,
                                      base_url=emu.base_url) as client:
        url = emu.sample_url(10)
        calls: list[asyncio.Future[Any]] = []
        reports: list[BatchProgress] = []

        def slow_and_curious(p: BatchProgress) -> None:
            reports.append(p)
            time.sleep(0.1)  # blocks the loop: a slow callback, as users write them
            calls.append(asyncio.ensure_future(client.custom_voices.list(page_size=5)))

        results = await client.custom_voices.create_many(
            _items(url, 6), on_progress=slow_and_curious, poll_interval=0.05, timeout=30)
        listed = await asyncio.gather(*calls)
    assert [r.ok for r in results] == [True] * 6
    assert reports[-1].succeeded == 6 and reports[-1].done == reports[-1].total == 6
    assert all(isinstance(page, list) for page in listed)
    assert emu.stats()["tasks_per_external_id"] == {"1": 6}


def test_a_blocking_client_called_from_its_own_callback_is_refused_not_deadlocked() -> None:
    with KlingEmulator(concurrency=3, task_seconds=0.1) as emu, \
            voiceapi.VoiceClient(api_key=emu.api_key, base_url=emu.base_url) as client:
        seen: list[BaseException] = []

        def reenter(p: BatchProgress) -> None:
            try:
                client.custom_voices.list(page_size=5)
            except RuntimeError as exc:
                seen.append(exc)

        out: list[Any] = []
        worker = threading.Thread(target=lambda: out.append(client.custom_voices.create_many(
            _items(emu.sample_url(10), 4), on_progress=reenter, timeout=30)))
        worker.start()
        worker.join(60)
        assert not worker.is_alive()
    assert [r.ok for r in out[0]] == [True] * 4
    assert seen and all("deadlock" in str(e) for e in seen)
