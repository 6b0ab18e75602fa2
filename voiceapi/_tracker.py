"""Finding tracked tasks at Kling cheaply, whatever order the server lists them in.

One list page covers many tracked tasks, so polling reads pages, not tasks. The list order is
undocumented (kling-api.md §11.1): newest first puts a batch's tasks on the first pages, oldest
first on the last ones. The tracker learns the order from the ``created_at`` of the records it
reads and where the tracked tasks sit, starts its walks there, and looks the rest up one by one
in bounded numbers. Only records whose raw ``task_id`` is tracked are parsed.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping
from typing import Any, Protocol

from . import _constants as C
from ._coordinator import CoordinatorError
from ._create import INCURABLE
from ._decode import is_not_found, parse_task
from ._errors import ValidationError, VoiceAPIError
from ._models import VoiceTask
from ._pages import PageLimit, fetch_page

NEWEST, OLDEST = "newest", "oldest"

#: Errors no later poll can cure (closed client, credentials, account, a shared coordinator
#: that lost its store): never swallowed.
FATAL = (*INCURABLE, CoordinatorError)


class TaskSource(Protocol):
    """What the tracker reads: raw list pages and single tasks (part of ``BatchApi``)."""

    @property
    def page_limit(self) -> PageLimit: ...

    async def list_page(self, page_num: int, page_size: int) -> list[Any]: ...

    async def get(self, task_id: str) -> VoiceTask: ...


def raw_task_id(record: Any) -> str | None:
    """A record's ``task_id`` without parsing the record (ids may come as numbers)."""
    if not isinstance(record, Mapping):
        return None
    tid = record.get("task_id")
    if isinstance(tid, str):
        return tid
    if isinstance(tid, int) and not isinstance(tid, bool):
        return str(tid)
    return None


def _created(record: Any) -> float | None:
    value = record.get("created_at") if isinstance(record, Mapping) else None
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def list_order(records: list[Any]) -> str | None:
    """``newest``/``oldest`` from the first and last records' ``created_at``; None if unsure."""
    if len(records) < 2:
        return None
    first, last = _created(records[0]), _created(records[-1])
    if first is None or last is None or first == last:
        return None
    return NEWEST if first > last else OLDEST


class ListTracker:
    """The batch's poll function: ``await tracker.poll(task_ids)`` → the tasks it found."""

    def __init__(self, api: TaskSource, *, max_pages: int = C.BATCH_MAX_POLL_PAGES,
                 max_lookups: int = C.BATCH_MAX_LOOKUPS_PER_POLL) -> None:
        self._api = api
        self._max_pages = max_pages
        self._max_lookups = max_lookups
        self.order: str | None = None
        #: Oldest first: the index (from the list's start) of the first tracked task last seen.
        self._hint: int | None = None
        self._missed: dict[str, int] = {}
        self._asked: dict[str, int] = {}  # task id -> the lookup number it was last asked at
        self._not_found: dict[str, int] = {}
        #: Tracked tasks the server said, repeatedly, do not exist: the caller drops them.
        self.gone: dict[str, VoiceAPIError] = {}
        #: The last poll's own cost in seconds (the scheduler spaces polls by it): each of its
        #: requests counted at the fastest time seen for its kind, so time spent queued behind
        #: the client's own rate limit (creates sent meanwhile) is left out; that queue made
        #: polls look slow and spaced them seconds apart. Never more than the poll's wall time.
        self.last_duration = 0.0
        self._cost = 0.0  # the poll in progress, so far
        self._fastest: dict[int, float] = {}  # page size (0: a single-task lookup) -> seconds
        self.lookups = 0

    def _page_size(self, wanted: int) -> int:
        return min(C.BATCH_LIST_PAGE_SIZE, max(C.DEFAULT_PAGE_SIZE, 2 * wanted + 20))

    async def poll(self, ids: Collection[str]) -> dict[str, VoiceTask]:
        started = time.monotonic()
        self._cost = 0.0
        wanted = set(ids)
        found: dict[str, VoiceTask] = {}
        try:
            if wanted:
                exhausted = await self._walk(wanted, found)
                await self._look_up_missing(wanted, found, exhausted)
        finally:
            self.last_duration = min(self._cost, time.monotonic() - started)
        return found

    def _count(self, kind: int, started: float) -> None:
        """Add one request's own time to the poll's cost (see ``last_duration``)."""
        took = time.monotonic() - started
        fastest = self._fastest.get(kind)
        if fastest is None or took < fastest:
            self._fastest[kind] = fastest = took
        self._cost += fastest

    async def _read(self, page_num: int, size: int, wanted: set[str],
                    found: dict[str, VoiceTask]) -> tuple[list[Any], int, int, int | None]:
        """One page; the tracked records on it parsed into ``found``. Returns the records, the
        page number and size actually used, and the index of the first tracked record."""
        started = time.monotonic()
        records, page_num, size = await fetch_page(self._api.list_page, page_num, size,
                                                   self._api.page_limit)
        self._count(size, started)
        first: int | None = None
        base = (page_num - 1) * size
        for i, record in enumerate(records):
            tid = raw_task_id(record)
            if tid is None or tid not in wanted:
                continue
            try:
                found[tid] = parse_task(record)
            except VoiceAPIError:
                continue  # unreadable here; the per-task lookup will report it
            if first is None:
                first = base + i
        if self.order is None:
            self.order = list_order(records)
        return records, page_num, size, first

    async def _walk(self, wanted: set[str], found: dict[str, VoiceTask]) -> bool:
        """Read pages where the tracked tasks should be. True when the walk stopped on its page
        budget (tasks not found may sit further on), False when it saw the end of the list."""
        size = self._api.page_limit.clamp(self._page_size(len(wanted)))
        start = 1
        if self.order == OLDEST and self._hint is not None:
            start = self._hint // size + 1
        page_num, first_seen = start, None
        try:
            for n in range(self._max_pages):
                records, page_num, size, first = await self._read(page_num, size, wanted, found)
                if first is not None and first_seen is None:
                    first_seen = first
                if len(found) == len(wanted) or len(records) < size:
                    self._remember(first_seen)
                    return False
                if n == 0 and page_num == 1 and first is None and self.order == OLDEST:
                    # Oldest first and none of ours on page 1: they sit at the end. Search it
                    # with the largest pages (fewest requests); the hint is an index.
                    end_size = self._api.page_limit.clamp(C.BATCH_LIST_PAGE_SIZE)
                    first_seen = await self._from_the_end(end_size, wanted, found)
                    self._remember(first_seen)
                    return len(found) < len(wanted)
                page_num += 1
        except FATAL:
            raise
        except (VoiceAPIError, ValidationError):
            return False  # a failed page: the next poll tries again; lookups fill in
        self._remember(first_seen)
        return True

    def _remember(self, first_seen: int | None) -> None:
        if self.order == OLDEST and first_seen is not None:
            self._hint = first_seen

    async def _from_the_end(self, size: int, wanted: set[str],
                            found: dict[str, VoiceTask]) -> int | None:
        """Find the last page (gallop, then bisect), then read backwards until every tracked
        task is found or the page budget is spent. Returns the first tracked index seen."""
        budget = self._max_pages - 1
        full, probe = 1, 2  # page 1 is known full (at the poll's size, so at least as full)
        short: tuple[int, int | None] | None = None
        while budget > 0:
            records, _, _, first = await self._read(probe, size, wanted, found)
            budget -= 1
            if len(records) < size:
                short = (probe, first)
                break
            if probe >= C.PAGE_MAX:
                return None  # more pages than the API can address
            full, probe = probe, min(probe * 2, C.PAGE_MAX)
        if short is None:
            return None
        (hi, first_seen), lo = short, full  # lo is full, hi is short: the end is hi
        while hi - lo > 1 and budget > 0:
            mid = (lo + hi) // 2
            records, _, _, first = await self._read(mid, size, wanted, found)
            budget -= 1
            if len(records) < size:
                hi, first_seen = mid, first
            else:
                lo = mid
        page = hi - 1
        while len(found) < len(wanted) and page >= 1 and budget > 0:
            _, _, _, first = await self._read(page, size, wanted, found)
            budget -= 1
            if first is not None:
                first_seen = first
            page -= 1
        return first_seen

    async def _look_up_missing(self, wanted: set[str], found: dict[str, VoiceTask],
                               exhausted: bool) -> None:
        """Tasks the pages did not show: one request each, the longest-missed first, a few
        per poll. A task just created may be missing from a list for a moment, so only tasks
        missed twice (or beyond the page budget) are asked for."""
        missing = []
        for tid in wanted:
            if tid in found:
                self._missed.pop(tid, None)
                self._asked.pop(tid, None)
                continue
            self._missed[tid] = self._missed.get(tid, 0) + 1
            if exhausted or self._missed[tid] >= 2:
                missing.append(tid)
        # Never asked (or asked longest ago) first: every missing task gets its turn.
        missing.sort(key=lambda t: (self._asked.get(t, -1), -self._missed[t]))
        for tid in missing[:self._max_lookups]:
            self.lookups += 1
            self._asked[tid] = self.lookups
            # Found or not, it stays "missed" until a list page shows it: a task the pages
            # do not reach will not be on them next time either.
            started = time.monotonic()
            try:
                found[tid] = await self._api.get(tid)
                self._count(0, started)
            except FATAL:
                raise
            except VoiceAPIError as exc:
                if is_not_found(exc):  # answered: this task does not exist (any more)
                    self._not_found[tid] = self._not_found.get(tid, 0) + 1
                    if self._not_found[tid] >= C.BATCH_GONE_AFTER:
                        self.gone[tid] = exc
                continue
            self._not_found.pop(tid, None)

    def forget(self, task_id: str) -> None:
        self._missed.pop(task_id, None)
        self._asked.pop(task_id, None)
        self._not_found.pop(task_id, None)
        self.gone.pop(task_id, None)


__all__ = ["FATAL", "ListTracker", "TaskSource", "list_order", "raw_task_id"]
