"""Adversarial kill -9 attacks on a journaled create_many (advbatch): a real child process is
killed with SIGKILL at different points of its batch, then a new process resumes from the
journal, under each reading of the API the emulator can play. Every attack here held; they
record the promise: no voice created twice (the emulator's ``tasks_per_external_id``), none
lost, results in input order, and a rerun of a finished journal creates nothing (one check per
journal line, as the README says).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import voiceapi
from tests.conftest import FAST_RETRY
from voiceapi.testing import KlingEmulator

CHILD = r"""
import sys, voiceapi
base, key, journal, url, n, cap = sys.argv[1:7]
items = [{"voice_name": f"v{i}", "voice_url": url + ("?kling_fail=bad" if i % 7 == 0 else "")}
         for i in range(int(n))]
with voiceapi.VoiceClient(api_key=key, base_url=base) as client:
    client.custom_voices.create_many(items, journal=journal, max_in_flight=int(cap))
print("finished", flush=True)
"""

N, CAP = 15, 5

READINGS: dict[str, dict[str, Any]] = {
    "strict-newest": {"profile": "strict-real", "list_order": "newest"},
    "strict-oldest": {"profile": "strict-real", "list_order": "oldest"},
    "loose": {"unique_external_ids": False, "deleted_voices": "drop", "numeric_money": True,
              "list_order": "oldest", "pending_voices": "null"},
}


def _items(url: str) -> list[dict[str, Any]]:
    return [{"voice_name": f"v{i}", "voice_url": url + ("?kling_fail=bad" if i % 7 == 0 else "")}
            for i in range(N)]


def _lines(path: str) -> int:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read().count("\n")
    except FileNotFoundError:
        return 0


def _ended(emu: KlingEmulator) -> int:
    return sum(1 for t in emu.tasks() if t["task_status"] in ("succeed", "failed"))


#: Where to kill the child: a condition on what the server (or the journal) holds.
KILL_POINTS: dict[str, Callable[[KlingEmulator, str], bool]] = {
    "first-create-stored": lambda emu, j: emu.task_count >= 1,
    "first-journal-line": lambda emu, j: _lines(j) >= 1,
    "slots-full": lambda emu, j: emu.task_count >= CAP,
    "mid-follow": lambda emu, j: _ended(emu) >= CAP + 2,
}


def _run_child(emu: KlingEmulator, journal: str, url: str,
               kill_when: Callable[[KlingEmulator, str], bool] | None) -> None:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, emu.base_url, emu.api_key, journal,
                             url, str(N), str(CAP)], stdout=subprocess.DEVNULL)
    if kill_when is None:
        assert proc.wait(60) == 0
        return
    deadline = time.monotonic() + 60
    while not kill_when(emu, journal) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert proc.poll() is None, "the batch ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)


def _resume_and_check(emu: KlingEmulator, journal: str, url: str) -> None:
    with voiceapi.VoiceClient(api_key=emu.api_key, base_url=emu.base_url,
                              retry_policy=FAST_RETRY) as client:
        items = _items(url)
        results = client.custom_voices.create_many(items, journal=journal,
                                                   max_in_flight=CAP, poll_interval=0.05)
    assert [r.input for r in results] == items  # input order, the caller's own dicts
    assert [r.ok for r in results] == [i % 7 != 0 for i in range(N)], \
        [r.error for r in results]
    assert all(isinstance(r.error, voiceapi.TaskFailedError) for r in results if not r.ok)
    stats = emu.stats()
    assert stats["tasks_per_external_id"] == {"1": N}, stats["repeated_external_ids"]
    assert stats["peak_in_progress"] <= CAP
    assert emu.internal_errors == []


@pytest.mark.parametrize("point", list(KILL_POINTS))
@pytest.mark.parametrize("reading", ["loose", "strict-oldest"])
def test_killed_at_any_point_the_resume_creates_each_voice_once(
        tmp_path: Path, point: str, reading: str) -> None:
    journal = str(tmp_path / "batch.journal")
    with KlingEmulator(concurrency=CAP, task_seconds=0.3, **READINGS[reading]) as emu:
        url = emu.sample_url()
        _run_child(emu, journal, url, KILL_POINTS[point])
        _resume_and_check(emu, journal, url)


@pytest.mark.parametrize("reading", list(READINGS))
def test_a_finished_journal_resumes_without_a_create(tmp_path: Path, reading: str) -> None:
    """The README's cost: a rerun follows the journal's tasks (each line checked against its
    task), so a finished journal costs no create and at most one check per item."""
    journal = str(tmp_path / "batch.journal")
    with KlingEmulator(concurrency=CAP, task_seconds=0.05, **READINGS[reading]) as emu:
        url = emu.sample_url()
        _run_child(emu, journal, url, None)
        creates, before = emu.count("create"), emu.stats()["requests"]
        _resume_and_check(emu, journal, url)
        assert emu.count("create") == creates
        assert emu.stats()["requests"] - before <= N
