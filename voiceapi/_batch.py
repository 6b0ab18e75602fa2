"""The batch scheduler behind ``custom_voices.create_many``.

Kling caps the creation tasks an account may have in progress (429/1303 above it). The scheduler
keeps at most ``limit`` tasks in progress, learns the cap from 1303 answers when not told,
refills a slot as soon as a task is seen finished, and sees completions through list pages
(one request covers every tracked task) instead of one poll per task.

It depends only on a narrow protocol (``_submit``/``get``/``list``) and the models, so the
resource can delegate to it without an import cycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import IO, Any, Protocol

import attrs

from . import _constants as C
from ._aio import within
from ._custom_voices import build_create_body
from ._decode import is_not_found
from ._errors import (
    APIConnectionError,
    InvalidRequestError,
    RateLimitError,
    ServerError,
    TaskFailedError,
    UnexpectedResponseError,
    ValidationError,
    VoiceAPIError,
    WaitTimeoutError,
)
from ._models import BatchResult, TaskStatus, VoiceTask

_CREATE_FIELDS = ("voice_name", "voice_url", "video_id", "callback_url", "external_task_id")
PROGRESS_INTERVAL = 0.05
_MAX_SUBMIT_TRIES = 4  # per item, for outcomes that stay unknown after the SDK's own retries


@attrs.frozen
class BatchItem:
    """One voice to create (a dict with the same keys works as well)."""

    voice_name: str
    voice_url: str | None = None
    video_id: str | None = None
    callback_url: str | None = None
    external_task_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in attrs.asdict(self).items() if v is not None}


@attrs.frozen
class BatchProgress:
    """Counts passed to ``on_progress`` whenever an item changes state."""

    total: int
    pending: int
    submitted: int
    processing: int
    succeeded: int
    failed: int
    #: Tasks currently counted against the slot limit, and the limit itself.
    in_flight: int
    slots: int

    @property
    def done(self) -> int:
        return self.succeeded + self.failed


ProgressCallback = Callable[[BatchProgress], None]


class _CallbackSource(Protocol):
    @property
    def url(self) -> str: ...

    def subscribe(self, listener: Callable[[VoiceTask], None]) -> Callable[[], None]: ...


def _with_callback(item: Mapping[str, Any] | BatchItem, url: str) -> Mapping[str, Any] | BatchItem:
    if isinstance(item, BatchItem):
        return item if item.callback_url else attrs.evolve(item, callback_url=url)
    if isinstance(item, Mapping) and not item.get("callback_url"):
        return {**item, "callback_url": url}
    return item


class _Resource(Protocol):
    async def _submit(self, body: dict[str, str], *, retry_rate_limits: bool = True
                      ) -> VoiceTask: ...

    async def get(self, task_id: str | None = None, *, external_task_id: str | None = None
                  ) -> VoiceTask: ...

    async def list(self, *, page_num: int = 1, page_size: int = 30) -> list[VoiceTask]: ...


def derive_external_task_id(item: Mapping[str, Any], occurrence: int) -> str:
    """A stable id from the item's content, so a rerun of the same batch finds its tasks."""
    key = json.dumps({k: item.get(k) for k in _CREATE_FIELDS[:-1]}, sort_keys=True,
                     ensure_ascii=False)
    digest = hashlib.sha256(key.encode()).hexdigest()[:32]
    return f"vb-{digest}-{occurrence}"


class SlotLimit:
    """How many tasks may be in progress: fixed, or learned (grow on success, cut on 1303)."""

    def __init__(self, fixed: int | None) -> None:
        self.fixed = fixed is not None
        self.value = fixed if fixed is not None else C.BATCH_INITIAL_SLOTS
        self.learned = False
        self._accepted_since_cut = 0

    def on_accepted(self, in_flight: int) -> None:
        if self.fixed:
            return
        self._accepted_since_cut += 1
        at_limit = in_flight >= self.value
        # Before the first 1303 grow freely; after it, probe one step up now and then.
        if at_limit and (not self.learned or self._accepted_since_cut >= 4 * self.value):
            self.value = min(self.value + 1, C.BATCH_MAX_SLOTS)
            self._accepted_since_cut = 0

    def on_rate_limited(self, in_flight: int) -> None:
        # The server holds at most `in_flight` of ours when it says "full": the cap is below.
        self.learned = True
        self._accepted_since_cut = 0
        if not self.fixed:
            self.value = max(1, min(self.value, in_flight))


class Journal:
    """Append-only JSON lines: ``{"ext", "task_id", "status"}`` per state change. It survives a
    crash or Ctrl-C mid-batch (each line is flushed); a rerun reads it to skip and re-attach."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.known: dict[str, tuple[str, str]] = {}
        if os.path.exists(path):
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    with contextlib.suppress(ValueError):
                        rec = json.loads(line)
                        if isinstance(rec, dict) and isinstance(rec.get("ext"), str) \
                                and isinstance(rec.get("task_id"), str):
                            self.known[rec["ext"]] = (rec["task_id"], str(rec.get("status")))
        self._fh: IO[str] | None = open(path, "a", encoding="utf-8")  # noqa: SIM115

    def record(self, ext: str, task_id: str, status: str) -> None:
        if self.known.get(ext) == (task_id, status) or self._fh is None:
            return
        self.known[ext] = (task_id, status)
        self._fh.write(json.dumps({"ext": ext, "task_id": task_id, "status": status}) + "\n")
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


@attrs.define
class _Entry:
    index: int
    input: dict[str, Any]
    body: dict[str, str] | None
    task: VoiceTask | None = None
    error: VoiceAPIError | None = None
    tries: int = 0
    missed: int = 0  # polls in a row whose list page did not show this task
    attached_at: float = 0.0
    done: bool = False


class _Batch:
    def __init__(self, resource: _Resource, entries: list[_Entry], *, limit: SlotLimit,
                 wait: bool, item_timeout: float | None, timeout: float | None,
                 poll_interval: float | None, on_progress: ProgressCallback | None,
                 journal: Journal | None, rate_limit_delay: float,
                 callbacks: bool = False) -> None:
        self.resource = resource
        self.entries = entries
        self.limit = limit
        self.wait = wait
        self.item_timeout = item_timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.fixed_poll = poll_interval
        self.on_progress = on_progress
        self.journal = journal
        self.rate_limit_delay = rate_limit_delay
        self.pending: deque[_Entry] = deque()
        self.tracked: dict[str, _Entry] = {}
        self.submitting: set[asyncio.Task[None]] = set()
        self.not_before = 0.0  # time backoff after 1302, or 1303 with nothing of ours running
        self.wake = asyncio.Event()
        self.durations: deque[float] = deque(maxlen=50)
        self.last_poll = 0.0
        self.last_progress = 0.0
        self.callbacks = callbacks

    # --- bookkeeping ------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return len(self.tracked) + len(self.submitting)

    def progress(self, *, force: bool = False) -> None:
        """Report counts; at most every PROGRESS_INTERVAL s (counting is O(items))."""
        if self.on_progress is None:
            return
        now = time.monotonic()
        if not force and now - self.last_progress < PROGRESS_INTERVAL:
            return
        self.last_progress = now
        counts = {s: 0 for s in TaskStatus}
        succeeded = failed = 0
        for e in self.entries:
            if e.done:
                if e.error is None and e.task is not None and \
                        e.task.task_status is TaskStatus.SUCCEED:
                    succeeded += 1
                elif e.error is not None or e.task is not None:
                    failed += 1
            elif e.task is not None:
                counts[e.task.task_status] += 1
        self.on_progress(BatchProgress(
            total=len(self.entries), pending=len(self.pending) + len(self.submitting),
            submitted=counts[TaskStatus.SUBMITTED] + counts[TaskStatus.UNKNOWN],
            processing=counts[TaskStatus.PROCESSING], succeeded=succeeded, failed=failed,
            in_flight=self.in_flight, slots=self.limit.value))

    def finish(self, entry: _Entry, *, task: VoiceTask | None = None,
               error: VoiceAPIError | None = None) -> None:
        entry.task = task if task is not None else entry.task
        entry.error = error
        entry.done = True
        if entry.task is not None:
            self.tracked.pop(entry.task.task_id, None)
            if self.journal is not None and entry.body is not None:
                self.journal.record(entry.body["external_task_id"], entry.task.task_id,
                                    entry.task.task_status.value)
        self.wake.set()

    def attach(self, entry: _Entry, task: VoiceTask) -> None:
        """Follow a task the server has (just created, or found from an earlier run)."""
        entry.task = task
        if self.journal is not None and entry.body is not None:
            self.journal.record(entry.body["external_task_id"], task.task_id,
                                task.task_status.value)
        if task.is_terminal:
            self.observe(entry, task)
        else:  # tracked even when not waiting: it holds a server slot until it ends
            entry.attached_at = time.monotonic()
            self.tracked[task.task_id] = entry

    def observe(self, entry: _Entry, task: VoiceTask) -> None:
        entry.task = task
        if task.task_status is TaskStatus.SUCCEED:
            self._note_duration(task)
            self.finish(entry, task=task)
        elif task.task_status is TaskStatus.FAILED:
            self._note_duration(task)
            self.finish(entry, task=task, error=TaskFailedError(task))

    def _note_duration(self, task: VoiceTask) -> None:
        if task.created_at is not None and task.updated_at is not None:
            self.durations.append((task.updated_at - task.created_at).total_seconds())

    def poll_interval(self) -> float:
        """An eighth of the typical task time: completions are seen within ~6 % of a task's life
        while polls stay near 2 per voice."""
        if self.fixed_poll is not None:
            return self.fixed_poll
        if not self.durations:
            interval = 0.25
        else:
            typical = sorted(self.durations)[len(self.durations) // 2]
            interval = min(max(typical / 8, 0.01), C.BATCH_POLL_INTERVAL)
        # With callbacks, polling is only the safety net for a lost callback.
        return interval * 5 if self.callbacks else interval

    def on_callback(self, task: VoiceTask) -> None:
        """A callback says a task changed: check now (callbacks are hints, the API is truth)."""
        if task.task_id in self.tracked:
            self.last_poll = 0.0
            self.wake.set()

    # --- submitting -------------------------------------------------------------------------

    async def submit(self, entry: _Entry) -> None:
        assert entry.body is not None
        entry.tries += 1
        ext = entry.body["external_task_id"]
        try:
            task = await self.resource._submit(entry.body, retry_rate_limits=False)
        except RateLimitError as exc:
            self.on_rate_limited(entry, exc)
            return
        except InvalidRequestError as exc:
            # A duplicate external id means an earlier run (or attempt) created it: attach.
            found = await self.lookup(ext)
            if found is not None:
                self.attach(entry, found)
            else:
                self.finish(entry, error=exc)
            return
        except (ServerError, APIConnectionError, UnexpectedResponseError) as exc:
            # The SDK already reconciled and retried; the outcome is still unknown.
            found = await self.lookup(ext)
            if found is not None:
                self.attach(entry, found)
            elif entry.tries < _MAX_SUBMIT_TRIES:
                self.pending.appendleft(entry)
            else:
                self.finish(entry, error=exc)
            return
        except VoiceAPIError as exc:
            self.finish(entry, error=exc)
            return
        self.limit.on_accepted(self.in_flight)
        self.attach(entry, task)

    def on_rate_limited(self, entry: _Entry, exc: RateLimitError) -> None:
        entry.tries -= 1  # refused before queueing: not an attempt that could have landed
        self.pending.appendleft(entry)
        ours = len(self.tracked) + len(self.submitting) - 1
        if exc.code == 1303 and ours > 0:
            # Our own tasks fill the account: a slot frees when one of them ends.
            self.limit.on_rate_limited(ours)
            self.last_poll = 0.0  # look for finished tasks right away
        else:
            delay = exc.retry_after if exc.retry_after is not None else \
                self.rate_limit_delay * random.uniform(1.0, 2.0)
            self.not_before = max(self.not_before, time.monotonic() + delay)

    async def lookup(self, ext: str) -> VoiceTask | None:
        """The task created under ``ext``, or None. A failed lookup also gives None: the resend
        carries the same external id, which the server refuses to use twice."""
        try:
            return await self.resource.get(external_task_id=ext)
        except VoiceAPIError:
            return None

    def start_submissions(self) -> None:
        now = time.monotonic()
        while (self.pending and now >= self.not_before and self.in_flight < self.limit.value
               and len(self.submitting) < C.BATCH_MAX_CONCURRENT_SUBMITS):
            entry = self.pending.popleft()
            task = asyncio.ensure_future(self.submit(entry))
            self.submitting.add(task)
            task.add_done_callback(self._submitted)

    def _submitted(self, task: asyncio.Task[None]) -> None:
        self.submitting.discard(task)
        self.wake.set()

    # --- tracking ---------------------------------------------------------------------------

    async def poll(self) -> None:
        """One list page covers every tracked task; single gets only for ones not on it."""
        self.last_poll = time.monotonic()
        if not self.tracked:
            return
        # Our tasks are the account's newest: the first page(s), newest first, hold them all.
        size = min(C.BATCH_LIST_PAGE_SIZE, max(30, 2 * len(self.tracked) + 20))
        seen: set[str] = set()
        full = False
        for page_num in range(1, C.BATCH_MAX_POLL_PAGES + 1):
            try:
                page = await self.resource.list(page_num=page_num, page_size=size)
            except VoiceAPIError:
                return  # transient; the next poll tries again
            for task in page:
                entry = self.tracked.get(task.task_id)
                if entry is not None:
                    seen.add(task.task_id)
                    entry.missed = 0
                    self.observe(entry, task)
            full = len(page) >= size
            if not full or self.tracked.keys() <= seen:
                break
        asks = 0
        for tid, entry in list(self.tracked.items()):
            if tid in seen:
                continue
            entry.missed += 1
            # Older than the page (or not listed at all): ask for it alone, a few per poll.
            if (full or entry.missed >= 3) and asks < 50:
                asks += 1
                with contextlib.suppress(VoiceAPIError):
                    self.observe(entry, await self.resource.get(tid))

    def expire(self) -> None:
        now = time.monotonic()
        if self.item_timeout is not None:
            for tid, entry in list(self.tracked.items()):
                if now - entry.attached_at > self.item_timeout:
                    self.finish(entry, error=WaitTimeoutError(tid, self.item_timeout,
                                                              entry.task))
        if self.deadline is not None and now >= self.deadline:
            self.give_up("batch timeout reached")

    def give_up(self, why: str) -> None:
        for entry in list(self.tracked.values()):
            assert entry.task is not None
            self.finish(entry, error=WaitTimeoutError(entry.task.task_id,
                                                      self._timeout_value(), entry.task))
        while self.pending:
            self.finish(self.pending.popleft(), error=VoiceAPIError(f"not submitted: {why}"))

    def _timeout_value(self) -> float:
        return 0.0 if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    # --- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        self.pending.extend(e for e in self.entries if not e.done and e.task is None)
        self.progress(force=True)
        try:
            while self.pending or self.submitting or (self.wait and self.tracked):
                self.expire()
                self.start_submissions()
                now = time.monotonic()
                next_poll = self.last_poll + self.poll_interval()
                # Without `wait`, tasks are still followed while items wait for their slots.
                polling = bool(self.tracked) and (self.wait or bool(self.pending))
                if polling and now >= next_poll:
                    await self.poll()
                    self.progress()
                    continue
                wakeups = [next_poll - now if polling else 1.0]
                if self.pending and self.not_before > now:
                    wakeups.append(self.not_before - now)
                if self.deadline is not None:
                    wakeups.append(self.deadline - now)
                self.wake.clear()
                with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
                    await within(self.wake.wait(), max(0.0, min(wakeups)))
                self.progress()
        finally:
            for task in list(self.submitting):
                task.cancel()
            if self.submitting:
                await asyncio.gather(*self.submitting, return_exceptions=True)
        for entry in list(self.tracked.values()):  # wait=False: report the last state seen
            self.finish(entry)
        self.progress(force=True)


def _as_dict(item: Mapping[str, Any] | BatchItem) -> dict[str, Any]:
    if isinstance(item, BatchItem):
        return item.to_dict()
    if isinstance(item, Mapping):
        return dict(item)
    raise ValidationError(f"batch items must be dicts or BatchItem, got {type(item).__name__}")


def prepare(items: Iterable[Mapping[str, Any] | BatchItem]) -> list[_Entry]:
    """Validate every item up front; bad ones become results, not exceptions."""
    entries: list[_Entry] = []
    occurrences: dict[str, int] = {}
    for index, item in enumerate(items):
        try:
            data = _as_dict(item)
            unknown = set(data) - set(_CREATE_FIELDS)
            if unknown:
                raise ValidationError(f"unknown field(s): {', '.join(sorted(unknown))}")
            body_input = dict(data)
            if not body_input.get("external_task_id"):
                key = derive_external_task_id(data, 0)
                occurrences[key] = occurrences.get(key, -1) + 1
                body_input["external_task_id"] = derive_external_task_id(data, occurrences[key])
            body = build_create_body(**body_input)
            entries.append(_Entry(index=index, input=data, body=body))
        except ValidationError as exc:
            raw = item if isinstance(item, Mapping) else {"item": item}
            entries.append(_Entry(index=index, input=dict(raw), body=None, error=exc, done=True))
    seen: set[str] = set()
    for entry in entries:
        if entry.body is not None:
            ext = entry.body["external_task_id"]
            if ext in seen:
                entry.error, entry.done, entry.body = ValidationError(
                    f"duplicate external_task_id in batch: {ext}"), True, None
            seen.add(ext)
    return entries


async def run_batch(
    resource: _Resource,
    items: Iterable[Mapping[str, Any] | BatchItem],
    *,
    max_in_flight: int | None = None,
    wait: bool = True,
    item_timeout: float | None = None,
    timeout: float | None = None,
    poll_interval: float | None = None,
    on_progress: ProgressCallback | None = None,
    journal: str | None = None,
    callbacks: _CallbackSource | None = None,
    rate_limit_delay: float = C.RATE_LIMIT_MIN_DELAY,
) -> list[BatchResult]:
    if max_in_flight is not None and max_in_flight < 1:
        raise ValidationError("max_in_flight must be >= 1")
    if callbacks is not None:
        items = [_with_callback(item, callbacks.url) for item in items]
    entries = prepare(items)
    jrnl = Journal(journal) if journal else None
    transport = getattr(resource, "_transport", None)
    policy = getattr(transport, "retry_policy", None)
    if policy is not None:
        rate_limit_delay = policy.rate_limit_min_delay
    batch = _Batch(resource, entries, limit=SlotLimit(max_in_flight), wait=wait,
                   item_timeout=item_timeout, timeout=timeout, poll_interval=poll_interval,
                   on_progress=on_progress, journal=jrnl, rate_limit_delay=rate_limit_delay,
                   callbacks=callbacks is not None)
    unsubscribe = callbacks.subscribe(batch.on_callback) if callbacks is not None else None
    try:
        await _reattach(batch, jrnl)
        await batch.run()
    finally:
        if unsubscribe is not None:
            unsubscribe()
        if jrnl is not None:
            jrnl.close()
    return [BatchResult(input=e.input, task=e.task, error=e.error) for e in entries]


async def _reattach(batch: _Batch, journal: Journal | None) -> None:
    """Items a journal already knows are followed, never created again."""
    if journal is None:
        return
    lookups: list[Awaitable[None]] = []
    for entry in batch.entries:
        if entry.body is None:
            continue
        known = journal.known.get(entry.body["external_task_id"])
        if known is not None:
            lookups.append(_follow(batch, entry, known[0]))
    for i in range(0, len(lookups), 20):
        await asyncio.gather(*lookups[i:i + 20])


async def _follow(batch: _Batch, entry: _Entry, task_id: str) -> None:
    try:
        batch.attach(entry, await batch.resource.get(task_id))
    except VoiceAPIError as exc:
        if not is_not_found(exc):
            batch.finish(entry, error=exc)
