"""The slot-coordinator seam: who may start a task now, what the cap is, what exists, who polls.

The batch scheduler talks to Kling only through the resource, and to other workers only through
this protocol. The default implementation keeps everything in this process; the optional
``voiceapi.coordination.RedisCoordinator`` (extra ``voiceapi[redis]``) shares it between
processes and hosts that use one Kling account. Every method that may need the network is a
coroutine, so a networked implementation fits without changing the scheduler.

Vocabulary:

* a **key** is an item's ``external_task_id``: the one name every worker gives the same voice;
* a **slot** is one task in progress at Kling, counted from "about to create" until the task is
  seen ending (a timed-out or abandoned task still holds its slot: Kling still runs it);
* the **journal** maps keys to the task Kling created for them, so nothing is created twice;
* the **cap** is the number of slots: a fixed ceiling from the user, lowered by 1303 answers, or
  learned from them.

Optional extension: ``async def adopt(key, task_id, status)``. When a rerun re-attaches a task
still running from an earlier run, the scheduler calls it (if the coordinator has it) so the
task holds a slot until it is seen ending, even above the cap; without it, ``record`` is called.

Optional extension: ``state_lost: bool``. A shared coordinator whose store lost its state while
it ran (a Redis restart without persistence) sets it: from then on its grants no longer prove
that a key is new, so the scheduler looks each key up before creating it.

Optional extension: ``abandon(key)`` and ``in_doubt(key) -> bool`` (plain methods: ``abandon``
runs while a batch is being cancelled, so it must not block). A create under ``key`` was
cancelled before its answer (the batch was cancelled or reached its deadline): it may or may
not have landed at Kling. The coordinator stops counting it as this batch's slot, and until the
key is settled (``accepted``, ``release``, ``finished``) ``in_doubt(key)`` is True: the
scheduler then looks the key up before creating it. Without them, the slot stays held.

Optional extension: ``key_waits(key) -> bool``. True when the last ``acquire(key)`` answered
WAIT because of that key alone (e.g. a dead worker's slot for it is not settled yet), not for
want of a slot: the scheduler sets that item aside (as for FOLLOW) and goes on with the others.

Optional extension: ``follow_with(poll, lookup)`` (a plain method). Each batch calls it as it
starts, so that a shared coordinator can follow the tasks it holds slots for after every batch
following them has returned (``wait=False``), even while no batch runs.

Optional extension: ``vouches_for_creates: bool``. True when the coordinator never grants a
create under a key that may already exist (every create made through it is journaled, or holds
a slot a lookup settles if its worker dies): the scheduler then does not look each item up
before creating it when its start-up check finds the first item created by a sharing worker.

Optional extension: ``async def held(keys) -> set[str]``. Those keys whose slot a worker holds
now (or a dead worker left): a create under them may have landed at Kling before ``accepted``
journals it. The start-up check asks it so that a sharing worker's create still on its way is
not taken for a rerun.

Layering: this module depends only on the models; the scheduler and the client depend on it.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import Protocol, runtime_checkable

import attrs

from ._errors import VoiceAPIError
from ._models import VoiceTask


class CoordinatorError(VoiceAPIError):
    """A shared coordinator can no longer keep its guarantees (its store is unreachable or
    refuses commands). The batch stops with it rather than carry on alone, which could create
    items other workers create and overrun the account's cap."""


class Grant(enum.Enum):
    """The answer to "may I create the task for this key now?"."""

    #: The slot is yours: create the task under this key, then report accepted/refused/release.
    CREATE = "create"
    #: Another worker holds or created this key: do not create; follow it through the journal.
    #: (The scheduler asks ``known`` again a little later: once the journal names the task it
    #: follows it without holding a slot — never ``finished``/``release`` for it — else it
    #: asks ``acquire`` again, and looks the key up before any create.)
    FOLLOW = "follow"
    #: No slot is free (or the account is backing off after a 1303): try again later.
    WAIT = "wait"


@attrs.frozen
class JournalEntry:
    """What the journal knows about a key: the task Kling created for it and its last status."""

    task_id: str
    status: str


#: Finds the given task ids at Kling (list pages, per-task lookups as a fallback) and returns
#: the ones it saw; the tracker supplies it, the coordinator decides who calls it.
PollFunction = Callable[[Collection[str]], Awaitable[Mapping[str, VoiceTask]]]

#: Looks one key up at Kling by external_task_id: the task, or None only when the server
#: answered "not found" (any other failure raises). A shared coordinator uses it to resolve the
#: slots of dead workers (finished → free, running → adopt and follow, not found → free).
LookupFunction = Callable[[str], Awaitable[VoiceTask | None]]


@runtime_checkable
class Coordinator(Protocol):
    """Slots, cap, journal, request rate and polling for one Kling account."""

    # --- the journal ------------------------------------------------------------------------

    async def known(self, keys: Sequence[str]) -> Mapping[str, JournalEntry]:
        """The journal entries for those keys that have one (a rerun or another worker's)."""
        ...

    async def record(self, key: str, task_id: str, status: str) -> None:
        """Journal a task's id and status without changing slots (e.g. on re-attach)."""
        ...

    # --- slots ------------------------------------------------------------------------------

    async def acquire(self, key: str) -> Grant:
        """Ask for a slot to create the task under ``key``. Never grants above the cap."""
        ...

    async def wait_for_slot(self, timeout: float) -> None:
        """Return when a slot may have been freed (or after ``timeout`` seconds)."""
        ...

    async def accepted(self, key: str, task_id: str, status: str) -> None:
        """The create under ``key`` was accepted: the slot stays held, the journal learns it,
        and a learned cap may grow."""
        ...

    async def refused(self, key: str) -> float:
        """The create under ``key`` was refused with 1303 (nothing created): free its slot and
        lower the cap to the slots the account holds now. Returns how long to wait before the
        next create when no slot of ours is likely to free sooner (≥ 1 s, with jitter)."""
        ...

    async def release(self, key: str) -> None:
        """No task exists (or will exist) under ``key``: bad input, an error the server
        answered, or a lookup that answered "not found". Frees the slot."""
        ...

    async def finished(self, key: str, task_id: str, status: str) -> None:
        """The task under ``key`` was seen ending: free its slot and journal the final status."""
        ...

    @property
    def cap(self) -> int:
        """The working cap now (a snapshot, for progress reports)."""
        ...

    @property
    def in_flight(self) -> int:
        """Slots held now by this worker (a snapshot, for progress reports)."""
        ...

    # --- polling ----------------------------------------------------------------------------

    async def observe(self, mine: Collection[str], poll: PollFunction,
                      lookup: LookupFunction) -> Mapping[str, VoiceTask]:
        """The latest state of this worker's tracked task ids.

        The in-process coordinator simply calls ``poll(mine)``. A shared one lets one worker poll
        for every worker's tasks (and for adopted orphans, resolved with ``lookup``) and hands
        the others its observations.
        """
        ...

    # --- plain client calls (AsyncVoiceClient(coordinator=...)) --------------------------------

    async def before_request(self, *, create: bool) -> None:
        """Wait for the account-wide request rate, and for creates also for any shared 1303
        backoff."""
        ...

    async def rate_limited(self, code: int | None, retry_after: float | None) -> None:
        """A request was answered 1302/1303: share the backoff with every worker."""
        ...


__all__ = ["Coordinator", "CoordinatorError", "Grant", "JournalEntry", "LookupFunction",
           "PollFunction"]
