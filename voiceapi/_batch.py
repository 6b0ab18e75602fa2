"""The batch scheduler behind ``custom_voices.create_many``: the wiring.

Kling caps the creation tasks an account may have in progress (429/1303 above it). Three parts
share the work, each small enough to hold in your head:

* the **coordinator** (``_coordinator.Coordinator``; ``LocalCoordinator`` by default) says who
  may create now, what the cap is, and what exists already (the journal);
* the **submitter** (``_submitter``) creates tasks through the shared create flow, never twice;
* the **follower** (``_follower``) follows tasks until they end — list-page polling that does
  not depend on the list order (``_tracker``), callbacks as hints, item timeouts.

``run_batch`` validates the items, re-attaches what the journal knows, and runs one loop that
starts creates while slots are free and polls only when a poll can change something. The
scheduler depends on the narrow ``BatchApi`` protocol and the models only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import time
from collections.abc import Coroutine, Iterable, Mapping
from typing import Any, Protocol

from . import _constants as C
from ._aio import within
from ._batch_models import (
    CREATE_FIELDS,
    BatchApi,
    BatchItem,
    BatchProgress,
    JournalError,
    NotSubmittedError,
    ProgressCallback,
    VoiceGoneError,
)
from ._batch_state import Entry, Ledger, Phase
from ._coordinator import Coordinator, JournalEntry
from ._create import Created, build_create_body
from ._errors import ValidationError, VoiceAPIError, WaitTimeoutError
from ._follower import Follower
from ._local_coordinator import FileJournal, LocalCoordinator, SlotCap
from ._models import BatchResult, VoiceTask
from ._submitter import Submitter

#: Fields that define a voice, and so its derived external id. Delivery settings
#: (callback_url) are left out: a rerun with a new callback URL must find the same tasks.
_IDENTITY_FIELDS = ("voice_name", "voice_url", "video_id")


class _CallbackSource(Protocol):
    @property
    def url(self) -> str: ...

    def subscribe(self, listener: Any) -> Any: ...


def derive_external_task_id(item: Mapping[str, Any], occurrence: int) -> str:
    """A stable id from what defines the voice (name and source), so a rerun of the same batch
    finds its tasks; ``occurrence`` tells identical items apart."""
    return f"vb-{_identity_digest(item)}-{occurrence}"


def _identity_digest(item: Mapping[str, Any]) -> str:
    key = json.dumps({k: item.get(k) for k in _IDENTITY_FIELDS}, sort_keys=True,
                     ensure_ascii=False, default=str)
    # surrogatepass: a lone surrogate (refused by validation right after) must not fail the
    # hash first as a bare UnicodeEncodeError; valid text encodes exactly as before.
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def retry_key(base: str, generation: int) -> str:
    """The fresh id of the ``generation``-th retry of an item (stable: reruns find it)."""
    suffix = f"-r{generation}"
    if len(base) + len(suffix) > C.MAX_ID_CHARS:
        base = base[:C.MAX_ID_CHARS - len(suffix) - 17] + "-" + \
            hashlib.sha256(base.encode()).hexdigest()[:16]
    return base + suffix


def generation_of(key: str, base: str) -> int | None:
    """0 for ``base`` itself, g for ``retry_key(base, g)``, None for an unrelated id."""
    if key == base:
        return 0
    for g in range(1, C.BATCH_MAX_RETRY_GENERATIONS + 1):
        if key == retry_key(base, g):
            return g
    return None


def _as_dict(item: Any) -> dict[str, Any]:
    if type(item) is dict:
        return item  # the caller's own dict, not a copy: ≈ 180 bytes an item for a big batch
    if isinstance(item, BatchItem):
        return item.to_dict()
    if isinstance(item, Mapping):
        return dict(item)
    raise ValidationError(f"batch items must be dicts or BatchItem, got {type(item).__name__}")


def _check_items(items: Any) -> None:
    if isinstance(items, (Mapping, BatchItem, str, bytes)):
        raise ValidationError(
            f"create_many takes an iterable of items (e.g. a list of dicts), not a single "
            f"{type(items).__name__}")


def prepare(items: Iterable[Mapping[str, Any] | BatchItem], *,
            callback_url: str | None = None) -> list[Entry]:
    """Validate every item up front; bad ones become results, not exceptions.

    ``callback_url`` is given to items without one, after their ids were derived.
    """
    _check_items(items)
    entries: list[Entry] = []
    occurrences: dict[str, int] = {}
    for item in items:
        try:
            data = _as_dict(item)
            unknown = set(data) - set(CREATE_FIELDS)
            if unknown:
                raise ValidationError(f"unknown field(s): {', '.join(sorted(unknown))}")
            fields = dict(data)
            if not fields.get("external_task_id"):
                # derive_external_task_id(data, n), hashing the identity once per item
                digest = _identity_digest(data)
                n = occurrences[digest] = occurrences.get(digest, -1) + 1
                fields["external_task_id"] = f"vb-{digest}-{n}"
            if callback_url and not fields.get("callback_url"):
                fields["callback_url"] = callback_url
            body = build_create_body(**{k: fields.get(k) for k in CREATE_FIELDS})
            entries.append(Entry(input=data, body=body, key=body["external_task_id"]))
        except ValidationError as exc:
            raw = dict(item) if isinstance(item, Mapping) else {"item": item}
            entries.append(Entry(input=raw, body=None, error=exc, done=True,
                                 phase=Phase.FAILED))
    seen: set[str] = set()
    for entry in entries:
        if entry.body is not None:
            key = entry.key
            if key in seen:
                entry.error, entry.done, entry.body = ValidationError(
                    f"duplicate external_task_id in batch: {key}"), True, None
                entry.phase = Phase.FAILED
            seen.add(key)
    return entries


class _Run:
    """One batch: the loop that wires submitter, follower and coordinator together."""

    def __init__(self, api: BatchApi, entries: list[Entry], coordinator: Coordinator, *,
                 ceiling: int | None, wait: bool, item_timeout: float | None,
                 timeout: float | None, poll_interval: float | None,
                 on_progress: ProgressCallback | None, callbacks: bool, retry_failed: bool,
                 side_journal: FileJournal | None) -> None:
        self.api = api
        self.coord = coordinator
        self.ledger = Ledger(entries, on_progress)
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.retry_failed = retry_failed
        #: Every item's own id (only for retries): a retry's fresh id must not be one of them.
        self.item_keys: set[str] = {e.key for e in entries if e.body is not None} \
            if retry_failed else set()
        self.side_journal = side_journal
        #: Items the journal names a task for, not checked yet (id(entry) -> entry, line): a
        #: deadline that cuts the re-attach short must not report them as never sent.
        self._unchecked: dict[int, tuple[Entry, JournalEntry]] = {}
        self.wake = asyncio.Event()
        self.submitter = Submitter(api, coordinator, self.ledger, on_created=self._created,
                                   on_foreign=self._foreign, wake=self.wake.set,
                                   ceiling=ceiling, deadline=self.deadline)
        self.follower = Follower(api, coordinator, self.ledger, wait=wait,
                                 item_timeout=item_timeout, poll_interval=poll_interval,
                                 callbacks=callbacks, retry=self._retry,
                                 journal=self._journal)
        follow_with = getattr(coordinator, "follow_with", None)
        if follow_with is not None:
            # A shared coordinator follows the tasks it holds slots for once this batch has
            # returned (wait=False, timed-out items): it needs a way to look at them.
            follow_with(self.follower.tracker.poll, api.lookup)

    # --- hooks for the parts ------------------------------------------------------------------

    async def _created(self, entry: Entry, created: Created) -> None:
        entry.earlier = created.existed
        if not self.retry_failed:  # only a retry sends an item again
            entry.release_body()
        await self._journal(entry, created.task)
        await self.follower.attach(entry, created.task)
        self.wake.set()

    async def _foreign(self, entry: Entry, task_id: str, status: str) -> None:
        await self.follower.follow_foreign(entry, task_id, status)
        self.wake.set()

    async def _journal(self, entry: Entry, task: VoiceTask) -> None:
        """Journal a task's state in the side journal; for a retry (retry_failed) also under
        the item's original id, so that a rerun finds the newest attempt directly."""
        status = task.task_status.value
        self._side_record(entry.key, task.task_id, status)
        if entry.generation and entry.origin is not None:
            base = entry.origin
            await self.coord.record(base, task.task_id, status)
            self._side_record(base, task.task_id, status)

    def _retry(self, entry: Entry) -> bool:
        """retry_failed: send an item whose earlier task failed (or lost its voice) again
        under a fresh, stable id. False when retrying is off or used up."""
        if not self.retry_failed or entry.generation >= C.BATCH_MAX_RETRY_GENERATIONS:
            return False
        assert entry.body is not None
        origin = entry.key if entry.origin is None else entry.origin
        key = retry_key(origin, entry.generation + 1)
        if key in self.item_keys:
            # Another item of this batch has that id as its own ("x-r1" beside "x"): the
            # retry would be answered with that item's task, and report its voice as this
            # item's. The item keeps its failure instead.
            return False
        entry.origin = origin
        entry.generation += 1
        entry.rekey(key)
        entry.task, entry.error, entry.earlier, entry.done = None, None, False, False
        self.ledger.set_phase(entry, Phase.PENDING)
        self.submitter.pending.append(entry)
        return True

    def _side_record(self, key: str, task_id: str, status: str) -> None:
        if self.side_journal is not None:
            self.side_journal.record(key, task_id, status)

    def on_callback(self, task: VoiceTask) -> None:
        if self.follower.on_callback(task):
            self.wake.set()

    # --- re-attach ------------------------------------------------------------------------------

    async def reattach(self) -> None:
        """Items the journal knows are followed, never created again. The journal is checked,
        not trusted: a task whose external id is not the item's is ignored (and the item
        resolved by lookup)."""
        entries = [e for e in self.ledger.entries if e.body is not None and not e.done]
        known = await self._known([e.key for e in entries])
        if not known:
            if self._journal_was_empty():
                # Killed before its first record, maybe with creates the server accepted but
                # never answered: the journal cannot tell, so every item is looked up first.
                self.submitter.look_first = True
            return
        # A journal with entries means a rerun: an item created just before a crash may be
        # missing from it, so every item is looked up before it is created (unless the
        # coordinator vouches for that: see _vouched).
        self.submitter.look_first = not self._vouched()
        jobs = iter([(e, known[e.key]) for e in entries if e.key in known])
        self._unchecked = {id(e): (e, known[e.key]) for e in entries if e.key in known}

        async def worker() -> None:
            for entry, jentry in jobs:  # shared iterator: coroutines made only when run
                await self._follow_known(entry, jentry)

        workers = [asyncio.ensure_future(worker())
                   for _ in range(min(C.BATCH_REATTACH_CONCURRENCY, len(known)))]
        try:
            await asyncio.gather(*workers)
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

    def _journal_was_empty(self) -> bool:
        side = self.side_journal is not None and self.side_journal.was_empty
        return side or getattr(self.coord, "journal_was_empty", False) is True

    async def _known(self, keys: list[str]) -> dict[str, JournalEntry]:
        known = dict(await self.coord.known(keys)) if keys else {}
        if self.side_journal is not None:
            for key in keys:
                if key not in known and key in self.side_journal.entries:
                    known[key] = self.side_journal.entries[key]
        return known

    async def _follow_known(self, entry: Entry, jentry: JournalEntry) -> None:
        await self._check_known(entry, jentry)
        del self._unchecked[id(entry)]  # not when cancelled: see _end_at_deadline

    async def _check_known(self, entry: Entry, jentry: JournalEntry) -> None:
        task: VoiceTask | None = None
        with contextlib.suppress(VoiceAPIError):  # any failure: ask by external id below
            task = await self.api.get(jentry.task_id)
        generation = None if task is None or task.external_task_id is None else \
            generation_of(task.external_task_id, entry.key)
        if task is not None and generation:  # the journal points at a retry of this item
            assert entry.body is not None
            entry.origin = entry.key
            entry.rekey(retry_key(entry.key, generation))
            entry.generation = generation
        elif task is None or generation is None:
            # Not found, unreadable, or the journal line names another task: ask the server
            # what exists under this item's id (a create would be refused as a duplicate, but
            # a server that does not refuse repeated ids would make a second task).
            try:
                task = await self.api.lookup(entry.key)
            except VoiceAPIError as exc:
                self.ledger.resolve(entry, error=exc)
                return
            if task is None:
                return  # nothing exists: the item is created as usual
        entry.earlier = True
        if not task.is_terminal:
            await self._adopt(entry.key, task)
        else:
            await self.coord.record(entry.key, task.task_id, task.task_status.value)
        self._side_record(entry.key, task.task_id, task.task_status.value)
        await self.follower.attach(entry, task)

    async def _adopt(self, key: str, task: VoiceTask) -> None:
        """A running task from an earlier run holds a slot at Kling: count it if the
        coordinator can (``adopt``), else just journal it."""
        adopt = getattr(self.coord, "adopt", None)
        if adopt is not None:
            await adopt(key, task.task_id, task.task_status.value)
        else:
            await self.coord.record(key, task.task_id, task.task_status.value)

    async def _probe_rerun(self) -> None:
        """Is this a rerun? Items are sent in order, so if any item of an earlier run exists,
        the first one almost surely does: one lookup tells. A rerun then looks each item up
        before creating it (a server that accepts repeated external ids would otherwise make
        a second task); a fresh batch pays this one request only."""
        pending = self.submitter.pending
        if not pending:
            return
        first = pending[0]
        try:
            found = await self.api.lookup(first.key)
        except VoiceAPIError:
            found = None  # unknown: the create flow still never resends without a not-found
            self.submitter.look_first = True
        if found is not None:
            if self._vouched() and await self._shared_create(first.key, found):
                return  # created by a worker sharing our coordinator: its journal covers it
            self.submitter.look_first = True

    async def _shared_create(self, key: str, found: VoiceTask) -> bool:
        """Did a worker sharing our coordinator create ``key`` (the task ``found``)? Journaled,
        or not yet: a worker holds its slot (the create's answer is on its way, ``accepted``
        comes after it) or left it an orphan (a lookup settles it). Either way that worker's
        slot or journal covers it; calling it a rerun would look every item up before
        creating it.

        The key was not journaled when the re-attach asked, so a create of this coordinator's
        under it is one just made. A slot or a fresh journal line alone proves less: a worker
        of a rerun holds the key while it looks it up (and leaves it an orphan if it dies
        then), and journals the task it finds, which an earlier run not journaled here (no
        coordinator, another namespace, a state that expired) may have made long ago. Only a
        task created within one request's timeout is taken for such a create; an older one
        means a rerun (a lookup per item: the safe side, as a restart long after a crash)."""
        shared = key in await self.coord.known([key])
        if not shared:
            held = getattr(self.coord, "held", None)
            shared = callable(held) and key in await held([key])
        created = found.created_at
        return shared and created is not None and \
            created.timestamp() >= time.time() - C.DEFAULT_TIMEOUT

    def _vouched(self) -> bool:
        """A shared coordinator (``vouches_for_creates``) never grants a create under a key
        that may exist: its journal has every create, a crashed worker's slot outlives it
        until a lookup settles it. Its workers see each other's items as "a rerun" all the
        time, and a lookup before each create there cost a request per voice for nothing."""
        return getattr(self.coord, "vouches_for_creates", False) is True

    # --- the loop -----------------------------------------------------------------------------

    def _report(self, *, force: bool = False) -> None:
        self.ledger.report(self.coord.in_flight, self.coord.cap, force=force)

    async def run(self) -> None:
        self._report(force=True)
        try:
            await self._before_deadline(self.reattach())
            queued = {id(e) for e in self.submitter.pending}  # retries made while re-attaching
            self.submitter.pending.extend(e for e in self.ledger.entries
                                          if not e.done and e.task is None
                                          and id(e) not in queued)
            await self._before_deadline(self._probe_rerun())
            await self._loop()
        finally:
            await self.submitter.cancel()  # cancelled or failed: no create left running
        self._report(force=True)

    async def _before_deadline(self, step: Coroutine[Any, Any, None]) -> None:
        """Run a start-up step; slow lookups must not carry the batch past its deadline."""
        if self.deadline is None:
            await step
            return
        with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
            await within(step, max(0.0, self.deadline - time.monotonic()))

    async def _loop(self) -> None:
        submitter, follower = self.submitter, self.follower
        while True:
            now = time.monotonic()
            self._raise_send_failure()
            if self.deadline is not None and now >= self.deadline:
                await self._end_at_deadline()
                return
            next_expiry = follower.expire(now)
            await submitter.start(follower.own_slots)
            if submitter.want_poll:
                submitter.want_poll = False
                follower.poll_soon()
            if not submitter.busy and not follower.waiting:
                return
            poll_at = follower.next_poll_at(slots_wanted=submitter.wants_slots)
            if poll_at is not None and now >= poll_at:
                await follower.poll(None if self.deadline is None else self.deadline - now)
                if follower.fatal is not None:
                    await self._end_early(follower.fatal)
                    return
                self._report()
                # A poll with nothing to look at returns without waiting for anything: with a
                # tiny poll_interval the loop then polled again at once, for ever, and the
                # creates it had started never ran (nor did a cancel or a wait_for around it).
                await asyncio.sleep(0)
                continue
            self._report()
            await self._sleep([poll_at, next_expiry, submitter.wake_at(), self.deadline,
                               self.ledger.next_report_at()])

    async def _sleep(self, times: list[float | None]) -> None:
        """Until the earliest of ``times``, a wake-up (create done, callback), or a slot
        freed elsewhere; never a negative or busy wait."""
        now = time.monotonic()
        due = [t for t in times if t is not None]
        timeout = max(0.0, min(due) - now) if due else C.BATCH_POLL_INTERVAL
        if timeout <= 0:
            return
        self.wake.clear()
        if self.submitter.slot_blocked and self.submitter.pending:
            waiters = {asyncio.ensure_future(self.wake.wait()),
                       asyncio.ensure_future(self.coord.wait_for_slot(timeout))}
            try:
                await asyncio.wait(waiters, timeout=timeout,
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waiters:
                    w.cancel()
                await asyncio.gather(*waiters, return_exceptions=True)
            return
        with contextlib.suppress(asyncio.TimeoutError, TimeoutError):
            await within(self.wake.wait(), timeout)

    async def _end_at_deadline(self) -> None:
        """The batch timeout: cancel creates in flight and look them up, time out every item
        still waiting, and give every unsent item a NotSubmittedError."""
        assert self.timeout is not None
        unknown = await self.submitter.cancel()
        self._raise_send_failure()
        await self._resolve_unknown(unknown)
        self.follower.time_out_all(self.timeout)
        for entry, jentry in self._unchecked.values():
            # The journal names a task for it (an earlier run created it), but the deadline
            # came before its line was checked: not a NotSubmittedError ("never sent"), which
            # invited the caller to create it again.
            if not entry.done and entry.task is None:
                self.ledger.resolve(entry, error=WaitTimeoutError(jentry.task_id, self.timeout,
                                                                  None))
        self.submitter.give_up(f"the batch timeout of {self.timeout:g}s was reached")

    def _raise_send_failure(self) -> None:
        """A send failed outside the API (a coordinator whose store is gone could not record
        a create that reached Kling): its item was taken off every queue and has no outcome
        to report, so the batch ends with that failure. Checked before any way of ending
        the batch, as a send can fail in the same loop turn as a fatal poll or the deadline:
        those ends only report the items they still hold."""
        if self.submitter.failure is not None:
            raise self.submitter.failure

    async def _end_early(self, error: VoiceAPIError) -> None:
        """An error no retry cures (closed client, credentials): stop sending, and report it
        for every item still open."""
        cancelled = await self.submitter.cancel()
        self._raise_send_failure()
        for entry in cancelled:
            self.ledger.resolve(entry, error=NotSubmittedError(
                f"the create of {entry.key} was cancelled ({error}); it may exist"))
        self.follower.end(error)
        self.submitter.give_up(str(error))

    async def _resolve_unknown(self, unknown: list[Entry]) -> None:
        async def found(entry: Entry, task: VoiceTask) -> None:
            entry.earlier = False
            await self.follower.attach(entry, task)

        await self.submitter.resolve_unknown(unknown, C.BATCH_DEADLINE_GRACE, found)


def _check_settings(max_in_flight: Any, **seconds: Any) -> None:
    """Bad settings are refused before anything is sent."""
    SlotCap(max_in_flight)  # the one place that says what a valid cap is
    for name, value in seconds.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not value > 0):
            raise ValidationError(f"{name} must be a number > 0, got {value!r}")
    # An infinite timeout simply never fires, but an infinite poll interval never polls: a
    # batch whose slots are full then waits for ever.
    poll = seconds.get("poll_interval")
    if poll is not None and not math.isfinite(poll):
        raise ValidationError(f"poll_interval must be a finite number > 0, got {poll!r}")


async def run_batch(
    api: BatchApi,
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
    coordinator: Coordinator | None = None,
    retry_failed: bool = False,
) -> list[BatchResult]:
    _check_settings(max_in_flight, item_timeout=item_timeout, timeout=timeout,
                    poll_interval=poll_interval)
    entries = prepare(items, callback_url=callbacks.url if callbacks is not None else None)
    coord = coordinator if coordinator is not None else api.coordinator
    own: LocalCoordinator | None = None
    side: FileJournal | None = None
    if coord is None:
        coord = own = LocalCoordinator(max_in_flight, journal=journal,
                                       rate_limit_delay=api.rate_limit_delay)
    elif journal:
        side = FileJournal(journal)
    try:
        run = _Run(api, entries, coord, ceiling=max_in_flight, wait=wait,
                   item_timeout=item_timeout, timeout=timeout, poll_interval=poll_interval,
                   on_progress=on_progress, callbacks=callbacks is not None,
                   retry_failed=retry_failed, side_journal=side)
        unsubscribe = callbacks.subscribe(run.on_callback) if callbacks is not None else None
        try:
            await run.run()
        finally:
            if unsubscribe is not None:
                unsubscribe()
    finally:
        if own is not None:
            own.close()
        if side is not None:
            side.close()
    return [e.result() for e in entries]


__all__ = ["BatchItem", "BatchProgress", "JournalError", "NotSubmittedError", "VoiceGoneError",
           "derive_external_task_id", "prepare", "run_batch"]
