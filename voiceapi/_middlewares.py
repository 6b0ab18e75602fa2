"""The SDK's own middleware chain around the one place that sends a request.

A middleware is ``async def mw(request, call_next) -> Response``. The chain, outermost first:
retry → [coordinator] → auth → user middlewares → logging → send. Auth sits inside retry so
each attempt carries a current token; ``send`` waits for the client's limits (:class:`Limits`)
first, so every attempt waits for a slot, and the attempt's timeout starts only after that.

We do not use aiohttp's native client middlewares: aioresponses patches
``ClientSession._request`` and would bypass them, leaving retry and limits untested.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs

from ._aio import within
from ._auth import Credentials
from ._constants import LOGGER_NAME
from ._errors import (
    APIError,
    APITimeoutError,
    RateLimitError,
    UnexpectedResponseError,
    VoiceAPIError,
)

if TYPE_CHECKING:
    from ._coordinator import Coordinator

logger = logging.getLogger(LOGGER_NAME)


@attrs.define(slots=True)
class Request:
    """One logical API call; ``attempt`` counts from 1 and is set by the retry middleware."""

    method: str
    path: str
    params: dict[str, str] | None = None
    json: dict[str, Any] | None = None
    headers: dict[str, str] = attrs.field(factory=dict, repr=False)  # holds Authorization
    #: False for creates: an ambiguous failure must be reconciled before resending.
    idempotent: bool = True
    #: Called before a resend that follows an attempt that may have landed. Non-idempotent
    #: calls find out whether it did (a Response if so); idempotent ones only take note.
    reconcile: Callable[[], Awaitable[Response | None]] | None = attrs.field(
        default=None, repr=False)
    #: False when the caller handles 1302/1303 itself (the batch scheduler learns from them).
    retry_rate_limits: bool = True
    attempt: int = 1
    #: time.monotonic() by which the whole call must end (retry_budget); ``send`` clips the
    #: attempt's timeout to it.
    deadline: float = math.inf


@attrs.define(slots=True)
class Response:
    status: int
    headers: Mapping[str, str] = attrs.field(repr=False)
    data: Any = attrs.field(repr=False)
    request_id: str | None = None


Handler = Callable[[Request], Awaitable[Response]]
Middleware = Callable[[Request, Handler], Awaitable[Response]]


def build_chain(middlewares: Sequence[Middleware], send: Handler) -> Handler:
    """Fold the middlewares (outermost first) around ``send``.

    Each layer is a plain callable returning the middleware's own coroutine (not a wrapper
    coroutine), so a layer costs a call, not an extra awaited frame, on every request.
    """
    handler = send
    for mw in reversed(middlewares):
        handler = _Layer(mw, handler)
    return handler


class _Layer:
    __slots__ = ("_call_next", "_mw")

    def __init__(self, mw: Middleware, call_next: Handler) -> None:
        self._mw, self._call_next = mw, call_next

    def __call__(self, request: Request) -> Awaitable[Response]:
        return self._mw(request, self._call_next)


async def wait_turn(request: Request, turn: Callable[[], Awaitable[None]],
                    waiting_for: str, release: Callable[[], object] | None = None) -> None:
    """``await turn()`` (a wait for a slot or a shared rate), but never past the call's
    deadline: ``retry_budget`` caps the whole call, time spent queued included.

    Running out is an APITimeoutError with ``maybe_sent=False``: the attempt never started.
    ``release``: gives back a turn that was taken just as the caller was cancelled (3.10).
    """
    left = request.deadline - time.monotonic()
    if left == math.inf:  # no retry middleware in this chain: nothing to cap
        await turn()
        return
    if left <= 0:
        raise _budget_spent(request, waiting_for)
    if sys.version_info >= (3, 11):
        scope = asyncio.timeout(left)
        try:
            async with scope:
                await turn()
        except TimeoutError:
            if not scope.expired():
                raise  # the wait itself failed (a coordinator's own error), not our limit
            raise _budget_spent(request, waiting_for) from None
    else:  # pragma: no cover - Python 3.10
        try:
            # Not wait_for: it can drop a cancel. The turn is a task of its own here: one it
            # takes while we are being cancelled is nobody's, so it goes back.
            await within(turn(), left,
                         undo=None if release is None else lambda _: release())
        except TimeoutError:
            raise _budget_spent(request, waiting_for) from None


def _budget_spent(request: Request, waiting_for: str) -> APITimeoutError:
    return APITimeoutError(f"{request.method} {request.path}: retry_budget used up while "
                           f"waiting for {waiting_for}", maybe_sent=False)


class AuthMiddleware:
    """Sets ``Authorization`` on every attempt (a retried call after 1004 gets a new token)."""

    def __init__(self, credentials: Credentials) -> None:
        self._credentials = credentials

    def __call__(self, request: Request, call_next: Handler) -> Awaitable[Response]:
        # A plain function returning the next coroutine: no extra frame on the hot path.
        request.headers["Authorization"] = self._credentials.authorization()
        return call_next(request)

    def __repr__(self) -> str:
        return "AuthMiddleware()"


class CoordinatorMiddleware:
    """Shares the account's request rate and 1302/1303 backoff with other workers.

    Sits inside the retry middleware, so every attempt waits its turn; and before auth, so the
    token is signed after that wait, not before it. Only in the chain when a coordinator is set.
    """

    def __init__(self, coordinator: Coordinator) -> None:
        self._coordinator = coordinator

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        # Only creates are non-idempotent; they also wait out a shared 1303 backoff.
        create = not request.idempotent
        await wait_turn(request, lambda: self._coordinator.before_request(create=create),
                        "the shared request rate (coordinator)")
        try:
            return await call_next(request)
        except RateLimitError as exc:
            await self._coordinator.rate_limited(exc.code, exc.retry_after)
            raise


class Limits:
    """The client's limits: requests in flight (the one place concurrency is capped) and
    requests per second (evenly paced, first come first served).

    Not a middleware: ``send`` enters and leaves them around the request itself, so the common
    case (a free slot, no pacing) costs a counter, not an extra coroutine per call. Both waits
    happen before the attempt's timeout starts, so a queued call never times out for having
    waited its turn (the call's ``retry_budget`` still caps the wait: :func:`wait_turn`).
    A cancelled waiter gives its turn back: nothing is reserved ahead of time, only the head
    of the pacing queue waits for the next free instant.
    """

    def __init__(self, *, max_concurrent: int, per_second: float | None) -> None:
        self._max = max_concurrent
        self._interval = 1.0 / per_second if per_second else 0.0
        self.reset()

    def reset(self) -> None:
        """Forget every loop-bound waiter (a fork child starts with the parent's state)."""
        self._active = 0
        self._slot_queue: collections.deque[asyncio.Future[None]] = collections.deque()
        self._pace_queue: collections.deque[asyncio.Future[None]] = collections.deque()
        self._next_free = 0.0  # monotonic instant the next request may start

    @property
    def active(self) -> int:
        return self._active

    def try_enter(self) -> bool:
        """Take a slot without waiting, when one is free and nobody is queued or paced."""
        if self._active < self._max and not self._slot_queue and not self._interval:
            self._active += 1
            return True
        return False

    async def enter(self) -> None:
        """Wait for a slot (FIFO), then for the pace; pair with :meth:`leave`."""
        if self._active < self._max and not self._slot_queue:
            self._active += 1
        else:
            turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._slot_queue.append(turn)
            try:
                await turn  # leave() hands its slot over to the head of the queue
            except BaseException:
                if turn.done() and not turn.cancelled():
                    self.leave()  # handed a slot while being cancelled: pass it on
                elif turn in self._slot_queue:  # leave() may have dropped it, already cancelled
                    self._slot_queue.remove(turn)
                raise
        if self._interval:
            try:
                await self._pace()
            except BaseException:
                self.leave()
                raise

    def leave(self) -> None:
        while self._slot_queue:
            turn = self._slot_queue.popleft()
            if not turn.done():
                turn.set_result(None)  # the slot changes hands; the count stays
                return
        self._active -= 1

    async def _pace(self) -> None:
        now = time.monotonic()
        if not self._pace_queue and now >= self._next_free:
            self._next_free = now + self._interval
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pace_queue.append(turn)
        try:
            if self._pace_queue[0] is not turn:
                await turn  # woken when it reaches the head of the queue
            delay = self._next_free - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            self._next_free = max(time.monotonic(), self._next_free) + self._interval
        finally:
            head = self._pace_queue[0] is turn
            self._pace_queue.remove(turn)
            if head and self._pace_queue and not self._pace_queue[0].done():
                self._pace_queue[0].set_result(None)


def logging_middleware(request: Request, call_next: Handler) -> Awaitable[Response]:
    """One line per attempt: method, path, status, code, request_id, attempt, time.

    Never logs headers or bodies: they may carry the token or user data. Costs one check
    per attempt while the ``voiceapi`` logger is quiet.
    """
    if not logger.isEnabledFor(logging.INFO):
        return call_next(request)
    return _logged(request, call_next)


async def _logged(request: Request, call_next: Handler) -> Response:
    start = time.monotonic()
    try:
        response = await call_next(request)
    except VoiceAPIError as exc:
        ms = (time.monotonic() - start) * 1000
        if isinstance(exc, APIError):
            status, code, rid = exc.http_status, exc.code, exc.request_id
        elif isinstance(exc, UnexpectedResponseError):
            status, code, rid = exc.http_status, None, exc.request_id
        else:
            status, code, rid = None, None, None
        logger.info("%s %s -> %s code=%s request_id=%s attempt=%d %.0fms error=%s",
                    request.method, request.path, status, code, rid, request.attempt, ms,
                    type(exc).__name__)
        raise
    logger.info("%s %s -> %s code=0 request_id=%s attempt=%d %.0fms", request.method,
                 request.path, response.status, response.request_id, request.attempt,
                 (time.monotonic() - start) * 1000)
    return response
