"""Adversarial attacks on create_many's settings (issue: advbatch): caps above, at and below the
account's, timeouts shorter than a task, ``wait=False``, odd poll intervals, under each reading
of the API the emulator can play. Each test here failed before its fix, or records an attack
that held.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

import voiceapi
from voiceapi import NotSubmittedError, WaitTimeoutError
from voiceapi.testing import KlingEmulator

#: The readings of the API the batch must be right under (kling-api.md §11.1).
READINGS: list[dict[str, Any]] = [
    {"profile": "strict-real", "list_order": "newest"},
    {"profile": "strict-real", "list_order": "oldest"},
    {"unique_external_ids": False, "deleted_voices": "drop", "numeric_money": True,
     "list_order": "oldest", "pending_voices": "absent"},
]


def _items(url: str, n: int) -> list[dict[str, Any]]:
    return [{"voice_name": f"v{i}", "voice_url": url} for i in range(n)]


def _client(emu: KlingEmulator) -> voiceapi.AsyncVoiceClient:
    return voiceapi.AsyncVoiceClient(emu.access_key, emu.secret_key, base_url=emu.base_url)


@pytest.mark.parametrize("inf", [float("inf"), float("-inf")])
async def test_an_infinite_poll_interval_is_refused_up_front(inf: float) -> None:
    """``poll_interval=float("inf")`` passed the "> 0" check, then the batch never polled:
    with its slots full it waited for ever (no timeout given)."""
    async with KlingEmulator(concurrency=2, task_seconds=0.05) as emu, _client(emu) as client:
        with pytest.raises(voiceapi.ValidationError, match="poll_interval"):
            await asyncio.wait_for(client.custom_voices.create_many(
                _items(emu.sample_url(10), 4), poll_interval=inf, max_in_flight=2), 10)
        assert emu.count() == 0


@pytest.mark.parametrize("reading", READINGS, ids=["strict-newest", "strict-oldest", "loose"])
@pytest.mark.parametrize("ceiling", [None, 1, 3, 12])
async def test_any_ceiling_against_the_real_cap_creates_each_item_once(
        reading: dict[str, Any], ceiling: int | None) -> None:
    """Held: a ceiling above the account's real cap (3), at it, below it, 1, or none (learned):
    every item once, in input order, never above the cap, under each reading."""
    async with KlingEmulator(concurrency=3, task_seconds=0.1, **reading) as emu, \
            _client(emu) as client:
        url = emu.sample_url(10)
        items = _items(url, 10)
        results = await client.custom_voices.create_many(
            items, max_in_flight=ceiling, poll_interval=0.05, timeout=60)
        assert [r.input for r in results] == items
        assert [r.ok for r in results] == [True] * 10, [r.error for r in results]
        stats = emu.stats()
        assert stats["tasks_per_external_id"] == {"1": 10}
        assert stats["peak_in_progress"] <= (3 if ceiling is None else min(3, ceiling))


@pytest.mark.parametrize("reading", READINGS[1:], ids=["strict-oldest", "loose"])
async def test_timeouts_shorter_than_a_task_then_a_rerun_that_waits(
        reading: dict[str, Any]) -> None:
    """Held: ``item_timeout`` shorter than any task times every item out (their tasks keep
    their slots: never above the cap); ``timeout`` shorter than the batch leaves unsent items
    NotSubmittedError; a rerun with ``wait=False`` then one that waits re-attach every task
    and create none twice."""
    async with KlingEmulator(concurrency=2, task_seconds=0.6, **reading) as emu, \
            _client(emu) as client:
        url = emu.sample_url(10)
        coord = voiceapi.LocalCoordinator(4)
        first = await client.custom_voices.create_many(
            _items(url, 3), item_timeout=0.05, poll_interval=0.05, coordinator=coord)
        assert all(isinstance(r.error, WaitTimeoutError) for r in first), first
        second = await client.custom_voices.create_many(
            _items(url, 8), timeout=0.3, poll_interval=0.05, coordinator=coord)
        assert all(r.ok or isinstance(r.error, (WaitTimeoutError, NotSubmittedError))
                   for r in second), [r.error for r in second]
        assert isinstance(second[-1].error, NotSubmittedError)
        third = await client.custom_voices.create_many(
            _items(url, 8), wait=False, poll_interval=0.05, coordinator=coord, timeout=60)
        assert all(r.error is None and r.task is not None for r in third), third
        last = await client.custom_voices.create_many(
            _items(url, 8), poll_interval=0.05, coordinator=coord, timeout=60)
        assert [r.ok for r in last] == [True] * 8, [r.error for r in last]
        stats = emu.stats()
        assert stats["tasks_per_external_id"] == {"1": 8}
        assert stats["peak_in_progress"] <= 2


async def test_a_timeout_during_the_journal_check_never_says_a_journaled_item_was_not_sent(
        tmp_path: Path) -> None:
    """A rerun from a journal whose server answers slowly, with a timeout shorter than the
    re-attach: every item was created by the first run, yet each was reported
    NotSubmittedError ("the batch ended before the item was sent"), inviting the caller to
    create it again. Now: a WaitTimeoutError naming the journal's task; nothing is created."""
    journal = str(tmp_path / "batch.journal")
    async with KlingEmulator(concurrency=5, task_seconds=0.05) as emu, _client(emu) as client:
        items = _items(emu.sample_url(10), 6)
        first = await client.custom_voices.create_many(items, journal=journal,
                                                       poll_interval=0.05)
        emu.inject("get", "slow", delay=3.0, times=100)
        creates = emu.count("create")
        again = await client.custom_voices.create_many(items, journal=journal,
                                                       poll_interval=0.05, timeout=0.5)
        assert emu.count("create") == creates
    assert all(isinstance(r.error, WaitTimeoutError) for r in again), [r.error for r in again]
    assert [r.error.task_id for r in again  # type: ignore[union-attr]
            ] == [r.task.task_id for r in first if r.task is not None]


@pytest.mark.parametrize("bad", [{"rate_limit_delay": float("inf")}, {"rate_limit_delay": -1},
                                 {"rate_limit_delay": "1"}, {"journal": 5}])
def test_bad_local_coordinator_settings_are_validation_errors(bad: dict[str, Any]) -> None:
    """They were accepted, then failed at the first 1303 (a TypeError for "1"; for inf, every
    later create waited for ever), or raised a bare TypeError (journal=5)."""
    with pytest.raises(voiceapi.ValidationError):
        voiceapi.LocalCoordinator(2, **bad)


@pytest.mark.parametrize("interval", [1e-9, 1e-6])
async def test_a_tiny_poll_interval_never_starves_the_batchs_own_creates(
        interval: float) -> None:
    """With its slots taken by creates still on the wire and nothing tracked yet, the batch
    polled (nothing to look at: no await), found the next poll due at once, and polled again:
    a busy loop that never let its creates run. Nothing was created; the batch timed out with
    every item NotSubmittedError (without a timeout it spun for ever, deaf to cancel)."""
    async with KlingEmulator(concurrency=2, task_seconds=0.05) as emu, _client(emu) as client:
        results = await client.custom_voices.create_many(
            _items(emu.sample_url(10), 4), max_in_flight=2, poll_interval=interval, timeout=15)
        assert [r.ok for r in results] == [True] * 4, [r.error for r in results]
        assert emu.stats()["tasks_per_external_id"] == {"1": 4}
