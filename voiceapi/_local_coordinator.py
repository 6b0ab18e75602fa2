"""The in-process slot coordinator (the default) and the file journal it can keep.

One process, one account: slots are a dict, the cap is a number, the journal is a dict backed
(optionally) by an append-only JSON-lines file that a rerun reads to follow instead of create.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import time
from collections.abc import Collection, Mapping, Sequence
from types import TracebackType
from typing import IO

from . import _constants as C
from ._aio import within
from ._batch_models import JournalError
from ._config import checked_number
from ._coordinator import Grant, JournalEntry, LookupFunction, PollFunction
from ._errors import ValidationError
from ._models import TaskStatus, VoiceTask

#: The status of a task just created (``TaskStatus.SUBMITTED.value``): the journal stores it
#: implicitly (see ``LocalCoordinator._journal``).
_SUBMITTED = TaskStatus.SUBMITTED.value


def _compact(task_id: str, status: str) -> str | tuple[str, str]:
    return task_id if status == _SUBMITTED else (task_id, status)


try:  # POSIX; elsewhere the journal is simply not locked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]


class FileJournal:
    """Append-only JSON lines ``{"ext", "task_id", "status"}``, one per state change.

    Each line is flushed, so the journal survives a crash or Ctrl-C mid-batch. The file is locked
    while open: a second writer (another batch or process) is refused with JournalError instead
    of interleaving lines.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        self._keep = True
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            raise JournalError(f"journal directory does not exist: {directory}")
        #: The file was there already, with nothing in it: a batch opened it and was killed
        #: before its first record (possibly after the server had accepted creates). Only
        #: until this journal writes: later batches sharing it are not reruns of that one.
        self.was_empty = os.path.isfile(self.path) and os.path.getsize(self.path) == 0
        try:
            # Lines are written as ASCII JSON; bytes that are not UTF-8 (an edited or foreign
            # file) only make their line unreadable, skipped like any other bad line.
            fh = open(self.path, "a+", encoding="utf-8",  # noqa: SIM115 (kept open)
                      errors="replace")
        except OSError as exc:
            raise JournalError(f"cannot open journal {self.path}: {exc.strerror}") from None
        if fcntl is not None:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.close()
                raise JournalError(f"journal {self.path} is in use by another batch (locked); "
                                   "wait for it to finish or use another journal") from None
        self._fh: IO[str] | None = fh
        self.entries: dict[str, JournalEntry] = {}
        fh.seek(0)
        line = ""
        for line in fh:
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if isinstance(rec, dict) and isinstance(rec.get("ext"), str) \
                        and isinstance(rec.get("task_id"), str):
                    self.entries[rec["ext"]] = JournalEntry(rec["task_id"],
                                                            str(rec.get("status")))
        if line and not line.endswith("\n"):
            # A line cut short by a crash: end it, or the next record would be glued to it.
            self._append("\n")

    def record(self, ext: str, task_id: str, status: str) -> None:
        if self._fh is None:
            return
        if self._keep:
            entry = JournalEntry(task_id, status)
            if self.entries.get(ext) == entry:
                return
            self.entries[ext] = entry
        self._append(json.dumps({"ext": ext, "task_id": task_id, "status": status}) + "\n")

    def hand_over(self) -> dict[str, JournalEntry]:
        """Give the entries read from the file to an owner that keeps the state itself (and
        skips records that change nothing): from now on ``record`` only writes, so the state
        is not held twice per item."""
        entries, self.entries, self._keep = self.entries, {}, False
        return entries

    def _append(self, text: str) -> None:
        """Write and flush one line. A failure (disk full, I/O error) is a JournalError: the
        batch must stop, not go on with a journal that could not resume it."""
        assert self._fh is not None
        self.was_empty = False
        try:
            self._fh.write(text)
            self._fh.flush()
        except OSError as exc:
            raise JournalError(f"cannot write journal {self.path}: "
                               f"{exc.strerror or exc}") from None

    def close(self) -> None:
        """Release the lock and close the file (safe to call twice)."""
        fh, self._fh = self._fh, None
        if fh is not None:
            fh.close()  # closing drops the flock


class SlotCap:
    """The working cap: a fixed ceiling or a learned number; 1303 lowers it either way.

    A learned cap starts small and grows while creates are accepted at the cap; after the first
    1303 it probes one step up only now and then (the account's cap may have grown, or other
    users' tasks ended). A fixed ceiling is the most we ever use, never a promise.
    """

    def __init__(self, ceiling: int | None) -> None:
        if ceiling is not None and (isinstance(ceiling, bool) or not isinstance(ceiling, int)
                                    or ceiling < 1):
            raise ValidationError("max_in_flight must be an integer >= 1")
        self.ceiling = ceiling
        self.value = ceiling if ceiling is not None else C.BATCH_INITIAL_SLOTS
        self.learned = False  # a 1303 has been seen
        self._accepted_since_cut = 0

    def on_accepted(self, held: int) -> None:
        top = self.ceiling if self.ceiling is not None else C.BATCH_MAX_SLOTS
        self._accepted_since_cut += 1
        if held < self.value or self.value >= top:
            return
        if not self.learned or self._accepted_since_cut >= C.BATCH_PROBE_EVERY * self.value:
            self.value += 1
            self._accepted_since_cut = 0

    def on_refused(self, held: int) -> None:
        """The account is full while we hold ``held`` slots: the cap is at most that."""
        self.learned = True
        self._accepted_since_cut = 0
        self.value = max(1, min(self.value, held))


class LocalCoordinator:
    """The default coordinator: slots, cap and journal for batches in this process.

    ``max_in_flight`` fixes a ceiling (else the cap is learned from 1303 answers); ``journal`` is
    a file path for a journal that survives the process. Share one instance between batches
    (or pass it as the client's ``coordinator``) to make them share the account's cap. Close it
    (``async with`` or :meth:`close`) to release the journal file.
    """

    def __init__(self, max_in_flight: int | None = None, *,
                 journal: str | os.PathLike[str] | None = None,
                 rate_limit_delay: float = C.RATE_LIMIT_MIN_DELAY) -> None:
        self._cap = SlotCap(max_in_flight)
        # checked here: a bad value only failed (or hung for ever, for inf) at a 1303
        checked_number(rate_limit_delay, "rate_limit_delay", exclusive=False)
        if journal is not None and not isinstance(journal, (str, os.PathLike)):
            raise ValidationError(f"journal must be a file path, got {type(journal).__name__}")
        # The journal's state is held here only (the file's own copy cost ≈ 80 bytes an item).
        self._file = FileJournal(journal) if journal is not None else None
        # Plain (task id, status) tuples: the garbage collector stops tracking tuples of
        # strings, and full collections over a 100,000-item journal grew the CPU per item.
        # A task still "submitted" (every task of a batch while it is sent) is its bare task
        # id: no tuple at all, 56 bytes an item less while a big batch runs.
        self._journal: dict[str, str | tuple[str, str]] = {}
        if self._file is not None:
            for k, e in self._file.hand_over().items():
                self._journal[k] = _compact(e.task_id, e.status)
        self._held: dict[str, str | None] = {}  # key -> task id once accepted
        # Keys whose create a batch of ours saw accepted. A dict, not a set: a set of 10,000
        # to 50,000 strings takes 50–105 bytes an entry (it quadruples as it grows), a dict
        # about 21.
        self._created: dict[str, None] = {}
        self._by_task: dict[str, str] = {}  # task id -> key, for held slots with a task
        self._followed: dict[str, float] = {}  # key -> when a batch last asked about it
        #: Keys whose create was cancelled before its answer (see ``abandon``) -> when. Their
        #: slot stays held until a lookup in ``observe`` settles them.
        self._doubt: dict[str, float] = {}
        self._settling: set[str] = set()  # doubtful keys being looked up right now
        #: Doubtful key -> when it may be looked up again (BATCH_DOUBT_LOOKUP_GAP apart).
        self._doubt_next: dict[str, float] = {}
        #: Settled doubts found still running: held here, but no batch created them, so
        #: batches follow them as another's and never free them; observe() does.
        self._unowned: set[str] = set()
        self._rate_limit_delay = rate_limit_delay
        self._not_before = 0.0  # no creates before (after a 1303 with nothing of ours running)
        self._requests_not_before = 0.0  # no requests before (after a 1302)
        self._changed = asyncio.Event()

    # --- journal ----------------------------------------------------------------------------

    async def known(self, keys: Sequence[str]) -> Mapping[str, JournalEntry]:
        journal = self._journal
        found: dict[str, JournalEntry] = {}
        for k in keys:
            value = journal.get(k)
            if value is None:
                continue
            found[k] = JournalEntry(value, _SUBMITTED) if type(value) is str else \
                JournalEntry(*value)
        return found

    async def record(self, key: str, task_id: str, status: str) -> None:
        self._write(key, task_id, status)

    def _write(self, key: str, task_id: str, status: str) -> None:
        value = _compact(task_id, status)
        if self._journal.get(key) == value:
            return  # nothing changed: no line for the file either
        self._journal[key] = value
        if self._file is not None:
            self._file.record(key, task_id, status)

    # --- slots --------------------------------------------------------------------------------

    async def acquire(self, key: str) -> Grant:
        # Held now, or created by a batch of this coordinator whose task has since ended (its
        # slot is free again): either way another batch owns this voice, so follow it through
        # the journal. Without the second test, a batch that waited for a slot while another
        # created and finished the same item would create it again on a server that accepts a
        # repeated external id.
        if self.key_waits(key):
            return Grant.WAIT  # its cancelled create is not settled yet: only it waits
        if key in self._held or key in self._created:
            return Grant.FOLLOW
        if time.monotonic() < self._not_before or len(self._held) >= self._cap.value:
            return Grant.WAIT
        self._held[key] = None
        return Grant.CREATE

    async def adopt(self, key: str, task_id: str, status: str) -> None:
        """Hold a slot for a running task found from an earlier run (not created now): it
        counts against the account's cap until it is seen ending. Never refused."""
        self._hold(key, task_id)
        self._write(key, task_id, status)

    def _hold(self, key: str, task_id: str) -> None:
        self._doubt.pop(key, None)
        self._doubt_next.pop(key, None)
        self._held[key] = task_id
        self._by_task[task_id] = key
        self._followed[key] = time.monotonic()

    def _free(self, key: str) -> None:
        self._doubt.pop(key, None)
        self._doubt_next.pop(key, None)
        self._unowned.discard(key)
        task_id = self._held.pop(key, None)
        if task_id is not None:
            self._by_task.pop(task_id, None)
        self._followed.pop(key, None)

    async def wait_for_slot(self, timeout: float) -> None:
        now = time.monotonic()
        if self._not_before > now:
            timeout = min(timeout, self._not_before - now)
        event = self._changed
        with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
            await within(event.wait(), max(0.0, timeout))

    def _notify(self) -> None:
        # A fresh event per change: every waiter of the old one wakes, none misses a change.
        self._changed.set()
        self._changed = asyncio.Event()

    async def accepted(self, key: str, task_id: str, status: str) -> None:
        self._created[key] = None
        self._hold(key, task_id)
        self._write(key, task_id, status)
        self._cap.on_accepted(len(self._held))

    async def refused(self, key: str) -> float:
        self._free(key)
        self._cap.on_refused(len(self._held))
        delay = self._rate_limit_delay * random.uniform(1.0, 2.0)
        if not self._held:  # nothing of ours will end and free a slot: wait by time
            self._not_before = max(self._not_before, time.monotonic() + delay)
        self._notify()
        return delay

    async def release(self, key: str) -> None:
        self._free(key)
        self._notify()

    async def finished(self, key: str, task_id: str, status: str) -> None:
        self._free(key)
        self._write(key, task_id, status)
        self._notify()

    def abandon(self, key: str) -> None:
        """The create under ``key`` was cancelled before its answer (its batch was cancelled,
        or reached its deadline): it may or may not have landed. Its slot stays counted (a
        task that landed runs at Kling), but no batch follows it any more: ``observe`` looks
        the key up and settles it (running: followed like an orphan; ended: freed and
        journaled; unknown after BATCH_ORPHAN_AFTER, as its create may still land: freed).
        Before, nobody settled it: the slot was held for the coordinator's lifetime, and a
        shared coordinator with a cap of 2 and two cancelled creates never granted a slot
        again."""
        if key in self._held and self._held[key] is None:  # never accepted
            self._doubt[key] = time.monotonic()

    def in_doubt(self, key: str) -> bool:
        """A create under ``key`` was abandoned and nothing has settled it since."""
        return key in self._doubt

    def key_waits(self, key: str) -> bool:
        """``acquire(key)`` waits for this key alone: its abandoned create is unsettled."""
        return key in self._doubt and key in self._held

    async def _settle_doubts(self, lookup: LookupFunction, now: float) -> None:
        """Look abandoned creates up (see ``abandon``); a failed lookup is tried next time."""
        for key, since in list(self._doubt.items()):
            if key in self._settling or self._held.get(key, "") is not None:
                continue  # being looked up, or settled by an answer meanwhile
            if now < min(self._doubt_next.get(key, 0.0), since + C.BATCH_ORPHAN_AFTER):
                continue  # not found a moment ago: polls come far more often than that
            self._settling.add(key)
            try:
                task = await lookup(key)
            except Exception:  # anything but "not found": it may exist, keep it counted
                continue
            finally:
                self._settling.discard(key)
            if key not in self._doubt:
                continue  # settled meanwhile (accepted, released)
            if task is None:
                if now - since >= C.BATCH_ORPHAN_AFTER:
                    self._free(key)  # nothing landed: the slot is free, the key is new
                    self._notify()
                else:  # asked again a little later, or once it is old enough to be freed
                    self._doubt_next[key] = now + C.BATCH_DOUBT_LOOKUP_GAP
                continue
            self._created[key] = None
            if task.is_terminal:
                await self.finished(key, task.task_id, task.task_status.value)
            else:
                await self.adopt(key, task.task_id, task.task_status.value)
                self._unowned.add(key)

    @property
    def journal_was_empty(self) -> bool:
        """Its journal file existed, empty, when opened (see ``FileJournal.was_empty``)."""
        return self._file is not None and self._file.was_empty

    @property
    def cap(self) -> int:
        return self._cap.value

    @property
    def in_flight(self) -> int:
        return len(self._held)

    # --- polling ------------------------------------------------------------------------------

    async def observe(self, mine: Collection[str], poll: PollFunction,
                      lookup: LookupFunction) -> Mapping[str, VoiceTask]:
        """``poll(mine)``, plus any orphans: tasks holding a slot that no batch has asked
        about for a while (a batch that returned with ``wait=False`` or timed-out items).
        They still run at Kling, so they keep their slot until someone sees them end."""
        now = time.monotonic()
        wanted = set(mine)
        for tid in wanted:
            key = self._by_task.get(tid)
            if key is not None:
                self._followed[key] = now
        if self._doubt:
            await self._settle_doubts(lookup, now)
        orphans = {tid: key for tid, key in self._by_task.items() if tid not in wanted
                   and now - self._followed.get(key, 0.0) > C.BATCH_ORPHAN_AFTER}
        if not wanted and not orphans:
            return {}
        seen = await poll(list(wanted) + list(orphans))
        for tid, key in orphans.items():
            task = seen.get(tid)
            if task is not None and task.is_terminal:
                await self.finished(key, tid, task.task_status.value)
            else:
                self._followed[key] = now  # asked about: not again before the next interval
        for key in list(self._unowned):
            held_task = self._held.get(key)
            task = seen.get(held_task) if held_task is not None else None
            if task is not None and task.is_terminal:
                await self.finished(key, task.task_id, task.task_status.value)
        return {tid: task for tid, task in seen.items() if tid in wanted}

    # --- plain client calls -------------------------------------------------------------------

    async def before_request(self, *, create: bool) -> None:
        until = max(self._requests_not_before, self._not_before if create else 0.0)
        delay = until - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    async def rate_limited(self, code: int | None, retry_after: float | None) -> None:
        delay = retry_after if retry_after is not None else \
            self._rate_limit_delay * random.uniform(1.0, 2.0)
        until = time.monotonic() + delay
        if code == 1303:
            if not self._held:  # else one of our tasks ending frees a slot sooner
                self._not_before = max(self._not_before, until)
        else:
            self._requests_not_before = max(self._requests_not_before, until)

    # --- lifetime -----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the journal file (safe to call twice)."""
        if self._file is not None:
            self._file.close()

    async def __aenter__(self) -> LocalCoordinator:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"LocalCoordinator(cap={self.cap}, in_flight={self.in_flight}, "
                f"journal={self._file.path if self._file else None!r})")


__all__ = ["FileJournal", "LocalCoordinator", "SlotCap"]
