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


def _body_key(entry: Entry) -> str:
    return entry.body["external_task_id"] if entry.body is not None else ""


@attrs.define(eq=False)
class Entry:
    """One item of the batch while it runs.

    Every item of a batch has one from the start, so each field costs 8 bytes times the batch
    (a 100k batch: 0.8 MB a field); what an item needs only while it is sent (its create body)
    is let go once its task exists.
    """

    #: The item as the caller gave it (their own dict: never copied, it is theirs to keep).
    input: dict[str, Any]
    #: The create body: None for an item that failed validation, and None again once its task
    #: exists (unless a retry may send it again: ``release_body``).
    body: dict[str, str] | None
    #: The item's external_task_id (empty for an item that failed validation).
    key: str = attrs.field(default=attrs.Factory(_body_key, takes_self=True))
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

    def rekey(self, key: str) -> None:
        """Send the item under another external id (a retry's fresh id)."""
        assert self.body is not None
        self.body = {**self.body, "external_task_id": key}
        self.key = key

    def release_body(self) -> None:
        """The task exists: the create body is not needed again (≈ 180 bytes an item while
        the batch runs). Only a retry sends it again, so keep it when retries are on."""
        self.body = None

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
