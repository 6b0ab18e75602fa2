"""Per-item state and the running counts behind ``on_progress``.

Counts are kept current as each item changes phase, so a progress report costs O(1) however
large the batch (a 100k-item batch must not recount every item per report).
"""

from __future__ import annotations

import enum
import time
from typing import Any

import attrs

from . import _constants as C
from ._batch_models import BatchProgress, ProgressCallback
from ._errors import VoiceAPIError
from ._models import BatchResult, TaskStatus, VoiceTask


class Phase(enum.Enum):
    PENDING = "pending"
    SUBMITTED = "submitted"
    PROCESSING = "processing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


def phase_of(task: VoiceTask) -> Phase:
    status = task.task_status
    if status is TaskStatus.SUCCEED:
        return Phase.SUCCEEDED
    if status is TaskStatus.FAILED:
        return Phase.FAILED
    return Phase.PROCESSING if status is TaskStatus.PROCESSING else Phase.SUBMITTED


@attrs.define(eq=False)
class Entry:
    """One item of the batch while it runs."""

    input: dict[str, Any]
    #: The create body (None for an item that failed validation); its external_task_id is key.
    body: dict[str, str] | None
    task: VoiceTask | None = None
    error: VoiceAPIError | None = None
    phase: Phase = Phase.PENDING
    #: The result is final: the batch no longer waits for this item (its task may still run
    #: and hold a slot: a timed-out item, or any item with ``wait=False``).
    done: bool = False
    #: The task existed before this batch (journal or a refused duplicate id).
    earlier: bool = False
    #: How many times ``retry_failed`` gave this item a fresh id, and its first id.
    generation: int = 0
    origin: str | None = None
    attached_at: float = 0.0
    #: Look the item up before creating it (another batch held its id a moment ago).
    look_first: bool = False
    #: Its task was created by another worker, which holds its slot: followed, never freed.
    foreign: bool = False

    @property
    def key(self) -> str:
        assert self.body is not None
        return self.body["external_task_id"]

    def result(self) -> BatchResult:
        return BatchResult(input=self.input, task=self.task, error=self.error)


class Ledger:
    """The items, their phase counts, and the throttled progress reports."""

    def __init__(self, entries: list[Entry], on_progress: ProgressCallback | None) -> None:
        self.entries = entries
        self.counts = dict.fromkeys(Phase, 0)
        for entry in entries:
            self.counts[entry.phase] += 1
        self._on_progress = on_progress
        self._last_report = 0.0
        self._reported: BatchProgress | None = None
        self.dirty = False

    def set_phase(self, entry: Entry, phase: Phase) -> None:
        if entry.phase is not phase:
            self.counts[entry.phase] -= 1
            self.counts[phase] += 1
            entry.phase = phase
            self.dirty = True

    def resolve(self, entry: Entry, *, task: VoiceTask | None = None,
                error: VoiceAPIError | None = None) -> None:
        """Make the item's result final (a running task with no error: ``wait=False``)."""
        if task is not None:
            entry.task = task
        entry.error = error
        entry.done = True
        if error is not None:
            self.set_phase(entry, Phase.FAILED)
        elif entry.task is not None:
            self.set_phase(entry, phase_of(entry.task))
        self.dirty = True

    def snapshot(self, in_flight: int, slots: int) -> BatchProgress:
        c = self.counts
        return BatchProgress(total=len(self.entries), pending=c[Phase.PENDING],
                             submitted=c[Phase.SUBMITTED], processing=c[Phase.PROCESSING],
                             succeeded=c[Phase.SUCCEEDED], failed=c[Phase.FAILED],
                             in_flight=in_flight, slots=slots)

    def next_report_at(self) -> float | None:
        """When a held-back report is due (None: nothing to report)."""
        if self._on_progress is None or not self.dirty:
            return None
        return self._last_report + C.BATCH_PROGRESS_INTERVAL

    def report(self, in_flight: int, slots: int, *, force: bool = False) -> None:
        """Call ``on_progress`` if something changed (at most every BATCH_PROGRESS_INTERVAL;
        ``force`` for the first and last report; never two identical reports in a row)."""
        if self._on_progress is None:
            return
        now = time.monotonic()
        if not force and (not self.dirty or now - self._last_report < C.BATCH_PROGRESS_INTERVAL):
            return
        snap = self.snapshot(in_flight, slots)
        self.dirty = False
        if snap == self._reported:  # never the same report twice
            return
        self._last_report = now
        self._reported = snap
        self._on_progress(snap)


__all__ = ["Entry", "Ledger", "Phase", "phase_of"]
