"""create_many against the emulator: slot-aware, never duplicating, resumable."""

from __future__ import annotations

import asyncio
import collections
import itertools
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import voiceapi
from tests.conftest import FAST_RETRY, scaled_examples
from voiceapi._batch import BatchItem, BatchProgress, derive_external_task_id
from voiceapi._local_coordinator import SlotCap
from voiceapi.testing import KlingEmulator


def items_for(emu: KlingEmulator, n: int, *, bad_every: int = 0) -> list[dict[str, Any]]:
    return [{"voice_name": f"voice {i}",
             "voice_url": emu.sample_url(3 if bad_every and i % bad_every == 0 else 10)}
            for i in range(n)]


def client_for(emu: KlingEmulator, **kw: Any) -> voiceapi.AsyncVoiceClient:
    kw.setdefault("retry_policy", FAST_RETRY)
    return voiceapi.AsyncVoiceClient(api_key=emu.api_key, base_url=emu.base_url, timeout=5,
                                     **kw)


def assert_exactly_once(emu: KlingEmulator, results: list[voiceapi.BatchResult]) -> None:
    per_ext = collections.Counter(t["task_info"].get("external_task_id") for t in emu.tasks())
    assert all(n == 1 for n in per_ext.values()), "a task was created twice"
    with_task = [r for r in results if r.task is not None]
    assert len(with_task) == emu.task_count
    assert {r.task.task_id for r in with_task if r.task} == {t["task_id"] for t in emu.tasks()}


async def test_220_items_under_1303_pressure_and_faults() -> None:
    async with KlingEmulator(concurrency=5, task_seconds=0.05) as emu:
        items = items_for(emu, 220, bad_every=23)
        emu.inject("create", "commit_then_5000", times=4)
        emu.inject("create", "reset", times=3)
        emu.inject("list", "5000", times=2)
        emu.inject("create", "truncated", times=2)
        async with client_for(emu) as client:
            results = await client.custom_voices.create_many(items, poll_interval=0.02)
    assert [r.input["voice_name"] for r in results] == [f"voice {i}" for i in range(220)]
    failed = [i for i, r in enumerate(results) if not r.ok]
    assert failed == [i for i in range(220) if i % 23 == 0]
    assert all(isinstance(results[i].error, voiceapi.TaskFailedError) for i in failed)
    assert_exactly_once(emu, results)
    assert emu.peak_in_progress <= 5
    assert emu.count("create", code=1303) < 220 // 4  # learning the cap, not a 1303 storm
    requests_per_voice = len(emu.requests) / 220
    assert requests_per_voice < 4


async def test_fixed_slots_never_exceed_the_limit() -> None:
    async with KlingEmulator(concurrency=10, task_seconds=0.03) as emu:
        async with client_for(emu) as client:
            results = await client.custom_voices.create_many(items_for(emu, 40),
                                                             max_in_flight=3,
                                                             poll_interval=0.02)
    assert all(r.ok for r in results)
    assert emu.peak_in_progress <= 3 and emu.count(code=1303) == 0


async def test_bad_items_are_results_not_exceptions(emu: KlingEmulator) -> None:
    items: list[Any] = [
        {"voice_name": "good", "voice_url": emu.sample_url()},
        {"voice_name": "", "voice_url": emu.sample_url()},
        {"voice_name": "nosource"},
        {"voice_name": "typo", "voice_ulr": emu.sample_url()},
        BatchItem(voice_name="as attrs", voice_url=emu.sample_url()),
        "not a dict",
    ]
    async with client_for(emu) as client:
        results = await client.custom_voices.create_many(items)
    assert [r.ok for r in results] == [True, False, False, False, True, False]
    assert all(isinstance(r.error, voiceapi.ValidationError) for r in results if not r.ok)
    assert emu.task_count == 2


async def test_no_wait_returns_after_submission() -> None:
    async with KlingEmulator(concurrency=3, task_seconds=0.05) as emu:
        async with client_for(emu) as client:
            results = await client.custom_voices.create_many(items_for(emu, 9), wait=False)
    assert emu.task_count == 9 and all(r.task is not None for r in results)
    assert all(r.error is None for r in results)


async def test_progress_reports_reach_the_end(emu: KlingEmulator) -> None:
    seen: list[BatchProgress] = []
    async with client_for(emu) as client:
        await client.custom_voices.create_many(items_for(emu, 6, bad_every=5),
                                               on_progress=seen.append)
    assert seen[0].done == 0 and seen[0].total == 6
    assert (seen[-1].succeeded, seen[-1].failed, seen[-1].pending) == (4, 2, 0)
    assert all(a.done <= b.done for a, b in itertools.pairwise(seen))


async def test_identical_items_get_distinct_stable_ids(emu: KlingEmulator) -> None:
    same = {"voice_name": "twin", "voice_url": emu.sample_url()}
    assert derive_external_task_id(same, 0) == derive_external_task_id(dict(same), 0)
    async with client_for(emu) as client:
        results = await client.custom_voices.create_many([same, same])
    assert emu.task_count == 2 and all(r.ok for r in results)
    assert results[0].task and results[1].task
    assert results[0].task.external_task_id != results[1].task.external_task_id


async def test_rerun_without_journal_creates_nothing_new(emu: KlingEmulator) -> None:
    items = items_for(emu, 8)
    async with client_for(emu) as client:
        first = await client.custom_voices.create_many(items)
        second = await client.custom_voices.create_many(items)
    assert emu.task_count == 8
    assert [r.task.task_id for r in first if r.task] == [r.task.task_id for r in second
                                                         if r.task]


async def test_cancel_midway_then_resume_from_journal(tmp_path: Path) -> None:
    journal = str(tmp_path / "run.journal")
    async with KlingEmulator(concurrency=4, task_seconds=0.05) as emu:
        items = items_for(emu, 40)
        async with client_for(emu) as client:
            halfway = asyncio.Event()

            def watch(p: BatchProgress) -> None:
                if p.done >= 12:
                    halfway.set()

            run = asyncio.ensure_future(client.custom_voices.create_many(
                items, journal=journal, on_progress=watch, poll_interval=0.02))
            await asyncio.wait_for(halfway.wait(), 30)
            run.cancel()
            with pytest.raises(asyncio.CancelledError):
                await run
            created_before = emu.task_count
            assert 12 <= created_before < 40
            results = await client.custom_voices.create_many(items, journal=journal,
                                                             poll_interval=0.02)
    assert all(r.ok for r in results) and emu.task_count == 40
    # Journaled items were followed, not re-sent: one server task per external id (counting
    # creates would count 1303 refusals and refused duplicates too).
    assert_exactly_once(emu, results)


async def test_item_and_batch_deadlines() -> None:
    async with KlingEmulator(concurrency=2, task_seconds=3600) as emu:
        async with client_for(emu) as client:
            results = await client.custom_voices.create_many(items_for(emu, 4),
                                                             item_timeout=0.2, timeout=1.0)
    assert all(isinstance(r.error, voiceapi.VoiceAPIError) for r in results)
    assert sum(isinstance(r.error, voiceapi.WaitTimeoutError) for r in results) >= 2
    assert emu.task_count <= 4


def test_slot_limit_learns_from_1303() -> None:
    limit = SlotCap(None)
    for in_flight in range(2, 9):
        limit.on_accepted(in_flight)
    assert limit.value == 9
    limit.on_refused(5)
    assert limit.value == 5 and limit.learned
    for _ in range(5):
        limit.on_accepted(5)
    assert limit.value == 5  # after learning, probing upward is rare
    fixed = SlotCap(3)
    fixed.on_refused(1)
    assert fixed.value == 1  # the user's number is a ceiling, not a promise
    for _ in range(3 * 4):
        fixed.on_accepted(fixed.value)
    assert fixed.value == 3  # probing back up, never above the ceiling
    fixed.on_accepted(3)
    assert fixed.value == 3


FAULTS = st.lists(st.tuples(st.sampled_from(["create", "list", "get"]),
                            st.sampled_from(["5000", "5002", "reset", "commit_then_5000",
                                             "commit_then_drop", "1303", "1302", "truncated",
                                             "html502"]),
                            st.integers(1, 3)), max_size=6)


@settings(max_examples=scaled_examples(12), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(schedule=FAULTS, cap=st.integers(1, 4), above=st.sampled_from([None, 0, 1, 3]),
       order=st.sampled_from(["newest", "oldest"]), unique=st.booleans())
def test_random_fault_schedules_never_duplicate(schedule: list[tuple[str, str, int]], cap: int,
                                                above: int | None, order: str,
                                                unique: bool) -> None:
    """Exactly one server task per item, whatever faults hit, with a learned cap or a fixed
    one at or above the account's real cap, in either list order, and on a server that does
    not refuse a repeated external id (where only the SDK's lookups prevent duplicates)."""
    async def scenario() -> None:
        async with KlingEmulator(concurrency=cap, task_seconds=0.02, list_order=order,
                                 unique_external_ids=unique) as emu:
            for route, fault, times in schedule:
                if route == "create" or not fault.startswith("commit_then"):
                    emu.inject(route, fault, times=times, retry_after=0.01)
            async with client_for(emu, max_retries=5) as client:
                results = await client.custom_voices.create_many(
                    items_for(emu, 15), poll_interval=0.02,
                    max_in_flight=None if above is None else cap + above)
            assert len(results) == 15
            assert_exactly_once(emu, results)
            assert all(r.ok for r in results), [str(r.error) for r in results if not r.ok]
            if above is not None:
                assert emu.peak_in_progress <= cap

    asyncio.run(scenario())


async def test_batch_under_each_reading(reading_emu: KlingEmulator) -> None:
    """The batch, reruns and its faults under every reading of the API the evidence allows."""
    emu = reading_emu
    items = items_for(emu, 24, bad_every=7)
    emu.inject("create", "commit_then_drop", times=2)
    emu.inject("get", 5000, times=2)
    async with client_for(emu) as client:
        results = await client.custom_voices.create_many(items, poll_interval=0.02)
        again = await client.custom_voices.create_many(items, poll_interval=0.02)
    bad = [i for i in range(24) if i % 7 == 0]
    assert [i for i, r in enumerate(results) if not r.ok] == bad
    assert [r.ok for r in again] == [r.ok for r in results]
    assert [r.task.task_id for r in again if r.task] == [r.task.task_id for r in results
                                                         if r.task]
    assert_exactly_once(emu, results)

