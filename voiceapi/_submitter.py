"""The submitter: asks the coordinator for slots and creates tasks, never one twice.

Each create goes through the shared create flow (``_create.CreateFlow``): an ambiguous outcome
is looked up by external id, and only a lookup that answered "not found" allows a resend. What
the submitter adds is the account's view: a 1303 frees the slot and lowers the cap (the next
create waits for one of our tasks to end, or backs off ≥ 1 s when none of ours runs); a 1302
backs off by time; any other answer is the item's result.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from . import _constants as C
from ._aio import within
from ._batch_models import BatchApi, NotSubmittedError
from ._batch_state import Entry, Ledger
from ._coordinator import Coordinator, Grant
from ._create import Created
from ._errors import RateLimitError, VoiceAPIError
from ._models import VoiceTask

OnCreated = Callable[[Entry, Created], Awaitable[None]]
#: Keys being created right now, per coordinator (weakly: entries live only while a send
#: runs): the batches sharing one coordinator never create the same key at once.
_SENDING: weakref.WeakKeyDictionary[Any, dict[str, set[asyncio.Task[None]]]] = \
    weakref.WeakKeyDictionary()


def _sends_of(coord: Any) -> dict[str, set[asyncio.Task[None]]] | None:
    try:
        return _SENDING.get(coord)
    except TypeError:  # a coordinator that cannot be weakly referenced: not tracked
        return None


#: Slot give-backs running in the background (see ``Submitter._give_back``): referenced here
#: until they end, as the event loop keeps only weak references to tasks.
_GIVE_BACKS: set[asyncio.Future[None]] = set()


def _given_back(task: asyncio.Future[None]) -> None:
    _GIVE_BACKS.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved: a failed give-back lapses like any lease (no log noise)
#: An item whose task another worker created: (item, task id, status from the journal).
OnForeign = Callable[[Entry, str, str], Awaitable[None]]


class Submitter:
    def __init__(self, api: BatchApi, coordinator: Coordinator, ledger: Ledger, *,
                 on_created: OnCreated, on_foreign: OnForeign, wake: Callable[[], None],
                 ceiling: int | None, deadline: float | None = None) -> None:
        self._api = api
        self._on_foreign = on_foreign
        self._coord = coordinator
        self._ledger = ledger
        self._on_created = on_created
        self._wake = wake
        self._ceiling = ceiling
        #: The batch's deadline (monotonic): no slot is asked for after it.
        self._deadline = deadline
        self.pending: deque[Entry] = deque()
        #: Items another worker is creating (Grant.FOLLOW): (when to look again, item).
        self.deferred: deque[tuple[float, Entry]] = deque()
        self.sending: dict[asyncio.Task[None], Entry] = {}
        #: No create before this (a 1302, or a 1303 answered while none of ours runs).
        self.not_before = 0.0
        #: The last try to start a create found no free slot.
        self.slot_blocked = False
        #: Set on a 1303 while our own tasks run: a poll may free a slot sooner.
        self.want_poll = False
        #: A rerun (an item of this batch exists already): look each item up before creating
        #: it, so that a server that accepts a repeated external id gets no second task.
        self.look_first = False
        #: An unexpected exception from a send (not an API answer): the batch re-raises it.
        self.failure: BaseException | None = None
        #: A deferred item waits for its own key to be settled (``key_waits``): polls must go
        #: on, as a shared coordinator settles such keys while it observes.
        self.key_waiting = False

    @property
    def busy(self) -> bool:
        return bool(self.pending or self.sending or self.deferred)

    async def start(self, own_slots: int) -> None:
        """Start creates while slots are free (``own_slots``: tasks of this batch holding one)."""
        self.slot_blocked = False
        now = time.monotonic()
        if self.deferred and self.deferred[0][0] <= now:
            await self._recheck_deferred(now)
        while self.pending and len(self.sending) < C.BATCH_MAX_CONCURRENT_SUBMITS:
            if now < self.not_before:
                return
            held = own_slots + self._unanswered()
            if (self._ceiling is not None and held >= self._ceiling) or held >= self._coord.cap:
                self.slot_blocked = True
                return
            entry = self.pending[0]
            try:
                grant = await self._acquire(entry.key)
            except (asyncio.TimeoutError, TimeoutError):
                # A timer may fire a clock tick early: anything this close to the deadline is
                # the deadline; earlier, it is the coordinator's own error.
                if self._deadline is None or time.monotonic() < self._deadline - 0.05:
                    raise
                return  # the batch's deadline: the loop ends the batch now
            if grant is Grant.WAIT and not self._key_waits(entry.key):
                self.slot_blocked = True
                return
            self._take(entry)
            if grant is Grant.CREATE and self._sending_elsewhere(entry.key):
                # Another batch on this coordinator is creating the key right now. A shared
                # coordinator grants a slot its worker already holds to that worker again (a
                # RedisCoordinator does: "asking again is harmless"), so two concurrent batches
                # sharing an item both created it. Follow it instead, as for a key another
                # worker holds (the slot is the other batch's, keyed by the same id).
                grant = Grant.FOLLOW
            if grant is not Grant.CREATE:
                # FOLLOW: another batch creates it. WAIT for this key alone: its earlier create
                # is being settled. Either way look again a little later, and look it up
                # before any create; the other items need not wait for it.
                entry.look_first = True
                self.deferred.append((now + C.BATCH_POLL_FLOOR, entry))
                if grant is Grant.WAIT:
                    self.key_waiting = True
                continue
            task = asyncio.ensure_future(self._send(entry))
            self.sending[task] = entry
            with contextlib.suppress(TypeError):  # see _sends_of
                _SENDING.setdefault(self._coord, {}).setdefault(entry.key, set()).add(task)
            task.add_done_callback(self._sent)

    async def _acquire(self, key: str) -> Grant:
        """``acquire`` within the batch's deadline. A shared coordinator answers over the
        network, one key at a time: with a Redis answering in 0.3 s, a batch at its deadline
        kept asking for ten slots in a row and returned 2.6 s late."""
        if self._deadline is None:
            return await self._coord.acquire(key)
        left = self._deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return await within(self._coord.acquire(key), left, undo=self._give_back(key))

    def _give_back(self, key: str) -> Callable[[Grant], None]:
        """For ``within(undo=)``: on Python 3.10 acquire() runs as a task of its own, and a
        slot it was granted as the batch was cancelled reached nobody. Nothing was sent under
        it: it goes back (in the background: we are being cancelled). Before, it stayed held
        for the coordinator's lifetime, neither created nor in doubt."""
        def undo(grant: Grant) -> None:
            # Not a key another batch sends: its slot, re-granted to its worker, is that one's.
            if grant is Grant.CREATE and not self._sending_elsewhere(key):
                task = asyncio.ensure_future(self._coord.release(key))
                _GIVE_BACKS.add(task)
                task.add_done_callback(_given_back)
        return undo

    def _key_waits(self, key: str) -> bool:
        key_waits = getattr(self._coord, "key_waits", None)
        return key_waits is not None and key_waits(key) is True

    @property
    def wants_slots(self) -> bool:
        """Items wait for a slot, or for their key to be settled: a poll may free either."""
        return (self.slot_blocked and bool(self.pending)) or \
            (self.key_waiting and bool(self.deferred))

    def _take(self, entry: Entry) -> None:
        """Take ``entry`` off the queue. Not simply the front one: a shared coordinator answers
        acquire() over the network, and a create refused meanwhile put its own item back in
        front; taking that one instead dropped it (no task, no error) and left ``entry``
        queued to be sent again."""
        if self.pending[0] is entry:
            self.pending.popleft()
        else:
            self.pending.remove(entry)  # identity: entries compare by identity (eq=False)

    def _unanswered(self) -> int:
        """Sends whose task is not attached yet. A send's task is attached (and counted in
        ``own_slots``) before its done-callback drops it from ``sending``: counting both held
        its slot twice, so a batch at its cap thought itself blocked and polled every tracked
        task for nothing near its end. At most BATCH_MAX_CONCURRENT_SUBMITS to look at."""
        return sum(1 for entry in self.sending.values() if entry.task is None)

    async def _recheck_deferred(self, now: float) -> None:
        """Items another worker held: once the journal knows their task, follow it (without a
        slot: the creator holds that); otherwise ask for a slot again."""
        due: list[Entry] = []
        while self.deferred and self.deferred[0][0] <= now:
            due.append(self.deferred.popleft()[1])
        if not self.deferred:
            self.key_waiting = False  # set again if an item still waits for its key
        known = await self._coord.known([e.key for e in due])
        for entry in due:
            jentry = known.get(entry.key)
            if jentry is not None:
                await self._on_foreign(entry, jentry.task_id, jentry.status)
            else:
                self.pending.append(entry)

    def _sending_elsewhere(self, key: str) -> bool:
        """A batch on this coordinator (not this one: its keys are unique) sends ``key``. A
        send whose loop was closed under it never ends: it sends nothing any more."""
        sends = _sends_of(self._coord)
        return sends is not None and any(
            not t.done() and not t.get_loop().is_closed() for t in sends.get(key, ()))

    def _sent(self, task: asyncio.Task[None]) -> None:
        entry = self.sending.pop(task, None)
        sends = _sends_of(self._coord)
        if entry is not None and sends is not None:
            tasks = sends.get(entry.key)
            if tasks is not None:
                tasks.discard(task)
                if not tasks:
                    del sends[entry.key]
        if not task.cancelled() and task.exception() is not None and self.failure is None:
            # A bug or a coordinator that failed (e.g. its server is gone): the batch stops
            # with it rather than leaving the item in limbo.
            self.failure = task.exception()
        self._wake()

    async def _send(self, entry: Entry) -> None:
        key = entry.key
        assert entry.body is not None
        try:
            look = self.look_first or entry.look_first or self._must_look_up(key)
            existing = await self._api.lookup(key) if look else None
            created = Created(existing, existed=True) if existing is not None else \
                await self._api.create(entry.body)
        except RateLimitError as exc:
            await self._rate_limited(entry, exc)
            return
        except VoiceAPIError as exc:
            # Answered (nothing was created), or the outcome stayed unknown after the lookups
            # the create flow made: never resent from here.
            await self._coord.release(key)
            self._ledger.resolve(entry, error=exc)
            return
        await self._coord.accepted(key, created.task.task_id, created.task.task_status.value)
        await self._on_created(entry, created)

    def _must_look_up(self, key: str) -> bool:
        """The coordinator's grant does not say that ``key`` is new: it lost its journal
        (``state_lost``: e.g. Redis restarted without persistence), or a create under the key
        was cancelled before its answer (``in_doubt``) and may have landed."""
        if getattr(self._coord, "state_lost", False) is True:
            return True
        in_doubt = getattr(self._coord, "in_doubt", None)
        return in_doubt is not None and in_doubt(key) is True

    async def _rate_limited(self, entry: Entry, exc: RateLimitError) -> None:
        self.pending.appendleft(entry)  # refused before anything was queued: send it again
        if exc.code == 1303:
            delay = await self._coord.refused(entry.key)
            if self._coord.in_flight == 0:
                self._back_off(exc.retry_after if exc.retry_after is not None else delay)
            else:  # one of ours ending frees a slot: look for that rather than retry blindly
                self.want_poll = True
            return
        await self._coord.release(entry.key)
        await self._coord.rate_limited(exc.code, exc.retry_after)
        self._back_off(exc.retry_after if exc.retry_after is not None
                       else self._api.rate_limit_delay * random.uniform(1.0, 2.0))

    def _back_off(self, delay: float) -> None:
        self.not_before = max(self.not_before, time.monotonic() + max(delay, 0.0))

    def wake_at(self) -> float | None:
        """When a create may start without anything else happening (a backoff ending)."""
        times = []
        if self.pending and self.not_before > time.monotonic():
            times.append(self.not_before)
        if self.deferred:
            times.append(self.deferred[0][0])
        return min(times) if times else None

    # --- ending -------------------------------------------------------------------------------

    async def cancel(self) -> list[Entry]:
        """Cancel creates in flight; returns the items whose outcome is now unknown."""
        pairs = list(self.sending.items())
        for task, _ in pairs:
            task.cancel()
        if pairs:
            await asyncio.gather(*(t for t, _ in pairs), return_exceptions=True)
        self.sending.clear()
        unknown = [e for t, e in pairs if t.cancelled() and not e.done and e.task is None]
        abandon = getattr(self._coord, "abandon", None)
        if abandon is not None:
            for entry in unknown:
                abandon(entry.key)
        return unknown

    def give_up(self, why: str) -> None:
        """Items never sent get a NotSubmittedError."""
        while self.deferred:
            self.pending.append(self.deferred.popleft()[1])
        while self.pending:
            entry = self.pending.popleft()
            if not entry.done:  # e.g. a journaled item the deadline timed out already
                self._ledger.resolve(entry, error=NotSubmittedError(f"not submitted: {why}"))

    async def resolve_unknown(self, entries: list[Entry], timeout: float,
                              on_found: Callable[[Entry, VoiceTask], Awaitable[None]]) -> None:
        """Creates cancelled mid-flight may have landed: look each up (within ``timeout``).
        Found → followed like any task; answered not-found → NotSubmittedError."""
        async def one(entry: Entry) -> None:
            try:
                found = await within(self._api.lookup(entry.key), timeout)
            except (VoiceAPIError, asyncio.TimeoutError, TimeoutError):
                self._ledger.resolve(entry, error=NotSubmittedError(
                    f"the create of {entry.key} was cancelled at the batch deadline and could "
                    "not be looked up: it may exist"))
                return
            if found is None:
                await self._coord.release(entry.key)
                self._ledger.resolve(entry, error=NotSubmittedError(
                    f"not submitted: the create of {entry.key} was cancelled at the batch "
                    "deadline"))
                return
            await self._coord.accepted(entry.key, found.task_id, found.task_status.value)
            await on_found(entry, found)

        await asyncio.gather(*(one(e) for e in entries))



__all__ = ["Submitter"]
