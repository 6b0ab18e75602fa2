"""The retry policy as pure functions, and the retry middleware that applies it with tenacity.

Policy (DESIGN.md): connection errors, timeouts, 1302/1303, 5000–5002 and proxy 502/503/504 are
retried with exponential backoff and full jitter, honouring Retry-After. Other 4xx never are.
A 1004 (or 1003) re-signs the JWT, on the server's clock from its Date header, and
retries once. A request that is not idempotent (a create) is resent
after an ambiguous failure only once its ``reconcile`` hook has confirmed it did not land.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import attrs
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception

from . import _constants as C
from ._errors import (
    APIConnectionError,
    AuthenticationError,
    RateLimitError,
    ServerError,
    UnexpectedResponseError,
    VoiceAPIError,
)

if TYPE_CHECKING:
    from ._auth import Credentials
    from ._middlewares import Handler, Request, Response

RETRYABLE_SERVER_CODES = frozenset({5000, 5001, 5002})
RETRYABLE_PROXY_STATUSES = frozenset({502, 503, 504})
RATE_LIMIT_CODES = frozenset({1302, 1303})
# 1003 (not yet valid) and 1004 (expired): re-sign, on the server's clock when it told us.
TOKEN_TIME_CODES = frozenset({1003, 1004})


@attrs.frozen
class RetryPolicy:
    """Backoff knobs. The defaults suit the real API; tests shrink them."""

    initial_delay: float = C.RETRY_INITIAL_DELAY
    max_delay: float = C.RETRY_MAX_DELAY
    rate_limit_min_delay: float = C.RATE_LIMIT_MIN_DELAY
    retry_after_max: float = C.RETRY_AFTER_MAX


@attrs.frozen
class Decision:
    retry: bool
    #: The request may have been applied by the server (only matters for non-idempotent ones).
    ambiguous: bool = False
    #: Re-sign the credential first (1004).
    reauth: bool = False
    #: The smallest delay before the next attempt.
    min_delay: float = 0.0


NO_RETRY = Decision(retry=False)


def classify(exc: BaseException, policy: RetryPolicy = RetryPolicy()) -> Decision:
    """What a failed attempt means for the next one. Business code first, then HTTP status."""
    if isinstance(exc, RateLimitError):
        # 1302/1303 (and a bare 429) are refused before anything is queued: safe to resend.
        floor = policy.rate_limit_min_delay if exc.code == 1303 else 0.0
        return Decision(retry=True, min_delay=floor)
    if isinstance(exc, AuthenticationError):
        return Decision(retry=True, reauth=True) if exc.code in TOKEN_TIME_CODES else NO_RETRY
    if isinstance(exc, ServerError):
        if exc.code in RETRYABLE_SERVER_CODES or (
            exc.code is None and exc.http_status in RETRYABLE_PROXY_STATUSES
        ):
            return Decision(retry=True, ambiguous=True)
        return NO_RETRY
    if isinstance(exc, APIConnectionError):  # includes APITimeoutError
        return Decision(retry=True, ambiguous=exc.maybe_sent)
    if isinstance(exc, UnexpectedResponseError):
        # A 2xx we could not read (truncated by a proxy, garbage): the call probably landed.
        return Decision(retry=True, ambiguous=True)
    return NO_RETRY


def backoff_delay(
    retry_number: int, policy: RetryPolicy, rng: Callable[[float, float], float] = random.uniform
) -> float:
    """Exponential backoff with full jitter: uniform(0, min(max, initial·2^(n−1)))."""
    ceiling = min(policy.max_delay, policy.initial_delay * (2 ** max(retry_number - 1, 0)))
    return rng(0.0, ceiling)


def next_delay(
    exc: BaseException, retry_number: int, policy: RetryPolicy,
    rng: Callable[[float, float], float] = random.uniform,
) -> float:
    decision = classify(exc, policy)
    if decision.reauth:
        return 0.0
    advised = getattr(exc, "retry_after", None)
    if isinstance(advised, (int, float)) and math.isfinite(advised):
        return max(float(advised), decision.min_delay)
    return max(backoff_delay(retry_number, policy, rng), decision.min_delay)


@attrs.define
class _CallState:
    reauthed: bool = False
    needs_reconcile: bool = False


class RetryMiddleware:
    """Outermost middleware: one logical call, several attempts, one time budget."""

    def __init__(
        self, *, max_retries: int, budget: float, policy: RetryPolicy, credentials: Credentials,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._max_retries = max_retries
        self._budget = budget
        self._policy = policy
        self._credentials = credentials
        self._sleep = sleep

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        # Fast path: most calls succeed first time, and building a tenacity loop per call
        # costs more CPU than the rest of the SDK's work on a request.
        request.attempt = 1
        started = time.monotonic()
        try:
            return await call_next(request)
        except VoiceAPIError as exc:
            return await self._retry(request, call_next, exc, started)

    async def _retry(self, request: Request, call_next: Handler,
                     first_error: VoiceAPIError, started: float) -> Response:
        """Attempts 2..n under tenacity; attempt 1 (already made) is replayed as its error."""
        state = _CallState()
        policy, max_retries, budget = self._policy, self._max_retries, self._budget

        def should_retry(exc: BaseException) -> bool:
            decision = classify(exc, policy)
            if not decision.retry:
                return False
            if isinstance(exc, RateLimitError) and not request.retry_rate_limits:
                return False
            if decision.reauth:
                if state.reauthed:
                    return False
                state.reauthed = self._credentials.invalidate(
                    request.headers.get("Authorization", ""),
                    getattr(exc, "server_time", None))
                return state.reauthed
            if decision.ambiguous and not request.idempotent:
                if request.reconcile is None:
                    return False
                state.needs_reconcile = True
            return True

        def wait(rs: RetryCallState) -> float:
            exc = rs.outcome.exception() if rs.outcome is not None else None
            return next_delay(exc, rs.attempt_number, policy) if exc is not None else 0.0

        def stop(rs: RetryCallState) -> bool:
            retries_used = rs.attempt_number - (1 if state.reauthed else 0)
            if retries_used > max_retries:
                return True
            # The budget covers the whole call, the first attempt included.
            return time.monotonic() - started + (rs.upcoming_sleep or 0.0) > budget

        retrying = AsyncRetrying(
            retry=retry_if_exception(should_retry), wait=wait, stop=stop, reraise=True,
            sleep=self._sleep)
        async for attempt in retrying:
            with attempt:
                request.attempt = attempt.retry_state.attempt_number
                if request.attempt == 1:
                    raise first_error
                if state.needs_reconcile and request.reconcile is not None:
                    found = await request.reconcile()
                    state.needs_reconcile = False
                    if found is not None:
                        return found
                return await call_next(request)
        raise AssertionError("unreachable: tenacity either returns or raises")  # pragma: no cover
