"""RedisCoordinator: the slot-coordinator protocol shared through Redis.

Why Redis and these shapes (issue 14):

* slots are a sorted set ``key -> lease deadline`` in SERVER time, renewed by a background task
  while this worker lives; a lapsed lease is not freed but becomes an **orphan** that still
  counts against the cap, because the dead worker's task may still run at Kling. A live worker
  looks each orphan up by ``external_task_id``: finished → freed and journaled; running →
  adopted (this worker holds and follows it); unknown past a grace period → freed;
* the cap, the request rate (a GCRA schedule), the 1302/1303 backoffs and the journal live in
  Redis, so every worker of one account sees one of each;
* one worker at a time (the **leader**) polls Kling for every worker's tracked tasks and
  publishes what it saw; the others read it. A leader that stops publishing is replaced;
* releases are announced on pub/sub so waiting workers wake at once; because pub/sub is
  at-most-once, waits are also bounded (polling is the safety net).

If Redis becomes unreachable, every method raises :class:`CoordinationError` (after redis-py's
own reconnect attempts): we fail clearly rather than degrade to a local coordinator, because a
worker carrying on alone would create items others also create and overrun the shared cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
import socket
import sys
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Collection, Coroutine, Mapping, Sequence
from types import TracebackType
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .. import _constants as C
from .._aio import within
from .._config import checked_number
from .._coordinator import Grant, JournalEntry, LookupFunction, PollFunction
from .._errors import ValidationError
from .._models import VoiceTask
from . import _defaults as D
from . import _scripts as S
from ._codec import dump_entry, dump_task, load_entry, load_task
from ._errors import CoordinationError

log = logging.getLogger(f"{C.LOGGER_NAME}.coordination")

_NAMESPACE_SALT = b"voiceapi-namespace\0"
_MAX_ARGS = 1000  # ids per HMGET / script call: keeps one command small


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _redact(url: str) -> str:
    """The URL without its password (it may carry one: ``redis://:secret@host``)."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _without_password(text: str, url: str) -> str:
    """``text`` (a parser's message about ``url``) with the URL's password masked."""
    try:
        password = urllib.parse.urlsplit(url).password  # read without checking the port
    except ValueError:
        # A URL urllib cannot split either (a bad IPv6 host): this runs while reporting
        # that, so it must not raise a bare ValueError in turn. Read the userinfo by hand.
        netloc = url.partition("://")[2].partition("/")[0]
        userinfo, at, _ = netloc.rpartition("@")
        password = userinfo.partition(":")[2] if at else None
    return text.replace(password, "***") if password else text


def _cancelling(task: asyncio.Task[Any] | None) -> int:
    """Cancel requests pending on ``task`` (Python >= 3.11; 0 where unknown)."""
    count = getattr(task, "cancelling", None)
    return int(count()) if callable(count) else 0


class _RemembersCancel(asyncio.Task):  # type: ignore[type-arg]  # pragma: no cover - 3.10
    """A task that remembers being asked to cancel, even if the code it runs swallowed it."""

    cancel_requested = False

    def cancel(self, msg: Any = None) -> bool:
        self.cancel_requested = True
        return super().cancel(msg)


async def _keeping_cancels(call: Awaitable[Any]) -> Any:  # pragma: no cover - Python 3.10
    """``await call``, but a cancel that arrived meanwhile is raised even if it was swallowed.

    3.11's ``Task.cancelling()`` lets ``_guard`` see such a cancel; 3.10 has no counter, so the
    call runs in its own task, whose ``cancel()`` (which our task's cancel calls) takes note.
    """
    async def run() -> Any:
        return await call

    # The coroutine itself, not a wrapper: cancelled before its first step, it is closed
    # rather than left "never awaited".
    inner = _RemembersCancel(call if asyncio.iscoroutine(call) else run())
    result = await inner
    if inner.cancel_requested:
        raise asyncio.CancelledError
    return result


def namespace_for(credentials: Any) -> str:
    """A stable namespace for one Kling account, derived from its access key or API key.

    Only a salted hash is kept: the key itself never reaches Redis, logs or ``repr``.
    """
    access_key = getattr(credentials, "access_key", None)
    if isinstance(access_key, str):
        identity = b"ak:" + access_key.encode()
    elif callable(getattr(credentials, "authorization", None)):
        identity = b"key:" + credentials.authorization().encode()
    else:
        raise ValidationError("credentials_of needs a voiceapi client or credentials object")
    return hashlib.sha256(_NAMESPACE_SALT + identity).hexdigest()[:16]


def _check_settings(*, lease_seconds: Any, max_in_flight: Any, max_requests_per_second: Any,
                    orphan_grace: Any, stale_after: Any) -> None:
    """Bad settings are a ValidationError here, not a TypeError, an OverflowError at the first
    acquire (``lease_seconds=float("inf")``), or a cap of 3 for ``max_in_flight=2.5``."""
    # renewal runs every third of the lease
    checked_number(lease_seconds, "lease_seconds", minimum=D.MIN_LEASE_SECONDS, exclusive=False)
    if max_in_flight is not None and (
            isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int)
            or not 1 <= max_in_flight <= C.BATCH_MAX_SLOTS):
        raise ValidationError(f"max_in_flight must be an integer between 1 and "
                              f"{C.BATCH_MAX_SLOTS}")
    if max_requests_per_second is not None:
        checked_number(max_requests_per_second, "max_requests_per_second")
    checked_number(orphan_grace, "orphan_grace", exclusive=False)
    checked_number(stale_after, "stale_after")


def _credentials_of(obj: Any) -> Any:
    """The credentials of a client (async or sync) or of a credentials object itself."""
    for _ in range(3):  # VoiceClient -> AsyncVoiceClient -> ClientConfig -> Credentials
        if callable(getattr(obj, "authorization", None)):
            return obj
        config = getattr(obj, "_config", None)
        obj = config.credentials if config is not None else getattr(obj, "_async", None)
    if callable(getattr(obj, "authorization", None)):
        return obj
    raise ValidationError("credentials_of needs a voiceapi client or credentials object")


class RedisCoordinator:
    """Slots, cap, journal, request rate and polling for one Kling account, shared through
    Redis by every worker (process or host) that uses the same Redis and namespace.

    ``url_or_client``: a ``redis://`` / ``rediss://`` / ``unix://`` URL, or an existing
    ``redis.asyncio.Redis`` (then never closed by us). ``namespace``: which account's state to
    share; by default a hash of the account's access key / API key, taken from
    ``credentials_of`` (a client), from the client this coordinator is bound to, or from the
    ``KLING_*`` environment variables. ``lease_seconds``: how long a worker that stopped
    renewing keeps its slots before they become orphans. ``max_in_flight``: a fixed ceiling on
    tasks in progress (a 1303 still lowers the working cap); None learns the cap.
    ``max_requests_per_second``: the account-wide request rate (None: the bound client's).
    ``orphan_grace``: how long an orphan unknown at Kling stays counted (≥ the create timeout).
    """

    @property
    def vouches_for_creates(self) -> bool:
        """The batch need not look items up before creating them when their keys are unknown
        here: every create is journaled or holds a lease that a lookup settles if its worker
        dies (the batch reads this with getattr; an extra to the Coordinator protocol). Not
        once the shared state was lost (``state_lost``)."""
        return not self.state_lost

    def __init__(
        self,
        url_or_client: str | aioredis.Redis,
        *,
        namespace: str | None = None,
        lease_seconds: float = D.DEFAULT_LEASE_SECONDS,
        max_in_flight: int | None = None,
        max_requests_per_second: float | None = None,
        credentials_of: Any = None,
        orphan_grace: float = D.DEFAULT_ORPHAN_GRACE_SECONDS,
        stale_after: float = D.DEFAULT_STALE_SECONDS,
    ) -> None:
        _check_settings(lease_seconds=lease_seconds, max_in_flight=max_in_flight,
                        max_requests_per_second=max_requests_per_second,
                        orphan_grace=orphan_grace, stale_after=stale_after)
        if namespace is not None and (not isinstance(namespace, str) or not namespace
                                      or any(c in namespace for c in "{}")):
            raise ValidationError("namespace must be a non-empty string without braces")
        if isinstance(url_or_client, str):
            if not url_or_client.startswith(("redis://", "rediss://", "unix://")):
                raise ValidationError("the Redis URL must start with redis://, rediss:// or "
                                      "unix://")
            try:
                self._where = _redact(url_or_client)
                self._redis: aioredis.Redis = aioredis.Redis.from_url(
                    url_or_client,
                    retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), D.CONNECT_RETRIES),
                    retry_on_error=[RedisConnectionError, RedisTimeoutError],
                    socket_timeout=D.SOCKET_TIMEOUT_SECONDS,
                    socket_connect_timeout=D.SOCKET_TIMEOUT_SECONDS)
            except ValueError as exc:  # the URL parsers' own words (a port out of range, a db)
                raise ValidationError(f"the Redis URL is not valid: "
                                      f"{_without_password(str(exc), url_or_client)}") from None
            self._owns_client = True
        elif isinstance(url_or_client, aioredis.Redis):
            self._where = "the given Redis client"
            self._redis = url_or_client
            self._owns_client = False
        else:
            raise ValidationError("RedisCoordinator needs a Redis URL or a redis.asyncio.Redis")
        self._namespace = namespace
        self._namespace_from_credentials = False
        self._lease = float(lease_seconds)
        self._fixed = max_in_flight
        self._rate = max_requests_per_second
        self._grace = float(orphan_grace)
        self._stale = float(stale_after)
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._scripts = {name: self._redis.register_script(getattr(S, name)) for name in (
            "JOIN_EPOCH", "ACQUIRE", "ACCEPTED", "REFUSED", "FREE", "RENEW", "ORPHANS", "ADOPT",
            "FREE_MISSING_ORPHAN", "HOLD_RUNNING", "RATE", "BACKOFF", "OBSERVE",
            "PUBLISH_OBSERVATIONS", "FREE_ENDED", "RESIGN")}
        self._held: set[str] = set()
        #: This worker's view of the state's epoch (see ``_scripts.JOIN_EPOCH``).
        self._epoch = uuid.uuid4().hex
        #: Redis lost the shared state since this worker joined it (a restart without
        #: persistence, a flush, an eviction): the journal no longer knows every task, so a
        #: create is granted only to be looked up first (the batch reads this with getattr).
        #: Never reset: what was lost stays lost for this worker.
        self.state_lost = False
        #: Keys whose create this worker abandoned unanswered (``abandon``), not settled yet.
        self._doubt: set[str] = set()
        #: Keys whose last acquire waited for the key itself (an unresolved orphan).
        self._unresolved: set[str] = set()
        self._adopted: dict[str, str] = {}  # key -> task id, orphans this worker follows
        #: key -> task id for every held slot whose task exists (accepted, adopted, held on a
        #: rerun): observe() follows those no batch follows any more (see ``_unfollowed``).
        self._task_of: dict[str, str] = {}
        self._cap = max_in_flight if max_in_flight is not None else C.BATCH_INITIAL_SLOTS
        self._wake_event = asyncio.Event()
        self._backoff_until = 0.0  # monotonic; a shared backoff seen by acquire
        self._lookup: LookupFunction | None = None
        #: The last batch's poll function: the renew loop follows held tasks with it while no
        #: batch observes (see ``_follow_while_idle``).
        self._poll: PollFunction | None = None
        self._last_resolve = float("-inf")
        self._last_observe = float("-inf")
        self._observe_every: float | None = None  # this worker's observe interval (EMA)
        self._tasks: list[asyncio.Task[None]] = []
        self._chores: set[asyncio.Task[None]] = set()
        self._start_lock = asyncio.Lock()
        self._started = False
        self._closed = False
        self._closing = False
        self._entered = False  # opened with ``async with``: the user closes it
        self._clients: set[int] = set()  # clients bound to us and not closed yet
        self._outage_logged = False
        #: Orphans this worker adopted so far (for progress reports and tests).
        self.adoptions = 0
        if namespace is None and credentials_of is not None:
            self._bind_account(credentials_of)

    # --- identity ---------------------------------------------------------------------------

    def bind(self, client_or_credentials: Any) -> None:
        """Learn the account from a client (``AsyncVoiceClient(..., coordinator=coord)`` calls
        this) when no ``namespace`` was given. Binding clients of two accounts is an error.

        A coordinator that was not opened with ``async with`` is closed together with the last
        client bound to it (:meth:`client_closed`): a blocking ``VoiceClient`` runs it on the
        client's private loop, which nobody else can reach to close it.
        """
        self._bind_account(client_or_credentials)
        self._clients.add(id(client_or_credentials))

    async def client_closed(self, client: Any) -> None:
        """A bound client closed (``AsyncVoiceClient.aclose`` calls this). The last one closes
        a coordinator nobody entered with ``async with``; one the user entered is theirs."""
        self._clients.discard(id(client))
        if not self._clients and not self._entered:
            await self.aclose()

    def _bind_account(self, client_or_credentials: Any) -> None:
        if self._namespace is not None and not self._namespace_from_credentials:
            return  # an explicit namespace wins
        namespace = namespace_for(_credentials_of(client_or_credentials))
        if self._namespace is not None and namespace != self._namespace:
            raise ValidationError("this RedisCoordinator already serves another Kling account")
        self._namespace, self._namespace_from_credentials = namespace, True
        if self._rate is None:
            config = getattr(client_or_credentials, "_config", None)
            self._rate = getattr(config, "max_requests_per_second", None)

    @property
    def namespace(self) -> str | None:
        return self._namespace

    def _prefix(self) -> str:
        if self._namespace is None:
            from .._config import resolve_credentials  # the client's own fallback order

            try:
                creds = resolve_credentials(None, None, None, os.environ)
            except ValidationError:
                raise ValidationError(
                    "RedisCoordinator does not know which Kling account it serves: pass "
                    "namespace=..., credentials_of=client, or bind it with "
                    "AsyncVoiceClient(..., coordinator=coord)") from None
            self._namespace, self._namespace_from_credentials = namespace_for(creds), True
        return f"{{voiceapi:{self._namespace}}}"

    def _k(self, *names: str) -> list[str]:
        prefix = self._prefix()
        return [f"{prefix}:{name}" for name in names]

    def __repr__(self) -> str:
        return (f"RedisCoordinator({self._where!r}, namespace={self._namespace!r}, "
                f"worker={self.worker_id!r}, lease_seconds={self._lease!r})")

    # --- lifecycle --------------------------------------------------------------------------

    async def __aenter__(self) -> RedisCoordinator:
        self._entered = True
        async with self._guard():
            await self._redis.ping()  # fail here, not mid-batch
        if self._namespace is not None:
            await self._ensure_started()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop renewing and listening, hand the poller role over. Slots still held (tasks
        still running at Kling, e.g. after ``wait=False``) are deliberately NOT freed: their
        leases lapse into orphans that another worker resolves by lookup."""
        if self._closing:
            return
        self._closing = True
        if self._chores:  # give-backs scheduled by cancelled calls finish first
            await asyncio.wait(self._chores, timeout=D.WAKE_POLL_SECONDS * 3)
        self._closed = True
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=D.WAKE_POLL_SECONDS * 3)
        if self._started:
            with contextlib.suppress(RedisError, OSError):
                await self._scripts["RESIGN"](keys=self._k("leader"), args=[self.worker_id])
        if self._owns_client:
            with contextlib.suppress(RedisError, OSError):
                await self._redis.aclose()

    async def _ensure_started(self) -> None:
        if self._closed:
            raise CoordinationError("the RedisCoordinator is closed")
        if self._started:
            return
        self._prefix()  # resolve the namespace (or explain) before any background work
        async with self._start_lock:
            if not self._started:
                async with self._guard():
                    epoch = await self._scripts["JOIN_EPOCH"](
                        keys=self._k("epoch"), args=[self._epoch, D.STATE_TTL_SECONDS * 1000])
                self._epoch = _text(epoch)
                self._tasks = [asyncio.create_task(self._renew_loop()),
                               asyncio.create_task(self._listen())]
                self._started = True

    @contextlib.asynccontextmanager
    async def _guard(self) -> AsyncIterator[None]:
        task = asyncio.current_task()
        cancels = _cancelling(task)
        try:
            yield
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise CoordinationError(
                f"Redis at {self._where} is unreachable ({type(exc).__name__}); the batch stops "
                "rather than run uncoordinated. Rerun when Redis is back.") from exc
        except RedisError as exc:
            raise CoordinationError(f"Redis at {self._where} refused a coordinator command "
                                    f"({type(exc).__name__}: {exc})") from exc
        if _cancelling(task) > cancels:
            # redis-py sends through asyncio.wait_for, which on Python 3.11 returns a result
            # that was ready as we were cancelled and drops the cancel: a cancelled batch then
            # ran to its end. Give the cancel back to the caller.
            raise asyncio.CancelledError

    async def _run(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        await self._ensure_started()
        async with self._guard():
            call = self._scripts[name](keys=list(keys), args=list(args))
            if sys.version_info >= (3, 11):
                return await call
            return await _keeping_cancels(call)  # pragma: no cover - Python 3.10

    # --- background: lease renewal and wake-ups ---------------------------------------------

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self._lease / 3)
            try:
                await self.renew()
                await self._follow_while_idle()
            except CoordinationError as exc:
                # The next protocol call raises; meanwhile keep trying (the outage may pass
                # before our leases lapse).
                if not self._outage_logged:
                    log.warning("cannot renew slot leases: %s", exc)
                    self._outage_logged = True

    async def renew(self) -> None:
        """Extend this worker's leases now (the background task does it every third lease)."""
        held = sorted(self._held)
        lost = await self._run("RENEW", self._k("slots", "orphans", "owners", "epoch"),
                               [self.worker_id, int(self._lease * 1000),
                                D.STATE_TTL_SECONDS * 1000, *held])
        self._outage_logged = False
        for key in map(_text, lost):
            # Another worker adopted or finished it: it is no longer ours to hold.
            self._held.discard(key)
            self._adopted.pop(key, None)
            self._task_of.pop(key, None)

    def follow_with(self, poll: PollFunction, lookup: LookupFunction) -> None:
        """How to look at tasks at Kling, given by each batch as it starts (an extra to the
        Coordinator protocol): the renew loop follows held tasks no batch follows with it."""
        self._poll = poll
        self._lookup = lookup

    async def _follow_while_idle(self) -> None:
        """Follow this worker's held tasks while no batch observes: a worker whose batch
        returned with tasks still running (``wait=False``) and that runs no other batch
        renewed their leases for as long as it lived, so the other workers sharing the cap
        never got those slots back. A failed poll is tried again at the next renewal."""
        poll = self._poll
        if poll is None or time.monotonic() - self._last_observe < self._lease:
            return  # a batch observes (and follows them): nothing to do here
        follow = {tid: key for key, tid in self._adopted.items()} | self._unfollowed(())
        if not follow:
            return
        try:
            seen = await poll(set(follow))
        except Exception as exc:
            log.debug("following held tasks failed (%s); will retry", type(exc).__name__)
            return
        for task_id, key in follow.items():
            task = seen.get(task_id)
            if task is not None and task.is_terminal and self._task_of.get(key) == task_id:
                await self.finished(key, task_id, task.task_status.value)

    async def _listen(self) -> None:
        delay = 0.1
        channel = self._k("events")[0]
        # Loops on the closed flag, not on cancellation alone: redis-py's get_message can
        # swallow a cancel and return None, which would keep this task alive forever.
        while not self._closed:
            pubsub = self._redis.pubsub()
            try:
                await pubsub.subscribe(channel)
                delay = 0.1
                while not self._closed:
                    msg = await pubsub.get_message(ignore_subscribe_messages=True,
                                                   timeout=D.WAKE_POLL_SECONDS)
                    if msg is not None and _text(msg.get("data")) == "free":
                        self._wake()
            except (RedisError, OSError) as exc:
                log.debug("pub/sub interrupted (%s); waits fall back to polling", exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, D.WAKE_POLL_SECONDS * 2)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        async def guarded() -> None:
            with contextlib.suppress(CoordinationError):
                await work

        task = asyncio.get_running_loop().create_task(guarded())
        self._chores.add(task)  # a strong reference until done: tasks are weakly held
        task.add_done_callback(self._chores.discard)

    def _wake(self) -> None:
        event, self._wake_event = self._wake_event, asyncio.Event()
        event.set()

    # --- the journal ------------------------------------------------------------------------

    async def known(self, keys: Sequence[str]) -> Mapping[str, JournalEntry]:
        await self._ensure_started()
        found: dict[str, JournalEntry] = {}
        async for key, raw in self._hmget(self._k("journal")[0], list(keys)):
            entry = load_entry(raw)
            if entry is not None:
                found[key] = entry
        return found

    async def held(self, keys: Sequence[str]) -> set[str]:
        """Those of ``keys`` whose slot a worker holds now, or a dead worker left as an orphan.

        Their creates may have landed at Kling before ``accepted`` journals them (the answer
        is on its way, or its worker died): finding such a task is no sign of a rerun. The
        batch's rerun probe asks it (with getattr; an extra to the Coordinator protocol).
        """
        await self._ensure_started()
        slots, orphans = self._k("slots", "orphans")
        found: set[str] = set()
        for start in range(0, len(keys), _MAX_ARGS):
            chunk = list(keys[start:start + _MAX_ARGS])
            async with self._guard(), self._redis.pipeline(transaction=False) as pipe:
                for key in chunk:
                    pipe.zscore(slots, key)
                    pipe.zscore(orphans, key)
                scores = await pipe.execute()
            found.update(key for i, key in enumerate(chunk)
                         if scores[2 * i] is not None or scores[2 * i + 1] is not None)
        return found

    async def _hmget(self, name: str, fields: list[str]) -> AsyncIterator[tuple[str, Any]]:
        """(field, raw value) for each field of hash ``name``, read in bounded chunks (a
        command's argument count is limited, and a huge one would block the server)."""
        for start in range(0, len(fields), _MAX_ARGS):
            chunk = fields[start:start + _MAX_ARGS]
            async with self._guard():
                values = await self._redis.hmget(name, chunk)
            for pair in zip(chunk, values, strict=True):
                yield pair

    async def record(self, key: str, task_id: str, status: str) -> None:
        await self._ensure_started()
        journal = self._k("journal")[0]
        async with self._guard(), self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(journal, key, dump_entry(task_id, status))
            pipe.pexpire(journal, D.STATE_TTL_SECONDS * 1000)
            await pipe.execute()

    # --- slots ------------------------------------------------------------------------------

    @property
    def _ceiling(self) -> int:
        return self._fixed if self._fixed is not None else C.BATCH_MAX_SLOTS

    async def acquire(self, key: str) -> Grant:
        held_before = key in self._held
        try:
            grant, cap, backoff_ms, lost, unresolved = await self._run(
                "ACQUIRE",
                self._k("slots", "orphans", "owners", "journal", "cap", "backoff:create",
                        "epoch"),
                [key, self.worker_id, int(self._lease * 1000), self._ceiling,
                 self._fixed or C.BATCH_INITIAL_SLOTS, D.STATE_TTL_SECONDS * 1000,
                 self._epoch, uuid.uuid4().hex])
        except asyncio.CancelledError:
            # Redis may have granted the slot before the answer was lost to the cancel. The
            # caller will not create under it, so give it back (in the background: we are
            # being cancelled) instead of letting it sit until lease + orphan grace.
            if not held_before:
                self._background(self._free(key, "release", ""))
            raise
        self._cap = int(cap)
        if int(lost) and not self.state_lost:
            self.state_lost = True
            log.warning("Redis at %s lost the shared state (restarted without persistence, "
                        "flushed or evicted): every create is now looked up first", self._where)
        if int(backoff_ms) > 0:
            self._backoff_until = time.monotonic() + int(backoff_ms) / 1000
        result = Grant(_text(grant))
        if result is Grant.CREATE:
            self._held.add(key)
        if int(unresolved):
            self._unresolved.add(key)
        else:
            self._unresolved.discard(key)
        return result

    def key_waits(self, key: str) -> bool:
        """The last ``acquire(key)`` answered WAIT for that key alone: it is an orphan that
        no lookup has settled yet (a dead worker's create that Kling does not know stays one
        for ``orphan_grace``). Other keys may still get a slot (an extra to the protocol)."""
        return key in self._unresolved

    async def wait_for_slot(self, timeout: float) -> None:
        if timeout <= 0:
            return
        event = self._wake_event
        backoff = self._backoff_until - time.monotonic()
        if backoff > 0:  # nothing will be granted before the shared backoff ends
            await asyncio.sleep(min(backoff, timeout))
            return
        if self._lookup is not None:
            await self._maybe_resolve_orphans(self._lookup)
        with contextlib.suppress(TimeoutError):
            await within(event.wait(), min(timeout, D.WAKE_POLL_SECONDS))

    async def accepted(self, key: str, task_id: str, status: str) -> None:
        self._held.add(key)
        self._doubt.discard(key)
        self._task_of[key] = task_id
        cap = await self._run(
            "ACCEPTED", self._k("slots", "orphans", "owners", "journal", "cap"),
            [key, self.worker_id, int(self._lease * 1000), dump_entry(task_id, status),
             self._ceiling, D.PROBE_ACCEPTS_PER_SLOT, D.STATE_TTL_SECONDS * 1000,
             self._fixed or C.BATCH_INITIAL_SLOTS])
        self._cap = min(int(cap), self._ceiling)

    async def refused(self, key: str) -> float:
        delay = C.RATE_LIMIT_MIN_DELAY * (1 + random.random() * D.BACKOFF_JITTER)
        cap, _used = await self._run(
            "REFUSED", self._k("slots", "orphans", "owners", "cap", "backoff:create"),
            [key, self.worker_id, int(delay * 1000)])
        self._held.discard(key)
        self._task_of.pop(key, None)
        self._cap = min(int(cap), self._ceiling)
        return delay

    async def release(self, key: str) -> None:
        await self._free(key, "release", "")

    def abandon(self, key: str) -> None:
        """The create under ``key`` was cancelled before its answer (its batch was cancelled
        or reached its deadline): stop renewing its lease. It lapses into an orphan that a
        lookup settles (found: followed to its end; unknown after ``orphan_grace``: freed).
        Renewing it, as before, held the slot for as long as this coordinator lived."""
        if key in self._held and key not in self._adopted:
            self._held.discard(key)
            self._doubt.add(key)

    def in_doubt(self, key: str) -> bool:
        """A create under ``key`` was abandoned by this worker and nothing has settled it."""
        return key in self._doubt

    async def finished(self, key: str, task_id: str, status: str) -> None:
        await self._free(key, "finish", dump_entry(task_id, status))

    async def _free(self, key: str, mode: str, entry: str) -> None:
        freed = await self._run(
            "FREE", self._k("slots", "orphans", "owners", "journal"),
            [key, self.worker_id, mode, entry, self._k("events")[0],
             D.STATE_TTL_SECONDS * 1000])
        self._held.discard(key)
        self._doubt.discard(key)
        self._adopted.pop(key, None)
        self._task_of.pop(key, None)
        if int(freed):
            self._wake()  # our own waiters need not wait for the pub/sub round trip

    @property
    def cap(self) -> int:
        return self._cap

    @property
    def in_flight(self) -> int:
        return len(self._held)

    # --- orphans: the slots of workers that died ----------------------------------------------

    async def _maybe_resolve_orphans(self, lookup: LookupFunction) -> None:
        now = time.monotonic()
        if now - self._last_resolve >= self._lease / 3:
            self._last_resolve = now
            await self.resolve_orphans(lookup)

    async def resolve_orphans(self, lookup: LookupFunction) -> int:
        """Look every orphan up at Kling and settle it; returns how many were settled.

        ``observe`` and ``wait_for_slot`` call this now and then; call it yourself only if you
        drive the coordinator without ``observe``. A lookup that fails (anything but "not
        found") leaves the orphan for a later attempt: freeing it could duplicate the task.
        """
        raw = await self._run("ORPHANS", self._k("slots", "orphans"), [])
        keys = [_text(x) for x in raw][:-1:2]
        settled = 0
        # A dead worker may leave many orphans: a few lookups at a time, not one by one.
        for start in range(0, len(keys), D.ORPHAN_LOOKUPS_AT_ONCE):
            chunk = keys[start:start + D.ORPHAN_LOOKUPS_AT_ONCE]
            settled += sum(await asyncio.gather(*(self._resolve_one(k, lookup) for k in chunk)))
        return settled

    async def _resolve_one(self, key: str, lookup: LookupFunction) -> int:
        claim = self._k(f"resolving:{key}")[0]
        async with self._guard():
            mine = await self._redis.set(claim, self.worker_id, nx=True,
                                         px=int(self._lease * 1000))
        if not mine:
            return 0  # another worker is looking this one up
        try:
            task = await lookup(key)
        except Exception as exc:  # any failure: not "not found", so try again later
            log.warning("orphan %s: lookup failed (%s); will retry", key, type(exc).__name__)
            return 0
        return await self._settle_orphan(key, task)

    async def _settle_orphan(self, key: str, task: VoiceTask | None) -> int:
        if task is None:
            return int(await self._run(
                "FREE_MISSING_ORPHAN", self._k("orphans", "owners"),
                [key, int(self._grace * 1000), self._k("events")[0]]))
        if task.is_terminal:
            await self._free(key, "finish", dump_entry(task.task_id, task.task_status.value))
            return 1
        adopted = await self._run(
            "ADOPT", self._k("slots", "orphans", "owners", "journal"),
            [key, self.worker_id, int(self._lease * 1000),
             dump_entry(task.task_id, task.task_status.value), D.STATE_TTL_SECONDS * 1000])
        if int(adopted):
            log.info("adopted orphaned task %s (%s)", task.task_id, key)
            self.adoptions += 1
            self._held.add(key)
            self._adopted[key] = task.task_id
            self._task_of[key] = task.task_id
        return int(adopted)

    async def adopt(self, key: str, task_id: str, status: str) -> None:
        """A task found still running under ``key`` (a rerun re-attaching to it) occupies a
        slot at Kling whoever created it: hold and count it until :meth:`finished` or
        :meth:`release` (an extra to the protocol; the batch calls it when present)."""
        held = await self._run(
            "HOLD_RUNNING", self._k("slots", "orphans", "owners", "journal"),
            [key, self.worker_id, int(self._lease * 1000), dump_entry(task_id, status),
             D.STATE_TTL_SECONDS * 1000])
        if int(held):
            self._held.add(key)
            self._task_of[key] = task_id

    @property
    def adopted(self) -> Mapping[str, str]:
        """Orphans this worker adopted and follows until they end: key -> task id."""
        return dict(self._adopted)

    # --- polling ----------------------------------------------------------------------------

    async def observe(self, mine: Collection[str], poll: PollFunction,
                      lookup: LookupFunction) -> Mapping[str, VoiceTask]:
        self._lookup = lookup
        self._poll = poll
        unfollowed = self._unfollowed(mine)
        ids = set(mine) | set(self._adopted.values()) | set(unfollowed)
        leader_ms = int(self._lease * 1000)
        result = await self._run(
            "OBSERVE", self._k("tracked", "obs_at", "leader"),
            [self.worker_id, int(self._lease * 1000 * D.TRACKED_TTL_LEASES), leader_ms,
             int(self._stale_now() * 1000), *sorted(ids)])
        if int(result[0]) == 1:  # we poll for everyone
            await self._maybe_resolve_orphans(lookup)
            everyone = {_text(x) for x in result[1:]} | ids | set(self._adopted.values())
            seen = dict(await poll(everyone)) if everyone else {}
            await self._publish(seen)
            await self._free_ended(seen)
        else:
            seen = await self._read_observations(ids)
        for key, task_id in [*self._adopted.items(), *((k, t) for t, k in unfollowed.items())]:
            task = seen.get(task_id)
            if task is not None and task.is_terminal and self._task_of.get(key) == task_id:
                await self.finished(key, task_id, task.task_status.value)
        return {i: seen[i] for i in mine if i in seen}

    def _unfollowed(self, mine: Collection[str]) -> dict[str, str]:
        """Task id -> key for this worker's held slots whose task no batch follows now: a
        batch that returned with tasks still running (``wait=False``, timed-out items). They
        keep their slot until seen ending, so observe() follows them; before, nobody did, the
        worker renewed their leases for as long as it lived, and its next batch never got a
        slot."""
        wanted = set(mine)
        return {tid: key for key, tid in self._task_of.items()
                if tid not in wanted and key not in self._adopted}

    def _stale_now(self) -> float:
        """How old the poller's last observations may be before this worker polls itself.

        A poller whose own batch has nothing left to follow stops calling ``observe``; waiting
        the full ``stale_after`` would stall every other worker. So a worker takes over once
        the observations are a few of ITS OWN observe intervals old (never later than
        ``stale_after``): total polling stays at about one poll per interval.
        """
        now = time.monotonic()
        gap, self._last_observe = now - self._last_observe, now
        if gap < self._stale:
            self._observe_every = gap if self._observe_every is None else \
                0.7 * self._observe_every + 0.3 * gap
        if self._observe_every is None:
            return self._stale
        return min(self._stale, max(D.MIN_STALE_SECONDS,
                                    D.STALE_INTERVALS * self._observe_every))

    async def _publish(self, seen: Mapping[str, VoiceTask]) -> None:
        args: list[str] = []
        for task_id, task in seen.items():
            args += [task_id, dump_task(task)]
        await self._run("PUBLISH_OBSERVATIONS", self._k("obs", "obs_at", "tracked"),
                        [self._k("events")[0], D.STATE_TTL_SECONDS * 1000, *args])

    async def _free_ended(self, seen: Mapping[str, VoiceTask]) -> None:
        """Free the slots of every task this poll saw end, for all workers at once: the holder
        would free it only after reading the observations (a poll interval later), and the
        cap's turnover is what bounds a shared account's throughput."""
        args: list[str] = []
        for task_id, task in seen.items():
            if task.is_terminal and task.external_task_id:
                args += [task.external_task_id, task_id,
                         dump_entry(task_id, task.task_status.value)]
        if args:
            freed = await self._run("FREE_ENDED", self._k("slots", "orphans", "owners", "journal"),
                                    [self._k("events")[0], D.STATE_TTL_SECONDS * 1000, *args])
            if int(freed):
                self._wake()

    async def _read_observations(self, ids: Collection[str]) -> dict[str, VoiceTask]:
        seen: dict[str, VoiceTask] = {}
        async for task_id, raw in self._hmget(self._k("obs")[0], sorted(ids)):
            task = load_task(raw)
            if task is not None and task.task_id == task_id:
                seen[task_id] = task
        return seen

    # --- plain client calls -------------------------------------------------------------------

    async def before_request(self, *, create: bool) -> None:
        interval_ms = 0 if self._rate is None else max(1, round(1000 / self._rate))
        deadline = time.monotonic() + D.MAX_REQUEST_WAIT_SECONDS
        while True:
            wait_ms, reserved = await self._run(
                "RATE", self._k("rate", "backoff:all", "backoff:create"),
                [interval_ms, 1 if create else 0])
            wait = min(int(wait_ms) / 1000, max(0.0, deadline - time.monotonic()))
            if wait > 0:
                await asyncio.sleep(wait)
            if int(reserved) or time.monotonic() >= deadline:
                return

    async def rate_limited(self, code: int | None, retry_after: float | None) -> None:
        if code not in (1302, 1303):
            return
        if retry_after is not None and retry_after > 0:
            delay = min(retry_after, C.RETRY_AFTER_MAX)
        else:
            delay = C.RATE_LIMIT_MIN_DELAY * (1 + random.random() * D.BACKOFF_JITTER)
        keys = self._k("backoff:create", "slots", "orphans") if code == 1303 else \
            self._k("backoff:all")
        await self._run("BACKOFF", keys, [int(delay * 1000)])

    # --- inspection (tests, benchmarks, operators) ---------------------------------------------

    async def snapshot(self) -> dict[str, Any]:
        """What Redis holds for this account now: slots, orphans, cap, journal size, leader."""
        await self._ensure_started()
        slots, orphans, owners, journal, cap, leader = self._k(
            "slots", "orphans", "owners", "journal", "cap", "leader")
        async with self._guard(), self._redis.pipeline(transaction=False) as pipe:
            pipe.zrange(slots, 0, -1)
            pipe.zrange(orphans, 0, -1)
            pipe.hgetall(owners)
            pipe.hlen(journal)
            pipe.hgetall(cap)
            pipe.get(leader)
            s, o, own, n, c, lead = await pipe.execute()
        return {"slots": [_text(x) for x in s], "orphans": [_text(x) for x in o],
                "owners": {_text(k): _text(v) for k, v in own.items()},
                "journal": int(n), "cap": {_text(k): _text(v) for k, v in c.items()},
                "leader": None if lead is None else _text(lead)}
