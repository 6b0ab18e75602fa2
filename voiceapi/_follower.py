"""The follower: tasks that hold a slot, followed until they end (polling, callbacks, timeouts).

A task holds its slot from its create until it is *seen* ending, whatever became of its item: a
timed-out item is reported as timed out but its task still runs at Kling, so its slot stays
counted (freeing it early let 12 tasks run at a cap of 3). Polls come no more often than the
tasks need (an eighth of a typical successful task, never below a floor unless the user chose
the interval, spaced by how long the last poll took) and only when a poll can change something:
an item waits for its task, or a pending item waits for a slot. Once a typical task time is
known, a poll is also due when the oldest running task should end (when its create was answered
plus that time, on our own clock: the server's clock may differ), so a freed slot is refilled
about as soon as it frees; the interval poll then only backs those up.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable

from . import _constants as C
from ._aio import within
from ._batch_models import BatchApi, VoiceGoneError
from ._batch_state import Entry, Ledger, phase_of
from ._coordinator import Coordinator
from ._errors import TaskFailedError, VoiceAPIError, WaitTimeoutError
from ._models import TaskStatus, VoiceTask
from ._tracker import FATAL, ListTracker

#: Called for an item whose earlier task failed or lost its voice, when retry_failed is on.
Retry = Callable[[Entry], bool]

#: Task ids a callback said ended before their create was answered (see ``on_callback``). Only
#: creates in flight can be in that window, so a few per concurrent send keep every genuine
#: one; forged ids only push the oldest out (the poll interval then finds that task's end).
_EARLY_ENDS_KEPT = 4 * C.BATCH_MAX_CONCURRENT_SUBMITS


class Follower:
    def __init__(self, api: BatchApi, coordinator: Coordinator, ledger: Ledger, *,
                 wait: bool, item_timeout: float | None, poll_interval: float | None,
                 callbacks: bool, retry: Retry,
                 journal: Callable[[Entry, VoiceTask], Awaitable[None]]) -> None:
        self._api = api
        self._coord = coordinator
        self._ledger = ledger
        self._wait = wait
        self._item_timeout = item_timeout
        self._fixed_interval = poll_interval
        self._callbacks = callbacks
        self._retry = retry
        self._journal = journal
        self.tracker = ListTracker(api)
        #: Task id → item, for every task of this batch that holds a slot.
        self.tracked: dict[str, Entry] = {}
        self.waiting = 0  # tracked items whose result is not final yet
        self._own = 0  # tracked tasks this batch created (kept as they change: read every turn)
        self._durations: deque[float] = deque(maxlen=50)
        self._typical: float | None = None  # median of _durations, kept as they change
        #: Task ids in attach order: each should end at its attached_at + typical, so the
        #: next expected end is near the left (amortised O(1); ids only, 8 bytes a task).
        self._ends: deque[str] = deque()
        self._last_poll = 0.0
        self._poll_started = 0.0  # a task expected to end before this was checked by a poll
        self._soon: float | None = None  # poll no later than this (a hint that a task ended)
        #: Task ids whose final callback came before this batch tracked them (oldest first).
        self._early_ends: dict[str, None] = {}
        #: An error no later poll can cure (closed client, bad credentials): the batch ends.
        self.fatal: VoiceAPIError | None = None

    # --- what we follow -----------------------------------------------------------------------

    @property
    def own_slots(self) -> int:
        """Tracked tasks that hold a slot of this batch. Tasks another worker created are
        followed too, but their slots are their creator's: counting them here kept a worker
        sharing an account from even asking for a slot."""
        return self._own

    async def attach(self, entry: Entry, task: VoiceTask) -> None:
        """Follow a task the server has: just created, re-attached or found by lookup."""
        entry.task = task
        if task.is_terminal:
            await self._ended(entry, task)
        else:
            self._track(entry, task)

    async def follow_foreign(self, entry: Entry, task_id: str, status: str) -> None:
        """Follow a task another worker created for this item (the journal named it). Its
        slot is the creator's: this batch never frees it. The journal's status is only a hint,
        so the task is tracked until a poll shows its final record."""
        entry.foreign = True
        hinted = TaskStatus(status)
        stub = VoiceTask(task_id=task_id, external_task_id=entry.key,
                         task_status=TaskStatus.SUBMITTED if hinted.is_terminal else hinted)
        entry.task = stub
        self._track(entry, stub)
        self.poll_soon()

    def _track(self, entry: Entry, task: VoiceTask) -> None:
        entry.attached_at = time.monotonic()
        if not self.tracked:  # a task just created is not done: the poll clock starts now
            self._last_poll = entry.attached_at
        self._untrack(task.task_id)  # attached again: counted once
        self.tracked[task.task_id] = entry
        if not entry.foreign:
            self._own += 1
        self._ends.append(task.task_id)
        self._ledger.set_phase(entry, phase_of(task))
        if self._early_ends and self._early_ends.pop(task.task_id, 0) is None:
            self.poll_soon(C.BATCH_CALLBACK_COALESCE)  # its callback said it ended already
        if entry.done:
            return
        if self._wait:
            self.waiting += 1
        else:
            self._ledger.resolve(entry, task=task)  # wait=False: submitted is the result

    def _untrack(self, task_id: str) -> Entry | None:
        entry = self.tracked.pop(task_id, None)
        if entry is not None and not entry.foreign:
            self._own -= 1
        return entry

    async def _ended(self, entry: Entry, task: VoiceTask) -> None:
        if self._untrack(task.task_id) is not None:
            self.tracker.forget(task.task_id)
            if self._wait and not entry.done:
                self.waiting -= 1
        if not entry.foreign:  # a foreign task's slot is its creator's to free
            await self._coord.finished(entry.key, task.task_id, task.task_status.value)
        await self._journal(entry, task)
        if entry.done and isinstance(entry.error, WaitTimeoutError):
            return  # reported as timed out already; only its slot was still held
        entry.task = task
        if task.task_status is TaskStatus.SUCCEED:
            if not entry.earlier or _has_voice(task):
                self._note_duration(task)
                self._ledger.resolve(entry, task=task)
            elif not self._retry(entry):
                self._ledger.resolve(entry, task=task, error=VoiceGoneError(task))
        elif not (entry.earlier and self._retry(entry)):
            self._ledger.resolve(entry, task=task, error=TaskFailedError(
                task, sent=self._api.credential_mask()))

    async def observed(self, task: VoiceTask) -> None:
        entry = self.tracked.get(task.task_id)
        if entry is None:
            return
        if task.is_terminal:
            await self._ended(entry, task)
            return
        if entry.error is None:
            entry.task = task
            self._ledger.set_phase(entry, phase_of(task))

    def _note_duration(self, task: VoiceTask) -> None:
        if task.created_at is not None and task.updated_at is not None:
            self._durations.append((task.updated_at - task.created_at).total_seconds())
            self._typical = _median(self._durations)

    def expire(self, now: float) -> float | None:
        """Time out items whose task ran longer than ``item_timeout`` (they keep their slot).
        Returns when the next one would time out."""
        if self._item_timeout is None or not self.waiting:
            return None
        limit = self._item_timeout
        soonest: float | None = None
        for tid, entry in list(self.tracked.items()):
            if entry.done:
                continue
            due = entry.attached_at + limit
            if now >= due:
                self.waiting -= 1
                self._ledger.resolve(entry, error=WaitTimeoutError(tid, limit, entry.task))
            elif soonest is None or due < soonest:
                soonest = due
        return soonest

    def time_out_all(self, limit: float) -> None:
        """The batch deadline: every item still waiting for its task is timed out."""
        for tid, entry in self.tracked.items():
            if not entry.done:
                self._ledger.resolve(entry, error=WaitTimeoutError(tid, limit, entry.task))
        self.waiting = 0

    # --- polling --------------------------------------------------------------------------------

    def interval(self) -> float:
        """Time between polls: the user's, or an eighth of a typical successful task within
        [floor, max] (fast failures are not "typical": they drove a 10 ms poll storm)."""
        if self._fixed_interval is not None:
            base = self._fixed_interval
        else:
            typical = self._typical or 0.0
            base = min(max(typical * C.BATCH_POLL_FRACTION, C.BATCH_POLL_FLOOR),
                       C.BATCH_POLL_INTERVAL)
            if self._callbacks:
                base *= C.BATCH_CALLBACK_POLL_FACTOR
        return max(base, C.BATCH_POLL_SPACING_FACTOR * self.tracker.last_duration)

    def poll_soon(self, delay: float = 0.0) -> None:
        """Something suggests a task ended (a callback, a 1303): poll after ``delay``, but
        never more often than every BATCH_MIN_POLL_GAP."""
        at = time.monotonic() + delay
        self._soon = at if self._soon is None else min(self._soon, at)

    def next_poll_at(self, *, slots_wanted: bool) -> float | None:
        """When to poll next, or None when a poll cannot change anything now. With no task
        of our own, a poll still lets the coordinator free slots of tasks nobody follows."""
        if not (self.tracked and self.waiting) and not slots_wanted:
            return None
        interval = self.interval()
        if not self.tracked:
            # Only slots are wanted, and no task of ours can free one: a poll finds only
            # orphans (a coordinator's), so never more often than the callback gap (a tiny
            # poll_interval made this a busy loop while the batch's creates were answered).
            interval = max(interval, C.BATCH_MIN_POLL_GAP)
        expected = self._next_expected_end()
        if expected is None:
            due = self._last_poll + interval
        else:
            # A slot frees when its task ends: look then, not up to an interval later (never
            # closer to the last poll than its cost allows, nor than the floor unless the user
            # chose the interval). Those polls find most ends, so the interval poll only backs
            # them up (tasks ending early) and stretches, which keeps requests per voice down.
            gap = C.BATCH_POLL_SPACING_FACTOR * self.tracker.last_duration
            if self._fixed_interval is None:
                gap = max(gap, C.BATCH_POLL_FLOOR)
            due = min(self._last_poll + interval * C.BATCH_POLL_SCHEDULED_STRETCH,
                      max(expected, self._last_poll + gap))
        if self._soon is not None:
            due = min(due, max(self._soon, self._last_poll + C.BATCH_MIN_POLL_GAP))
        return due

    def _next_expected_end(self) -> float | None:
        """When the next tracked task should end (attached + a typical successful task), among
        those no poll has looked at since; None before any task succeeded. Tasks expected
        earlier but still running are late: the regular interval follows them."""
        typical, ends, tracked = self._typical, self._ends, self.tracked
        while ends:
            entry = tracked.get(ends[0])
            if entry is not None:
                if typical is None:
                    return None
                end = entry.attached_at + typical
                if end > self._poll_started:
                    return end
            ends.popleft()
        return None

    async def poll(self, time_left: float | None) -> None:
        """One look at the tracked tasks. A failed poll is tried again later, except for
        errors no retry cures (closed client, credentials): those end the batch (``fatal``)."""
        self._soon = None
        self._poll_started = time.monotonic()
        ids = list(self.tracked)
        found: dict[str, VoiceTask] = {}
        try:
            observe = self._coord.observe(ids, self.tracker.poll, self._api.lookup)
            found = dict(await (observe if time_left is None
                                else within(observe, max(time_left, 0.0))))
        except FATAL as exc:
            self.fatal = exc
        except (VoiceAPIError, asyncio.TimeoutError, TimeoutError):
            pass
        self._last_poll = time.monotonic()
        for task in found.values():
            await self.observed(task)
        for tid, error in list(self.tracker.gone.items()):
            await self._gone(tid, error)

    async def _gone(self, task_id: str, error: VoiceAPIError) -> None:
        """The server says a tracked task does not exist: stop following it."""
        self.tracker.forget(task_id)
        entry = self._untrack(task_id)
        if entry is None:
            return
        if not entry.foreign:
            await self._coord.release(entry.key)
        if not entry.done:
            if self._wait:
                self.waiting -= 1
            self._ledger.resolve(entry, error=error)

    def end(self, error: VoiceAPIError) -> None:
        """The batch stops early: every item still waiting gets ``error``."""
        for entry in self.tracked.values():
            if not entry.done:
                self._ledger.resolve(entry, error=error)
        self.waiting = 0

    def on_callback(self, task: VoiceTask) -> bool:
        """A callback says a task ended: check soon (callbacks are hints; the API is truth).
        The check waits a moment so that callbacks arriving together share one poll; a
        callback about a task still running changes nothing for the batch."""
        if not task.is_terminal:
            return False
        if task.task_id in self.tracked:
            self.poll_soon(C.BATCH_CALLBACK_COALESCE)
            return True
        # Not tracked (yet): a fast task can end, and its callback arrive, while its create's
        # answer is still on the wire. Ignoring it left the batch waiting for its safety-net
        # poll (callbacks stretch the poll interval), so it is kept for ``_track``.
        early = self._early_ends
        early.pop(task.task_id, None)
        early[task.task_id] = None
        if len(early) > _EARLY_ENDS_KEPT:
            del early[next(iter(early))]
        return False


def _median(values: deque[float]) -> float:
    """``statistics.median`` of at most 50 numbers, without importing ``statistics`` (and
    ``fractions``) into every batch for this one line."""
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _has_voice(task: VoiceTask) -> bool:
    voice = task.voice
    return voice is not None and not voice.is_deleted


__all__ = ["Follower"]
