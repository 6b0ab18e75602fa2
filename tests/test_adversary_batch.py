"""Attacks on the batch scheduler's memory cuts (issue 16): each test here failed before its
fix, or records an attack that held.

The promise under attack: whatever happens to the process, the journal or the items, a rerun
never creates (and bills) a voice twice, and every item gets a result.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import voiceapi
from tests.conftest import FAST_RETRY
from voiceapi.testing import KlingEmulator

CHILD = r"""
import sys, voiceapi
base, key, journal, url, n, cap = sys.argv[1:7]
items = [{"voice_name": f"v{i}", "voice_url": url} for i in range(int(n))]
with voiceapi.VoiceClient(api_key=key, base_url=base) as client:
    client.custom_voices.create_many(items, journal=journal, max_in_flight=int(cap))
print("finished", flush=True)
"""


def _items(url: str, n: int) -> list[dict[str, Any]]:
    return [{"voice_name": f"v{i}", "voice_url": url} for i in range(n)]


def _tasks_per_id(emu: KlingEmulator) -> dict[str, int]:
    """{tasks per external id: how many ids}; {"1": n} is "every item exactly once"."""
    histogram: dict[str, int] = emu.stats()["tasks_per_external_id"]
    return histogram


def _kill_when(emu: KlingEmulator, proc: subprocess.Popen[bytes], tasks: int) -> None:
    """SIGKILL the batch process once the server holds ``tasks`` tasks (bounded wait on the
    server's state, not on the child's timing)."""
    deadline = time.monotonic() + 60
    while emu.task_count < tasks and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert proc.poll() is None, "the batch ended before it could be killed"
    assert emu.task_count >= tasks
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)


def test_killed_before_the_first_journal_line_the_rerun_creates_nothing_twice(
        tmp_path: Path) -> None:
    """kill -9 while the server has accepted creates it has not answered yet: the journal file
    exists but is empty. The rerun used to probe only the first item (refused with 1303, so
    never created) and then created the other seven again on a server that accepts a repeated
    external_task_id: seven voices billed twice."""
    journal = str(tmp_path / "batch.journal")
    with KlingEmulator(concurrency=10, task_seconds=0.2, unique_external_ids=False) as emu:
        url = emu.sample_url()
        emu.inject("create", 1303, times=1)  # the first item: refused, sent again later
        emu.inject("create", "slow", delay=8.0, times=7)  # the others: stored, answered late
        proc = subprocess.Popen([sys.executable, "-c", CHILD, emu.base_url, emu.api_key,
                                 journal, url, "12", "8"], stdout=subprocess.DEVNULL)
        _kill_when(emu, proc, 7)
        assert os.path.getsize(journal) == 0  # the window this test is about
        emu.clear_faults()
        with voiceapi.VoiceClient(api_key=emu.api_key, base_url=emu.base_url,
                                  retry_policy=FAST_RETRY) as client:
            results = client.custom_voices.create_many(_items(url, 12), journal=journal,
                                                       max_in_flight=8, poll_interval=0.05)
        assert [r.ok for r in results] == [True] * 12, [r.error for r in results]
        assert _tasks_per_id(emu) == {"1": 12}
        assert emu.internal_errors == []


@pytest.mark.slow
def test_killed_mid_batch_with_late_and_dropped_answers_reruns_exactly_once(
        tmp_path: Path) -> None:
    """Held: kill -9 after a dozen tasks, with creates answered late or dropped after the
    commit, then a rerun from the journal: every item once, none twice."""
    journal = str(tmp_path / "batch.journal")
    with KlingEmulator(concurrency=4, task_seconds=0.2, unique_external_ids=False) as emu:
        url = emu.sample_url()
        emu.inject("create", "slow", delay=1.0, times=4)
        emu.inject("create", "commit_then_drop", times=3)
        proc = subprocess.Popen([sys.executable, "-c", CHILD, emu.base_url, emu.api_key,
                                 journal, url, "30", "8"], stdout=subprocess.DEVNULL)
        _kill_when(emu, proc, 12)
        emu.clear_faults()
        with voiceapi.VoiceClient(api_key=emu.api_key, base_url=emu.base_url,
                                  retry_policy=FAST_RETRY) as client:
            results = client.custom_voices.create_many(_items(url, 30), journal=journal,
                                                       max_in_flight=8, poll_interval=0.05)
        assert all(r.ok for r in results), [r.error for r in results if not r.ok]
        assert _tasks_per_id(emu) == {"1": 30}
        assert emu.stats()["peak_in_progress"] <= 4
        assert emu.internal_errors == []


JOURNAL_LINES = [
    b'{"ext": "caf\xe9", "task_id": "1", "status": "succeed"}\n',  # not UTF-8 (edited)
    b'\xff\xfe{"ext": [1], "task_id": {}}\n',
    b'[]\n7\nnull\n{"ext": "vb-x", "task_id": "../../etc"}\n',
    b'{"ext": "vb-y", "task_id": "1", "sta',  # cut by a crash, mid-line
]


async def test_an_edited_or_foreign_journal_file_is_read_around(tmp_path: Path) -> None:
    """A journal with bytes that are not UTF-8 made create_many raise a bare
    UnicodeDecodeError; unreadable lines are now skipped like any other bad line."""
    journal = tmp_path / "batch.journal"
    journal.write_bytes(b"".join(JOURNAL_LINES))
    async with KlingEmulator(task_seconds=0.05) as emu:
        async with voiceapi.AsyncVoiceClient(api_key=emu.api_key, base_url=emu.base_url,
                                             retry_policy=FAST_RETRY) as client:
            first = await client.custom_voices.create_many(
                _items(emu.sample_url(), 3), journal=str(journal), poll_interval=0.05)
            again = await client.custom_voices.create_many(
                _items(emu.sample_url(), 3), journal=str(journal), poll_interval=0.05)
        assert [r.ok for r in first] == [True] * 3
        assert [r.task.task_id for r in again if r.task] == \
            [r.task.task_id for r in first if r.task]  # the rerun found them in the journal
        assert emu.task_count == 3
    assert journal.read_bytes().startswith(b"".join(JOURNAL_LINES))  # nothing rewritten


async def test_a_retry_never_takes_another_items_id() -> None:
    """retry_failed sends a failed item again as "<id>-r1". When another item of the batch
    already had that id as its own, the retry was answered with that item's task, and the
    failed item was reported as succeeded with the other item's voice."""
    async with KlingEmulator(concurrency=5, task_seconds=0.05) as emu:
        url = emu.sample_url()
        items = [{"voice_name": "a", "voice_url": url, "external_task_id": "job-7-r1"},
                 {"voice_name": "b", "voice_url": url + "?kling_fail=bad",
                  "external_task_id": "job-7"}]
        async with voiceapi.AsyncVoiceClient(api_key=emu.api_key, base_url=emu.base_url,
                                             retry_policy=FAST_RETRY) as client:
            first = await client.custom_voices.create_many(items, poll_interval=0.05)
            again = await client.custom_voices.create_many(items, poll_interval=0.05,
                                                           retry_failed=True)
        assert [r.ok for r in first] == [True, False]
        a, b = again
        assert a.ok and a.task is not None and a.task.external_task_id == "job-7-r1"
        assert not b.ok and isinstance(b.error, voiceapi.TaskFailedError)
        assert b.task is not None and b.task.external_task_id == "job-7"
        assert a.task.task_id != b.task.task_id
        assert emu.task_count == 2


async def test_an_empty_journal_means_a_rerun_only_until_it_is_written(tmp_path: Path) -> None:
    """An existing empty journal makes the next batch look its items up first (it may be the
    rerun of a batch killed before its first line); a coordinator that keeps the journal open
    does not make every later batch pay a lookup per item for it."""
    journal = tmp_path / "batch.journal"
    journal.touch()
    async with KlingEmulator(concurrency=5, task_seconds=0.05) as emu:
        url = emu.sample_url()
        coord = voiceapi.LocalCoordinator(journal=journal)
        async with coord, voiceapi.AsyncVoiceClient(api_key=emu.api_key,
                                                    base_url=emu.base_url,
                                                    retry_policy=FAST_RETRY) as client:
            await client.custom_voices.create_many(_items(url, 3), coordinator=coord,
                                                   poll_interval=0.05)
            looked_up = emu.count("get")
            assert emu.count("create") == 3
            later = [{"voice_name": f"later{i}", "voice_url": url} for i in range(3)]
            await client.custom_voices.create_many(later, coordinator=coord,
                                                   poll_interval=0.05)
        assert looked_up >= 3  # the first batch looked every item up before creating it
        assert emu.count("get") - looked_up <= 1  # the next one: its one probe at most
        assert emu.task_count == 6
