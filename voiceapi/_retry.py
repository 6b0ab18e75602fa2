"""The retry policy as pure functions, and the retry middleware that applies it with tenacity
(imported only when a call needs a second attempt).

Policy (DESIGN.md): connection errors, timeouts, 1302/1303, 5000–5002 and proxy 502/503/504 are
retried with exponential backoff and full jitter, honouring Retry-After. Other 4xx never are.
A 1004 (or 1003) re-signs the JWT, on the server's clock from its Date header, and
retries once. A request that is not idempotent (a create) is resent
after an ambiguous failure only once its ``reconcile`` hook has confirmed it did not land.
"""

from __future__ import annotations

import math
import numbers
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs

from . import _constants as C
from ._errors import (
    APIConnectionError,
    AuthenticationError,
    RateLimitError,
    ServerError,
    UnexpectedResponseError,
    ValidationError,
    VoiceAPIError,
    drop_foreign_context,
)

if TYPE_CHECKING:
    from ._auth import Credentials
    from ._middlewares import Handler, Request, Response

RETRYABLE_SERVER_CODES = frozenset({5000, 5001, 5002})
RETRYABLE_PROXY_STATUSES = frozenset({502, 503, 504})
RATE_LIMIT_CODES = frozenset({1302, 1303})
# 1003 (not yet valid) and 1004 (expired): re-sign, on the server's clock when it told us.
TOKEN_TIME_CODES = frozenset({1003, 1004})


def _seconds(*, finite: bool) -> Callable[[object, attrs.Attribute[float], object], None]:
    """A validator: a number of seconds >= 0 (``finite=False`` also takes inf, "no cap")."""
    def check(_: object, attribute: attrs.Attribute[float], value: object) -> None:
        name = f"RetryPolicy.{attribute.name}"
        # Checked here: used only once a call fails, a "0.5" or a NaN would otherwise surface
        # as a bare TypeError, or as no retries at all, in the middle of an outage.
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValidationError(f"{name} must be a number of seconds, got "
                                  f"{type(value).__name__}")
        if math.isnan(value) or value < 0 or (finite and math.isinf(value)):
            raise ValidationError(f"{name} must be a {'finite ' if finite else ''}number of "
                                  f"seconds >= 0, got {value!r}")
    return check


@attrs.frozen
class RetryPolicy:
    """Backoff knobs. The defaults suit the real API; tests shrink them.

    Every knob is a number of seconds >= 0 (a ValidationError otherwise); ``max_delay`` and
    ``retry_after_max`` may be ``math.inf`` (no cap).
    """

    initial_delay: float = attrs.field(default=C.RETRY_INITIAL_DELAY,
                                       validator=_seconds(finite=True))
    max_delay: float = attrs.field(default=C.RETRY_MAX_DELAY, validator=_seconds(finite=False))
    rate_limit_min_delay: float = attrs.field(default=C.RATE_LIMIT_MIN_DELAY,
                                              validator=_seconds(finite=True))
    retry_after_max: float = attrs.field(default=C.RETRY_AFTER_MAX,
                                         validator=_seconds(finite=False))


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
        if exc.http_status is not None and 400 <= exc.http_status < 500:
            return NO_RETRY  # a proxy refused us (407): the same request cannot fare better
        return Decision(retry=True, ambiguous=exc.maybe_sent)
    if isinstance(exc, UnexpectedResponseError):
        # A 2xx we could not read (truncated by a proxy, garbage): the call probably landed.
        return Decision(retry=True, ambiguous=True)
    return NO_RETRY


def backoff_delay(
    retry_number: int, policy: RetryPolicy, rng: Callable[[float, float], float] = random.uniform
) -> float:
    """Exponential backoff with full jitter: uniform(0, min(max, initial·2^(n−1)))."""
    # The exponent is capped: 2**1024 no longer fits a float (OverflowError), and a cap of
    # 2**1000 times any delay is past every max_delay anyway (max_retries may be large).
    growth = 2.0 ** min(max(retry_number - 1, 0), 1000)
    ceiling = min(policy.max_delay, policy.initial_delay * growth)
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


@attrs.frozen
class Step:
    """What to do after a failed attempt (see :func:`decide`)."""

    retry: bool
    #: Seconds to wait before the next attempt.
    delay: float = 0.0
    #: Re-sign the token first (1003/1004); this attempt does not count against max_retries.
    resign: bool = False
    #: Look the call up first (an ambiguous create): if it landed, that is the answer.
    reconcile: bool = False


GIVE_UP = Step(retry=False)


def decide(
    exc: BaseException, *, idempotent: bool, can_reconcile: bool, retry_rate_limits: bool,
    retries_used: int, max_retries: int, resigned: bool, time_left: float, policy: RetryPolicy,
    rng: Callable[[float, float], float] = random.uniform,
) -> Step:
    """The whole retry policy for one failed attempt, as a pure function.

    ``retries_used`` counts the retries already made (re-signs excluded); ``time_left`` is
    what remains of the call's ``retry_budget``: a wait that would not leave it is not made.
    """
    decision = classify(exc, policy)
    if not decision.retry:
        return GIVE_UP
    if isinstance(exc, RateLimitError) and not retry_rate_limits:
        return GIVE_UP  # the caller (the batch scheduler) learns from 1302/1303 itself
    if decision.reauth:
        # Once per call: a second time refusal means the clock or key is wrong, not stale.
        return GIVE_UP if resigned else Step(retry=True, resign=True)
    if retries_used >= max_retries:
        return GIVE_UP
    if decision.ambiguous and not idempotent and not can_reconcile:
        return GIVE_UP  # a create that may have landed is never resent blind
    # A create is looked up first; an idempotent call with a hook (a delete) only hears that
    # its resend follows an attempt that may have landed: an "already done" refusal of the
    # resend is then that attempt's success.
    reconcile = decision.ambiguous and can_reconcile
    delay = next_delay(exc, retries_used + 1, policy, rng)
    if delay >= time_left:
        return GIVE_UP
    return Step(retry=True, delay=delay, reconcile=reconcile)


class RetryMiddleware:
    """Outermost middleware: one logical call, several attempts, one time budget."""

    def __init__(
        self, *, max_retries: int, budget: float, policy: RetryPolicy, credentials: Credentials,
    ) -> None:
        self._max_retries = max_retries
        self._budget = budget
        self._policy = policy
        self._credentials = credentials

    async def __call__(self, request: Request, call_next: Handler) -> Response:
        # The budget covers the whole call, the first attempt included: ``send`` clips each
        # attempt's timeout to the deadline, so a call never runs past it.
        request.deadline = time.monotonic() + self._budget
        request.attempt = 1
        try:
            # Most calls succeed first time; only a call that retries pays for the retry
            # machinery (a not-found lookup, a refused create and the like raise at once).
            return await call_next(request)
        except VoiceAPIError as exc:
            if not classify(exc, self._policy).retry:
                drop_foreign_context(exc)  # what leaves the chain never drags aiohttp along
                raise
            first_error = exc
        try:
            return await self._retry(request, call_next, first_error)
        except VoiceAPIError as exc:
            drop_foreign_context(exc)
            raise

    async def _retry(self, request: Request, call_next: Handler,
                     first_error: VoiceAPIError) -> Response:
        """Attempts 2..n of one call, top to bottom:

        1. the failed attempt is judged by :func:`decide` (pure): give up, or retry after a
           delay, maybe re-signing the token (1003/1004) or reconciling first (a create);
        2. tenacity sleeps the delay and replays the loop;
        3. a re-sign drops the refused token (the server's clock, if it told us, is used for
           the next one);
        4. a reconcile looks the call up; if it landed, its answer is the call's answer; if
           the lookup itself fails (its own retries spent), we give up with its error: it is
           no attempt of this call, and a 1302 or 1004 there must never read as "the create
           was refused, resend it" (the caller keeps looking up: ``_create``);
        5. the next attempt is sent; its failure goes back to 1.

        Giving up re-raises the last attempt's error.
        """
        from tenacity import AsyncRetrying, RetryCallState  # only calls that retry import it

        steps: list[Step] = []  # steps[-1]: the plan for the next attempt
        failures: list[BaseException] = [first_error]  # failures[-1]: the latest
        retries_used = 0
        resigned = False
        looking_up = False  # True while the reconcile hook runs: a failure then is its own

        def judge(state: RetryCallState) -> bool:
            exc = state.outcome.exception() if state.outcome is not None else None
            if exc is None:
                return False
            failures.append(exc)
            if looking_up:
                return False  # whether the call landed is unknown: never resend it blind
            step = decide(exc, idempotent=request.idempotent,
                          can_reconcile=request.reconcile is not None,
                          retry_rate_limits=request.retry_rate_limits,
                          retries_used=retries_used, max_retries=self._max_retries,
                          resigned=resigned, time_left=request.deadline - time.monotonic(),
                          policy=self._policy)
            steps.append(step)
            return step.retry

        retrying = AsyncRetrying(retry=judge, wait=lambda _: steps[-1].delay, reraise=True)
        async for attempt in retrying:
            with attempt:
                if not steps:
                    raise first_error  # tenacity's first attempt replays the one already made
                step = steps[-1]
                if step.resign:
                    resigned = True
                    if not self._credentials.invalidate(
                            request.headers.get("Authorization", ""),
                            getattr(failures[-1], "server_time", None)):
                        raise failures[-1]  # a static API key cannot be re-signed
                else:
                    retries_used += 1
                if step.reconcile and request.reconcile is not None:
                    looking_up = True
                    found = await request.reconcile()
                    looking_up = False
                    if found is not None:
                        return found
                request.attempt += 1
                return await call_next(request)
        raise AssertionError("unreachable: tenacity either returns or raises")  # pragma: no cover
