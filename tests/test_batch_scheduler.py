"""The scheduler under pressure: one test per behaviour of issue 11 (and 16's linear batches),
against the emulator with faults, counting what the server saw."""

from __future__ import annotations

import asyncio
import collections
import gc
import itertools
import json
import time
from pathlib import Path
from typing import Any

import pytest

import voiceapi
from tests.conftest import FAST_RETRY
from voiceapi._batch import derive_external_task_id, prepare
from voiceapi._batch_models import JournalError, NotSubmittedError, VoiceGoneError
from voiceapi._coordinator import Coordinator, Grant
from voiceapi._errors import SentCredential
from voiceapi._local_coordinator import FileJournal, LocalCoordinator
from voiceapi.testing import KlingEmulator

#: A real-ish 1303 backoff (Kling asks for ≥ 1 s); the other knobs stay fast.
REAL_1303 = voiceapi.RetryPolicy(initial_delay=0.001, max_delay=0.01, rate_limit_min_delay=1.0,
                                 retry_after_max=0.05)


def items_for(emu: KlingEmulator, n: int, *, seconds: float = 10,
              prefix: str = "voice") -> list[dict[str, Any]]:
    return [{"voice_name": f"{prefix} {i}", "voice_url": emu.sample_url(seconds)}
            for i in range(n)]


def client_for(emu: KlingEmulator, **kw: Any) -> voiceapi.AsyncVoiceClient:
    kw.setdefault("retry_policy", FAST_RETRY)
    kw.setdefault("timeout", 5)
    return voiceapi.AsyncVoiceClient(api_key=emu.api_key, base_url=emu.base_url, **kw)


def tasks_per_ext(emu: KlingEmulator) -> collections.Counter[str | None]:
    return collections.Counter(t["task_info"].get("external_task_id") for t in emu.tasks())


# --- 1. a fixed cap above the account's real one ------------------------------------------------

async def test_fixed_cap_above_the_real_one_does_not_storm() -> None:
    async with KlingEmulator(concurrency=2, task_seconds=0.3) as emu:
        async with client_for(emu, retry_policy=REAL_1303) as client:
            started = time.monotonic()
            results = await client.custom_voices.create_many(items_for(emu, 10),
                                                             max_in_flight=5)
            wall = time.monotonic() - started
    assert all(r.ok for r in results)
    assert set(tasks_per_ext(emu).values()) == {1} and emu.task_count == 10
    assert emu.count("create", code=1303) <= 3 * wall
    assert emu.count("list") <= 5 * wall
    assert emu.peak_in_progress <= 2


async def test_1303_with_none_of_ours_running_backs_off_by_time() -> None:
    """The account is full with someone else's tasks: the batch waits ≥ 1 s between tries
    instead of retrying at once."""
    async with KlingEmulator(concurrency=5, task_seconds=0.1) as emu:
        emu.inject("create", 1303, times=1)
        async with client_for(emu, retry_policy=REAL_1303) as client:
            started = time.monotonic()
            results = await client.custom_voices.create_many(items_for(emu, 1))
            wall = time.monotonic() - started
    assert results[0].ok and emu.count("create", code=1303) == 1
    assert wall >= 1.0  # a backoff of at least 1 s


# --- 2. a timed-out item keeps its slot until its task is seen ending --------------------------

async def test_item_timeout_keeps_the_slot_until_the_task_ends() -> None:
    async with KlingEmulator(concurrency=20, task_seconds=0.8) as emu:
        async with client_for(emu) as client:
            results = await client.custom_voices.create_many(
                items_for(emu, 6), max_in_flight=3, item_timeout=0.2, poll_interval=0.05)
    assert all(isinstance(r.error, voiceapi.WaitTimeoutError) for r in results)
    assert all(r.error.timeout == 0.2 for r in results
               if isinstance(r.error, voiceapi.WaitTimeoutError))
    assert emu.peak_in_progress <= 3 and emu.task_count == 6


# --- 3. callbacks + journal: a resume with a new callback URL creates nothing twice ------------

def test_derived_id_ignores_delivery_settings() -> None:
    item = {"voice_name": "n", "voice_url": "https://x/a.wav"}
    with_cb = {**item, "callback_url": "https://tunnel-1.example/cb"}
    assert derive_external_task_id(item, 0) == derive_external_task_id(with_cb, 0)
    a = prepare([item], callback_url="http://127.0.0.1:1111/cb")[0]
    b = prepare([item], callback_url="http://127.0.0.1:2222/cb")[0]
    assert a.key == b.key and a.body and a.body["callback_url"].endswith("1111/cb")


async def test_resume_with_a_new_callback_server_creates_nothing_twice(tmp_path: Path) -> None:
    journal = str(tmp_path / "cb.journal")
    async with KlingEmulator(concurrency=4, task_seconds=0.2) as emu:
        items = items_for(emu, 20)
        async with client_for(emu) as client:
            async with voiceapi.CallbackServer() as cb1:
                halfway = asyncio.Event()
                run = asyncio.ensure_future(client.custom_voices.create_many(
                    items, journal=journal, callbacks=cb1, poll_interval=0.05,
                    on_progress=lambda p: halfway.set() if p.done >= 6 else None))
                await asyncio.wait_for(halfway.wait(), 30)
                run.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await run
            async with voiceapi.CallbackServer() as cb2:
                assert cb2.url != cb1.url
                results = await client.custom_voices.create_many(
                    items, journal=journal, callbacks=cb2, poll_interval=0.05)
    assert all(r.ok for r in results)
    assert emu.task_count == 20 and set(tasks_per_ext(emu).values()) == {1}


# --- 4. the batch timeout: on time, no busy loop, named errors -----------------------------------

async def test_batch_timeout_returns_on_time_without_spinning() -> None:
    async with KlingEmulator(concurrency=5, task_seconds=3600) as emu:
        emu.inject("create", "slow", delay=2.5)  # the first create lands, its answer is stuck
        async with client_for(emu, timeout=60) as client:
            cpu, started = time.process_time(), time.monotonic()
            results = await client.custom_voices.create_many(items_for(emu, 3), timeout=1)
            wall, cpu = time.monotonic() - started, time.process_time() - cpu
    assert wall <= 2.0
    assert cpu < 0.5 * wall  # the loop sleeps; it never spins on a negative wait
    errors = [r.error for r in results]
    assert all(isinstance(e, voiceapi.WaitTimeoutError) for e in errors)
    assert all("after 1s" in str(e) for e in errors)
    # The stuck create was cancelled and looked up: its task is reported, not lost.
    assert {r.task.task_id for r in results if r.task} == {t["task_id"] for t in emu.tasks()}


async def test_unsent_items_get_a_named_error() -> None:
    async with KlingEmulator(concurrency=1, task_seconds=3600) as emu:
        async with client_for(emu) as client:
            results = await client.custom_voices.create_many(items_for(emu, 3), timeout=0.5,
                                                             max_in_flight=1)
    assert isinstance(results[0].error, voiceapi.WaitTimeoutError)
    assert all(isinstance(r.error, NotSubmittedError) for r in results[1:])
    assert all("batch timeout of 0.5s" in str(r.error) for r in results[1:])
    assert emu.task_count == 1


# --- 5. fast failures do not drive a poll storm --------------------------------------------------

async def test_fast_failures_keep_the_poll_floor() -> None:
    async with KlingEmulator(concurrency=5, task_seconds=0.05) as emu:
        async with client_for(emu) as client:
            started = time.monotonic()
            results = await client.custom_voices.create_many(items_for(emu, 10, seconds=3))
            wall = time.monotonic() - started
    assert all(isinstance(r.error, voiceapi.TaskFailedError) for r in results)
    # Polls no closer than the 0.5 s floor (one early look after a 1303 aside): 375 before.
    assert emu.count("list") <= wall / 0.5 + 2
    assert emu.count("list") <= 8


# --- 6. the journal is checked, locked, and its directory must exist -------------------------

async def test_a_journal_line_naming_another_task_is_ignored(tmp_path: Path) -> None:
    journal = tmp_path / "j.journal"
    async with KlingEmulator(concurrency=5, task_seconds=0.05) as emu:
        items = items_for(emu, 2)
        async with client_for(emu) as client:
            first = await client.custom_voices.create_many(items[:1], poll_interval=0.05)
            other = first[0].task
            assert other is not None
            key = prepare(items[1:])[0].key
            journal.write_text(json.dumps({"ext": key, "task_id": other.task_id,
                                           "status": "succeed"}) + "\n")
            results = await client.custom_voices.create_many(items, journal=str(journal),
                                                             poll_interval=0.05)
    assert all(r.ok for r in results)
    assert results[1].task is not None and results[1].task.task_id != other.task_id
    assert results[1].task.external_task_id == key
    assert emu.task_count == 2 and set(tasks_per_ext(emu).values()) == {1}


async def test_a_second_writer_on_the_journal_is_refused(tmp_path: Path,
                                                         emu: KlingEmulator) -> None:
    path = tmp_path / "busy.journal"
    holder = FileJournal(path)
    try:
        async with client_for(emu) as client:
            with pytest.raises(JournalError, match="in use"):
                await client.custom_voices.create_many(items_for(emu, 2), journal=str(path))
    finally:
        holder.close()
    assert emu.count() == 0
    FileJournal(path).close()  # free again once the holder closed it


async def test_a_journal_in_a_missing_directory_is_a_clear_error(tmp_path: Path,
                                                                  emu: KlingEmulator) -> None:
    async with client_for(emu) as client:
        with pytest.raises(JournalError, match="directory does not exist"):
            await client.custom_voices.create_many(
                items_for(emu, 1), journal=str(tmp_path / "nope" / "j.journal"))
    assert emu.count() == 0


# --- 7. bad items -------------------------------------------------------------------------------

async def test_an_item_without_voice_name_is_its_own_error(emu: KlingEmulator) -> None:
    async with client_for(emu) as client:
        results = await client.custom_voices.create_many(
            [{"voice_url": emu.sample_url()}, {"voice_name": "ok", "voice_url": emu.sample_url()},
             {"voice_name": None, "voice_url": emu.sample_url()}], poll_interval=0.05)
    assert [r.ok for r in results] == [False, True, False]
    assert isinstance(results[0].error, voiceapi.ValidationError)
    assert "voice_name" in str(results[0].error)


@pytest.mark.parametrize("single", [{"voice_name": "x", "voice_url": "https://x/a.wav"},
                                    voiceapi.BatchItem(voice_name="x"), "abc"])
async def test_a_single_item_instead_of_a_list_is_refused(emu: KlingEmulator,
                                                          single: Any) -> None:
    async with client_for(emu) as client:
        with pytest.raises(voiceapi.ValidationError, match="iterable of items"):
            await client.custom_voices.create_many(single)
    assert emu.count() == 0


@pytest.mark.parametrize("bad", [{"max_in_flight": 0}, {"timeout": -1}, {"item_timeout": 0},
                                 {"poll_interval": float("nan")}, {"max_in_flight": True}])
async def test_bad_settings_are_refused_up_front(emu: KlingEmulator, bad: dict[str, Any]) -> None:
    async with client_for(emu) as client:
        with pytest.raises(voiceapi.ValidationError):
            await client.custom_voices.create_many(items_for(emu, 1), **bad)
    assert emu.count() == 0


# --- 8. reruns: failed items and deleted voices --------------------------------------------------

async def test_rerun_with_retry_failed_creates_failed_items_again(emu: KlingEmulator) -> None:
    items = [{"voice_name": "good", "voice_url": emu.sample_url()},
             {"voice_name": "bad", "voice_url": emu.sample_url(3)}]
    async with client_for(emu) as client:
        first = await client.custom_voices.create_many(items, poll_interval=0.05)
        again = await client.custom_voices.create_many(items, poll_interval=0.05)
        retried = await client.custom_voices.create_many(items, retry_failed=True,
                                                         poll_interval=0.05)
    assert [r.ok for r in first] == [True, False]
    assert emu.count("create", code=0) == 3  # the plain rerun re-attached, the retry made one
    assert again[1].task and first[1].task and again[1].task.task_id == first[1].task.task_id
    assert retried[0].task and first[0].task and retried[0].task.task_id == first[0].task.task_id
    assert retried[1].task is not None and retried[1].task.task_id != first[1].task.task_id
    assert retried[1].task.external_task_id == f"{first[1].task.external_task_id}-r1"
    assert emu.task_count == 3 and set(tasks_per_ext(emu).values()) == {1}


@pytest.mark.parametrize("deleted", ["mark", "drop"])
async def test_a_reattached_voice_that_was_deleted_is_not_ready(deleted: str,
                                                                tmp_path: Path) -> None:
    journal = str(tmp_path / "d.journal")
    async with KlingEmulator(concurrency=5, task_seconds=0.05, deleted_voices=deleted) as emu:
        items = items_for(emu, 2)
        async with client_for(emu) as client:
            first = await client.custom_voices.create_many(items, journal=journal,
                                                           poll_interval=0.05)
            voice_id = first[0].task.voice_id if first[0].task else None
            assert voice_id is not None
            await client.custom_voices.delete(voice_id)
            rerun = await client.custom_voices.create_many(items, journal=journal,
                                                           poll_interval=0.05)
            fixed = await client.custom_voices.create_many(items, journal=journal,
                                                           retry_failed=True,
                                                           poll_interval=0.05)
            later = await client.custom_voices.create_many(items, journal=journal,
                                                           poll_interval=0.05)
    assert isinstance(rerun[0].error, VoiceGoneError) and not rerun[0].ok and rerun[1].ok
    assert fixed[0].ok and fixed[0].task and fixed[0].task.voice_id != voice_id
    assert later[0].ok and later[0].task and later[0].task.task_id == fixed[0].task.task_id
    assert emu.task_count == 3 and set(tasks_per_ext(emu).values()) == {1}


# --- 9. odd ends ---------------------------------------------------------------------------------

async def test_wait_false_reports_running_tasks_as_running() -> None:
    seen: list[voiceapi.BatchProgress] = []
    async with KlingEmulator(concurrency=3, task_seconds=5) as emu:
        async with client_for(emu) as client:
            results = await client.custom_voices.create_many(items_for(emu, 3), wait=False,
                                                             on_progress=seen.append)
    last = seen[-1]
    assert last.failed == 0 and last.submitted + last.processing == 3 and last.pending == 0
    assert all(r.error is None and r.task is not None for r in results)


async def test_progress_is_reported_on_change_only(emu: KlingEmulator) -> None:
    seen: list[voiceapi.BatchProgress] = []
    async with client_for(emu) as client:
        await client.custom_voices.create_many(items_for(emu, 6), on_progress=seen.append,
                                               poll_interval=0.02)
    assert all(a != b for a, b in itertools.pairwise(seen))
    assert seen[-1].succeeded == 6 and seen[0].pending == 6
    assert len(seen) <= 6 * 3 + 2  # a handful per item, not one per loop turn


async def test_cancel_while_reattaching_leaves_nothing_unawaited(tmp_path: Path) -> None:
    journal = tmp_path / "r.journal"
    async with KlingEmulator(concurrency=50, task_seconds=0.01) as emu:
        items = items_for(emu, 60)
        async with client_for(emu) as client:
            await client.custom_voices.create_many(items, journal=str(journal),
                                                   poll_interval=0.02, max_in_flight=50)
            emu.inject("get", "slow", delay=1.5, times=1000)
            run = asyncio.ensure_future(client.custom_voices.create_many(
                items, journal=str(journal)))
            await asyncio.sleep(0.3)
            run.cancel()
            with pytest.raises(asyncio.CancelledError):
                await run
    gc.collect()  # a "coroutine never awaited" would warn here (warnings are errors)
    FileJournal(journal).close()  # the cancelled batch released its lock


# --- 10. lookups that fail are retried, never read as "not found" ---------------------------

async def test_batch_never_resends_after_a_failed_lookup() -> None:
    async with KlingEmulator(concurrency=5, task_seconds=0.05, unique_external_ids=False) as emu:
        emu.inject("create", "commit_then_5000", times=6)
        emu.inject("get", 1201, times=8)
        emu.inject("get", 5000, times=8)
        async with client_for(emu) as client:
            results = await client.custom_voices.create_many(items_for(emu, 30),
                                                             poll_interval=0.05)
    assert set(tasks_per_ext(emu).values()) == {1}, "a failed lookup led to a resend"
    assert emu.task_count == 30
    assert sum(r.ok for r in results) >= 24


# --- coordinator seam -------------------------------------------------------------------------

async def test_a_shared_local_coordinator_caps_two_batches_together() -> None:
    async with KlingEmulator(concurrency=10, task_seconds=0.1) as emu:
        async with LocalCoordinator(3) as coord, client_for(emu) as client:
            a, b = await asyncio.gather(
                client.custom_voices.create_many(items_for(emu, 9, prefix="a"),
                                                 coordinator=coord, poll_interval=0.03),
                client.custom_voices.create_many(items_for(emu, 9, prefix="b"),
                                                 coordinator=coord, poll_interval=0.03))
            assert coord.in_flight == 0
    assert all(r.ok for r in a + b) and emu.peak_in_progress <= 3


async def test_the_clients_coordinator_is_used_by_default(tmp_path: Path) -> None:
    async with KlingEmulator(concurrency=10, task_seconds=0.05) as emu:
        async with LocalCoordinator(2, journal=tmp_path / "c.journal") as coord:
            async with client_for(emu, coordinator=coord) as client:
                results = await client.custom_voices.create_many(items_for(emu, 6),
                                                                 poll_interval=0.03)
            known = await coord.known([r.task.external_task_id for r in results
                                       if r.task and r.task.external_task_id])
    assert all(r.ok for r in results) and emu.peak_in_progress <= 2
    assert len(known) == 6 and {j.status for j in known.values()} == {"succeed"}


async def test_a_coordinator_and_a_journal_file_together(tmp_path: Path) -> None:
    journal = str(tmp_path / "side.journal")
    async with KlingEmulator(concurrency=5, task_seconds=0.05) as emu:
        items = items_for(emu, 4)
        async with client_for(emu) as client:
            async with LocalCoordinator() as coord:
                await client.custom_voices.create_many(items, coordinator=coord,
                                                       journal=journal, poll_interval=0.03)
            async with LocalCoordinator() as fresh:  # knows nothing; the file does
                again = await client.custom_voices.create_many(items, coordinator=fresh,
                                                               journal=journal)
    assert all(r.ok for r in again) and emu.count("create") == 4


async def test_slots_of_a_returned_batch_are_freed_by_the_next(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch that returned with wait=False leaves tasks running at Kling: their slots stay
    held (never above the cap) until a later batch sees them end."""
    monkeypatch.setattr(voiceapi._constants, "BATCH_ORPHAN_AFTER", 0.2)
    async with KlingEmulator(concurrency=10, task_seconds=0.4) as emu:
        async with LocalCoordinator(2) as coord, client_for(emu) as client:
            first = await client.custom_voices.create_many(
                items_for(emu, 2, prefix="a"), coordinator=coord, wait=False)
            assert coord.in_flight == 2 and all(r.task for r in first)
            second = await client.custom_voices.create_many(
                items_for(emu, 2, prefix="b"), coordinator=coord, poll_interval=0.05)
            assert coord.in_flight == 0
    assert all(r.ok for r in second) and emu.peak_in_progress <= 2


# --- adversarial ends ---------------------------------------------------------------------------

async def test_closing_the_client_mid_batch_ends_it() -> None:
    async with KlingEmulator(concurrency=3, task_seconds=3600) as emu:
        client = client_for(emu)
        run = asyncio.ensure_future(client.custom_voices.create_many(
            items_for(emu, 10), poll_interval=0.05))
        while emu.task_count < 3:
            await asyncio.sleep(0.01)
        await client.aclose()
        results = await asyncio.wait_for(run, 10)
    assert all(r.error is not None for r in results)
    assert any(isinstance(r.error, voiceapi.ClientClosedError) for r in results)
    assert all(isinstance(r.error, (voiceapi.ClientClosedError, NotSubmittedError))
               for r in results)
    assert emu.task_count == 3


async def test_bad_credentials_end_the_batch_with_one_error_each() -> None:
    async with KlingEmulator(concurrency=3, task_seconds=0.05) as emu:
        async with voiceapi.AsyncVoiceClient(api_key="wrong", base_url=emu.base_url,
                                             retry_policy=FAST_RETRY) as client:
            results = await asyncio.wait_for(client.custom_voices.create_many(
                items_for(emu, 5)), 10)
    assert all(isinstance(r.error, voiceapi.AuthenticationError) for r in results)
    assert emu.task_count == 0


# --- 16: batches that stay linear -------------------------------------------------------------

async def test_wait_false_polls_only_to_free_slots() -> None:
    async with KlingEmulator(concurrency=10, task_seconds=0.2) as emu:
        async with client_for(emu) as client:
            few = await client.custom_voices.create_many(items_for(emu, 3, prefix="few"),
                                                         wait=False, max_in_flight=3)
            # Nothing to free: no poll at all (the one get is the "is this a rerun?" probe).
            assert emu.count("list") == 0 and emu.count("get") == 1
            started = time.monotonic()
            many = await client.custom_voices.create_many(items_for(emu, 12, prefix="many"),
                                                          wait=False, max_in_flight=3)
            wall = time.monotonic() - started
    assert all(r.error is None and r.task for r in few + many)
    assert emu.peak_in_progress <= 6  # the first batch's three may still run
    assert emu.count("list") <= wall / 0.5 + 2


def test_progress_counts_stay_equal_to_a_recount() -> None:
    import random

    from voiceapi._batch_state import Entry, Ledger, Phase

    entries = [Entry(input={}, body=None) for _ in range(200)]
    reports: list[voiceapi.BatchProgress] = []
    ledger = Ledger(entries, reports.append)
    rng = random.Random(7)
    for _ in range(2000):
        ledger.set_phase(rng.choice(entries), rng.choice(list(Phase)))
        recount = collections.Counter(e.phase for e in entries)
        assert ledger.counts == {p: recount[p] for p in Phase}
    ledger.report(0, 1, force=True)
    ledger.report(0, 1, force=True)
    assert len(reports) == 1 and reports[0].total == 200


def test_sync_client_runs_a_batch_with_a_coordinator() -> None:
    with KlingEmulator(concurrency=5, task_seconds=0.05) as emu:
        coord = LocalCoordinator(2)
        with voiceapi.VoiceClient(api_key=emu.api_key, base_url=emu.base_url,
                                  retry_policy=FAST_RETRY) as client:
            results = client.custom_voices.create_many(items_for(emu, 5), coordinator=coord,
                                                        poll_interval=0.03)
        assert all(r.ok for r in results) and emu.peak_in_progress <= 2


@pytest.mark.parametrize("lookup", ["answers", "hangs"])
async def test_a_create_cancelled_at_the_deadline_is_looked_up(lookup: str) -> None:
    """The create never landed (the connection drops before any work; the SDK waits before
    resending): at the deadline it is cancelled and looked up. An answered not-found means
    "not submitted"; a lookup that cannot answer in time says the task may exist."""
    # What this guards: the batch ends at its deadline (plus the lookup grace), it does not sit
    # out the retry delay. A retry delay of a minute (inside the default retry budget of
    # 180 s, so the SDK does wait it out) and a batch that ends within half of it prove exactly
    # that, and no load stretches 1.3 s of timers (timeout 0.5 + BATCH_DEADLINE_GRACE 0.8) to
    # 30 s. The former bound of 1.5 s against a 5 s delay went red under load.
    delay, bound = 60.0, 30.0
    slow_retry = voiceapi.RetryPolicy(initial_delay=delay, max_delay=delay,
                                      rate_limit_min_delay=0.01)
    async with KlingEmulator(concurrency=5, task_seconds=0.1) as emu:
        emu.inject("create", "reset", times=100)
        if lookup == "hangs":  # the first lookup (is this a rerun?) answers, later ones drop
            emu.inject("get", "slow", delay=0, times=1)
            emu.inject("get", "reset", times=100)
        async with client_for(emu, retry_policy=slow_retry, timeout=1.2) as client:
            started = time.monotonic()
            results = await asyncio.wait_for(
                client.custom_voices.create_many(items_for(emu, 1), timeout=0.5), bound)
            assert time.monotonic() - started < bound < delay
    [result] = results
    assert isinstance(result.error, NotSubmittedError) and result.task is None
    assert ("may exist" in str(result.error)) == (lookup == "hangs")
    assert emu.task_count == 0


async def test_a_task_the_server_says_is_gone_ends_its_item() -> None:
    """A created task that the list never shows and every lookup answers "not found" for is
    not followed forever: its item gets that answer and its slot is freed."""
    from voiceapi._batch import run_batch
    from voiceapi._create import Created
    from voiceapi._decode import parse_task
    from voiceapi._pages import PageLimit

    class VanishingApi:
        rate_limit_delay = 0.01
        page_limit = PageLimit()

        def __init__(self) -> None:
            self.local = LocalCoordinator(1)
            self.coordinator: Coordinator | None = self.local

        async def create(self, body: dict[str, str]) -> Created:
            raw = {"task_id": "1", "task_status": "submitted",
                   "task_info": {"external_task_id": body["external_task_id"]}}
            return Created(parse_task(raw), existed=False)

        async def lookup(self, external_task_id: str) -> None:
            return None

        async def get(self, task_id: str) -> voiceapi.VoiceTask:
            raise voiceapi.InvalidRequestError(f"Task not found by id/external id: {task_id}",
                                               code=1201, http_status=400)

        async def list_page(self, page_num: int, page_size: int) -> list[Any]:
            return []

        def credential_mask(self) -> SentCredential:
            return SentCredential(None)

    api = VanishingApi()
    [result] = await asyncio.wait_for(run_batch(
        api, [{"voice_name": "v", "voice_url": "https://x.example/a.wav"}],
        poll_interval=0.01), 10)
    assert isinstance(result.error, voiceapi.InvalidRequestError)
    assert "not found" in str(result.error) and api.local.in_flight == 0
    assert isinstance(api.local, Coordinator)


async def test_two_batches_with_the_same_items_share_the_work() -> None:
    """Two batches in one process, one coordinator, the same items, on a server that would
    accept a repeated id: every item is created once, and both batches report every item."""
    async with KlingEmulator(concurrency=4, task_seconds=0.1, unique_external_ids=False) as emu:
        items = items_for(emu, 12)
        async with LocalCoordinator() as coord, client_for(emu) as client:
            a, b = await asyncio.gather(
                client.custom_voices.create_many(items, coordinator=coord, poll_interval=0.03),
                client.custom_voices.create_many(items, coordinator=coord, poll_interval=0.03))
            assert coord.in_flight == 0
    assert all(r.ok for r in a + b), [str(r.error) for r in a + b if not r.ok]
    assert [r.task.task_id for r in a if r.task] == [r.task.task_id for r in b if r.task]
    assert emu.task_count == 12 and set(tasks_per_ext(emu).values()) == {1}
    assert emu.peak_in_progress <= 4


async def test_a_journal_cut_short_by_a_crash_still_works(tmp_path: Path) -> None:
    """kill -9 mid-write leaves half a line: it is skipped, and the next record does not stick
    to it (which would lose that record on the next rerun)."""
    path = tmp_path / "cut.journal"
    async with KlingEmulator(concurrency=5, task_seconds=0.05) as emu:
        items = items_for(emu, 3)
        async with client_for(emu) as client:
            await client.custom_voices.create_many(items[:1], journal=str(path),
                                                   poll_interval=0.03)
            path.write_text(path.read_text() + '{"ext": "vb-half", "task_')
            second = await client.custom_voices.create_many(items[:2], journal=str(path),
                                                            poll_interval=0.03)
            assert all(r.ok for r in second)
            unreadable = []
            for line in path.read_text().splitlines():
                try:
                    json.loads(line)
                except ValueError:
                    unreadable.append(line)
            assert unreadable == ['{"ext": "vb-half", "task_']  # no record glued to it
            final = await client.custom_voices.create_many(items, journal=str(path),
                                                           poll_interval=0.03)
    assert all(r.ok for r in final) and emu.task_count == 3


async def test_a_failing_coordinator_stops_the_batch_with_its_error(emu: KlingEmulator) -> None:
    class Broken(LocalCoordinator):
        async def accepted(self, key: str, task_id: str, status: str) -> None:
            raise ConnectionError("coordinator store unreachable")

    async with Broken() as coord, client_for(emu) as client:
        with pytest.raises(ConnectionError, match="unreachable"):
            await asyncio.wait_for(client.custom_voices.create_many(
                items_for(emu, 3), coordinator=coord, poll_interval=0.02), 10)


async def test_a_poll_is_due_when_the_next_task_should_end() -> None:
    """Slot turnover: once a task's typical time is known, the next poll is due when the
    oldest running task should end, not a whole (here long) interval later; a task seen
    still running at its expected end falls back to the interval."""
    import datetime as dt

    from voiceapi._batch_state import Entry, Ledger
    from voiceapi._follower import Follower

    async def journal(entry: Entry, task: voiceapi.VoiceTask) -> None:
        return None

    entries = [Entry(input={}, body={"external_task_id": f"k{i}"}) for i in range(3)]
    follower = Follower(object(), LocalCoordinator(None), Ledger(entries, None),  # type: ignore[arg-type]
                        wait=True, item_timeout=None, poll_interval=10.0, callbacks=False,
                        retry=lambda e: False, journal=journal)
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    running = [voiceapi.VoiceTask(task_id=f"t{i}", external_task_id=f"k{i}",
                                  task_status=voiceapi.TaskStatus.SUBMITTED) for i in range(3)]
    for entry, task in zip(entries, running, strict=True):
        await follower.attach(entry, task)
    assert follower.next_poll_at(slots_wanted=False) == pytest.approx(
        follower._last_poll + 10.0)  # nothing known about task times yet: the interval
    done = voiceapi.VoiceTask(task_id="t0", external_task_id="k0",
                              task_status=voiceapi.TaskStatus.SUCCEED, created_at=t0,
                              updated_at=t0 + dt.timedelta(seconds=3))
    await follower.observed(done)  # t0 took 3 s: t1 should end 3 s after it was attached
    assert "t0" not in follower.tracked
    assert follower.next_poll_at(slots_wanted=False) == pytest.approx(
        entries[1].attached_at + 3.0)
    # t1 and t2 were looked at after their expected end and still run: they are late, and
    # only the interval remains (no poll storm for late tasks).
    follower._poll_started = follower._last_poll = entries[2].attached_at + 3.5
    assert follower.next_poll_at(slots_wanted=False) == pytest.approx(
        follower._last_poll + 10.0)


async def test_expected_end_polls_keep_the_floor_by_default() -> None:
    """Fast successful tasks (50 ms) make an expected end due almost at once; without a
    poll_interval from the user, polls still come no closer than the floor (issue 11.5)."""
    import datetime as dt

    from voiceapi import _constants as C
    from voiceapi._batch_state import Entry, Ledger
    from voiceapi._follower import Follower

    async def journal(entry: Entry, task: voiceapi.VoiceTask) -> None:
        return None

    entries = [Entry(input={}, body={"external_task_id": f"k{i}"}) for i in range(2)]
    follower = Follower(object(), LocalCoordinator(None), Ledger(entries, None),  # type: ignore[arg-type]
                        wait=True, item_timeout=None, poll_interval=None, callbacks=False,
                        retry=lambda e: False, journal=journal)
    t0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    for i, entry in enumerate(entries):
        await follower.attach(entry, voiceapi.VoiceTask(
            task_id=f"t{i}", external_task_id=f"k{i}", task_status=voiceapi.TaskStatus.SUBMITTED))
    await follower.observed(voiceapi.VoiceTask(
        task_id="t0", external_task_id="k0", task_status=voiceapi.TaskStatus.SUCCEED,
        created_at=t0, updated_at=t0 + dt.timedelta(seconds=0.05)))
    due = follower.next_poll_at(slots_wanted=False)
    assert due is not None
    assert due == pytest.approx(follower._last_poll + C.BATCH_POLL_FLOOR)


async def test_a_voice_another_batch_created_and_finished_is_followed_not_created_again() -> None:
    """A batch that waited for a slot while another batch of the same coordinator created and
    finished the same item must follow that task: on a server that accepts a repeated
    external id, a second create would be a second, billed voice."""
    async with LocalCoordinator(max_in_flight=1) as coord:
        assert await coord.acquire("k") is voiceapi.Grant.CREATE
        assert await coord.acquire("k") is voiceapi.Grant.FOLLOW  # held: being created
        await coord.accepted("k", "930801301486305328", "submitted")
        await coord.finished("k", "930801301486305328", "succeed")
        assert coord.in_flight == 0  # the slot is free again ...
        assert await coord.acquire("k") is voiceapi.Grant.FOLLOW  # ... but the voice exists
        known = await coord.known(["k"])
        assert known["k"].task_id == "930801301486305328"
        assert await coord.acquire("other") is voiceapi.Grant.CREATE


async def test_a_create_just_answered_is_not_counted_twice_against_the_cap() -> None:
    # A send whose task is attached already (its done-callback has not run yet) held two slots
    # in the count: near the end of a batch at its cap the scheduler thought itself blocked and
    # polled every tracked task for nothing (issue 16: the 1.6 vs 2.2 KB/task RSS figures).
    from voiceapi._batch_state import Ledger
    from voiceapi._models import TaskStatus, VoiceTask
    from voiceapi._submitter import Submitter

    class Api:
        rate_limit_delay = 0.01
        coordinator = None

        def __init__(self) -> None:
            self.started: list[str] = []

        async def create(self, body: dict[str, str]) -> Any:
            self.started.append(body["external_task_id"])
            await asyncio.Event().wait()  # never answered: the test looks at the count only

    entries = prepare([{"voice_name": f"v{i}", "voice_url": "https://x/a.wav"}
                       for i in range(2)])
    coord = LocalCoordinator(2)
    api = Api()
    submitter = Submitter(api, coord, Ledger(entries, None),  # type: ignore[arg-type]
                          on_created=None, on_foreign=None,  # type: ignore[arg-type]
                          wake=lambda: None, ceiling=2)
    answered, pending = entries
    assert await coord.acquire(answered.key) is voiceapi.Grant.CREATE
    answered.task = VoiceTask(task_id="1", task_status=TaskStatus.SUBMITTED)  # attached
    waiter: asyncio.Future[None] = asyncio.ensure_future(asyncio.Event().wait())  # type: ignore[arg-type]
    submitter.sending[waiter] = answered  # type: ignore[index]  # its send has not returned yet
    submitter.pending.append(pending)
    try:
        await submitter.start(own_slots=1)  # the answered one: 1 own + 0 unanswered sends
        assert not submitter.slot_blocked
        assert len(submitter.sending) == 2 and not submitter.pending
        await asyncio.sleep(0)  # the new send reaches the server
        assert api.started == [pending.key]
    finally:
        waiter.cancel()
        await submitter.cancel()


async def test_results_hold_the_callers_own_items(emu: KlingEmulator) -> None:
    """A dict item is the result's ``input`` itself (a copy per item cost ≈ 180 bytes for the
    whole batch); other mappings and BatchItems still become a dict of their own."""
    import types

    items: list[Any] = items_for(emu, 2)
    items.append(types.MappingProxyType({"voice_name": "proxy", "voice_url": emu.sample_url(10)}))
    items.append(voiceapi.BatchItem(voice_name="attrs", voice_url=emu.sample_url(10)))
    async with client_for(emu) as client:
        results = await client.custom_voices.create_many(items, wait=False)
    assert results[0].input is items[0] and results[1].input is items[1]
    assert type(results[2].input) is dict and results[2].input == dict(items[2])
    assert results[3].input == items[3].to_dict()
    assert all(r.error is None and r.task is not None for r in results)
    # The item's own id came from the item, not from a body the batch let go of.
    assert [r.task.external_task_id for r in results if r.task] == [
        derive_external_task_id(dict(item) if not isinstance(item, voiceapi.BatchItem)
                                else item.to_dict(), 0) for item in items]


@pytest.mark.parametrize("status", ["submitted", "processing", "succeed", "failed"])
async def test_the_local_journal_keeps_every_status(tmp_path: Path, status: str) -> None:
    """A task still "submitted" is journalled as its bare id (no tuple per item): it must read
    back exactly like any other status, in memory and from the file on a rerun."""
    path = tmp_path / "j.jsonl"
    coord = LocalCoordinator(journal=path)
    try:
        await coord.record("k", "930801301486305328", status)
        assert await coord.known(["k", "other"]) == {
            "k": voiceapi.JournalEntry("930801301486305328", status)}
    finally:
        coord.close()
    again = LocalCoordinator(journal=path)
    try:
        assert await again.known(["k"]) == {
            "k": voiceapi.JournalEntry("930801301486305328", status)}
    finally:
        again.close()


def test_the_typical_task_time_is_the_median() -> None:
    """The follower's own median (no ``statistics`` import per batch) agrees with statistics'."""
    import random
    import statistics

    from voiceapi._follower import _median

    rng = random.Random(16)
    for n in (1, 2, 3, 4, 49, 50):
        values = collections.deque((rng.uniform(0, 100) for _ in range(n)), maxlen=50)
        assert _median(values) == statistics.median(values)


async def test_a_journal_file_gets_one_line_per_change(tmp_path: Path) -> None:
    """The coordinator holds the journal's state once (not also in the file object) and still
    writes a line only when a task's state changes; a rerun reads the newest state."""
    path = tmp_path / "j.jsonl"
    coord = LocalCoordinator(journal=path)
    try:
        for status in ("submitted", "submitted", "processing", "processing", "succeed"):
            await coord.record("k", "930801301486305328", status)
        await coord.record("k2", "930801301486305329", "submitted")
    finally:
        coord.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["ext"], r["status"]) for r in lines] == [
        ("k", "submitted"), ("k", "processing"), ("k", "succeed"), ("k2", "submitted")]
    again = LocalCoordinator(journal=path)
    try:
        await again.record("k", "930801301486305328", "succeed")  # known already: no line
        assert await again.known(["k", "k2"]) == {
            "k": voiceapi.JournalEntry("930801301486305328", "succeed"),
            "k2": voiceapi.JournalEntry("930801301486305329", "submitted")}
    finally:
        again.close()
    assert len(path.read_text().splitlines()) == 4


async def test_an_item_refused_while_another_waits_for_its_slot_is_not_lost() -> None:
    """A shared coordinator answers acquire() over the network. A create refused meanwhile
    puts its item back at the front of the queue; the submitter then took the front item
    instead of the one it had asked a slot for: the refused item was dropped (its result: no
    task, no error) and the other stayed queued. Seen with two workers on Redis under load."""
    from voiceapi._batch import run_batch
    from voiceapi._create import Created
    from voiceapi._decode import parse_task
    from voiceapi._pages import PageLimit

    answered = asyncio.Event()

    class NetworkSlots(LocalCoordinator):
        async def acquire(self, key: str) -> Grant:
            if key == "b":  # b's slot is answered only once a's create was refused
                await answered.wait()
            return await super().acquire(key)

        async def rate_limited(self, code: int | None, retry_after: float | None) -> None:
            await super().rate_limited(code, retry_after)
            answered.set()

    class RefusesOnce:
        rate_limit_delay = 0.001
        page_limit = PageLimit()
        coordinator: Coordinator | None = None

        def __init__(self) -> None:
            self.creates: collections.Counter[str] = collections.Counter()

        async def create(self, body: dict[str, str]) -> Created:
            key = body["external_task_id"]
            self.creates[key] += 1
            if key == "a" and self.creates[key] == 1:
                raise voiceapi.RateLimitError("too fast", code=1302, retry_after=0.001)
            raw = {"task_id": f"t-{key}", "task_status": "succeed",
                   "task_info": {"external_task_id": key}}
            return Created(parse_task(raw), existed=False)

        async def lookup(self, external_task_id: str) -> None:
            return None

        async def get(self, task_id: str) -> voiceapi.VoiceTask:
            raise AssertionError("every task ended in its create's answer")

        async def list_page(self, page_num: int, page_size: int) -> list[Any]:
            return []

        def credential_mask(self) -> SentCredential:
            return SentCredential(None)

    api = RefusesOnce()
    items = [{"voice_name": k, "voice_url": f"https://x.example/{k}.wav",
              "external_task_id": k} for k in ("a", "b")]
    async with NetworkSlots() as coord:
        results = await asyncio.wait_for(run_batch(api, items, coordinator=coord), 10)
    assert [(r.ok, r.task.task_id if r.task else None) for r in results] == [
        (True, "t-a"), (True, "t-b")], [r.error for r in results]
    assert api.creates == {"a": 2, "b": 1}  # a sent again after its refusal, b once
