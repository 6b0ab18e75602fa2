"""One answer to "did this create land?", shared by ``create()`` and the batch scheduler.

A create is the one call that costs money, and its outcome can be unknown (the answer was lost,
late, truncated or a 5xx). The rules, in one place:

* after an ambiguous outcome, look the task up by its ``external_task_id``;
* resend only after a lookup that *answered* "not found" (``is_not_found``); any other lookup
  failure is retried with backoff and never leads to a resend;
* a resend refused with "External_task_id <x> already exists" for an id that is ours (generated,
  or already sent in this call) means the first attempt landed: look it up and return it;
* only an id the caller chose and that this call never sent is a real conflict:
  ``ConflictError`` carrying the existing task id when the lookup finds it.

The transport's retry middleware already reconciles between its own attempts (through the
``reconcile`` hook below); this module continues where the transport gives up.
"""

from __future__ import annotations

import asyncio
import inspect
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol, TypeVar

import attrs

from . import _constants as C
from . import _validation as V
from ._aio import within
from ._decode import is_duplicate_external_id, is_not_found, parse_task
from ._errors import (
    AccountError,
    APIConnectionError,
    APITimeoutError,
    AuthenticationError,
    ClientClosedError,
    ConflictError,
    EventLoopError,
    InvalidRequestError,
    PermissionDeniedError,
    ServerError,
    UnexpectedResponseError,
    ValidationError,
    VoiceAPIError,
    printable,
)
from ._middlewares import Response
from ._models import TaskStatus, VoiceTask

T = TypeVar("T")


def new_external_task_id() -> str:
    """A fresh idempotency key, minted once per logical create (never per attempt)."""
    return f"voiceapi-{uuid.uuid4().hex}"


def build_create_body(
    *, voice_name: Any, voice_url: Any = None, video_id: Any = None, callback_url: Any = None,
    external_task_id: Any = None,
) -> dict[str, str]:
    """Validate create() arguments and build the JSON body (absent fields are left out)."""
    body = {"voice_name": V.voice_name(voice_name)}
    url = None if voice_url in (None, "") else V.voice_url(voice_url)
    vid = V.video_id(video_id)
    if (url is None) == (vid is None):
        raise ValidationError("give exactly one of voice_url or video_id")
    if url is not None:
        body["voice_url"] = url
    if vid is not None:
        body["video_id"] = vid
    cb = V.callback_url(callback_url)
    if cb is not None:
        body["callback_url"] = cb
    ext = V.optional_identifier(external_task_id, "external_task_id")
    body["external_task_id"] = ext if ext is not None else new_external_task_id()
    return body


def task_path(task_ref: str) -> str:
    return f"{C.PATH_CUSTOM_VOICES}/{V.path_segment(task_ref)}"


class Requester(Protocol):
    """The slice of the transport a create needs (``Transport.request``)."""

    def request(
        self, method: str, path: str, *, params: dict[str, str] | None = None,
        json_body: dict[str, Any] | None = None, idempotent: bool = True,
        reconcile: Callable[[], Awaitable[Response | None]] | None = None,
        retry_rate_limits: bool = True,
    ) -> Awaitable[Response]: ...


#: Lookup failures that waiting cannot cure: retrying them only delays the answer.
INCURABLE = (AuthenticationError, PermissionDeniedError, AccountError, ClientClosedError,
              EventLoopError)


def _ambiguous(exc: VoiceAPIError) -> bool:
    """The create may have landed: the answer was lost, unreadable or a server error."""
    if isinstance(exc, APIConnectionError):
        return exc.maybe_sent
    return isinstance(exc, (ServerError, UnexpectedResponseError))


@attrs.frozen
class Created:
    """A create's outcome: the task, and whether it existed before this call."""

    task: VoiceTask
    existed: bool


class CreateFlow:
    """Creates one task and never creates it twice. Built by the resource over its transport."""

    def __init__(self, requester: Requester, *, lookup_delay: float = C.RETRY_INITIAL_DELAY,
                 max_lookup_delay: float = C.RETRY_MAX_DELAY,
                 lookup_tries: int = C.CREATE_LOOKUP_TRIES,
                 max_resends: int = C.CREATE_MAX_RESENDS,
                 budget: float = C.DEFAULT_RETRY_BUDGET) -> None:
        self._requester = requester
        self._lookup_delay = lookup_delay
        self._max_lookup_delay = max_lookup_delay
        self._lookup_tries = lookup_tries
        self._max_resends = max_resends
        #: One create, lookups and resends included, never takes longer than this.
        self._budget = budget

    async def lookup_response(self, ext: str) -> Response | None:
        """The task under ``ext`` as the raw answer, or None only when the server answered
        "not found" (any other failure raises, an answer about another task included)."""
        try:
            response = await self._requester.request("GET", task_path(ext))
        except InvalidRequestError as exc:
            if is_not_found(exc):
                return None
            raise
        task_about(response, ext)
        return response

    async def lookup(self, ext: str) -> VoiceTask | None:
        """The task under ``ext``, or None only when the server answered "not found"."""
        response = await self.lookup_response(ext)
        if response is None:
            return None
        return parse_task(response.data, request_id=response.request_id)

    async def find(self, ext: str, deadline: float | None = None) -> VoiceTask | None:
        """``lookup`` until it answers: failures other than "not found" are retried with
        backoff (a failed lookup is never read as "not found"); the last failure is raised.
        Never past ``deadline`` (default: the retry budget from now)."""
        if deadline is None:
            deadline = time.monotonic() + self._budget
        delay = self._lookup_delay
        for attempt in range(1, self._lookup_tries + 1):
            try:
                return await _before(deadline, self.lookup(ext), ext)
            except INCURABLE:
                raise
            except VoiceAPIError:
                if attempt == self._lookup_tries or time.monotonic() + delay >= deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, self._max_lookup_delay)
        raise AssertionError("unreachable")  # pragma: no cover

    async def create(self, body: dict[str, str], *, caller_id: bool,
                     retry_rate_limits: bool = True) -> VoiceTask:
        """Send ``body`` (validated, with its ``external_task_id``) and return the one task.

        ``caller_id``: the external id was chosen by the caller (a duplicate-id refusal before
        anything of ours could have landed is then a ConflictError). Rate limits (1302/1303)
        are raised when ``retry_rate_limits`` is False; nothing was created then.
        """
        created = await self.create_outcome(body, caller_id=caller_id,
                                            retry_rate_limits=retry_rate_limits)
        return created.task

    async def create_outcome(self, body: dict[str, str], *, caller_id: bool,
                             retry_rate_limits: bool = True) -> Created:
        """``create``, also telling whether the task existed before this call (its id was
        refused as already used before anything of this call could have landed)."""
        ext = body["external_task_id"]
        deadline = time.monotonic() + self._budget  # the whole create, lookups included
        sent = False  # a POST of this call may have reached the server
        lookup_failures: list[VoiceAPIError] = []  # lookups the transport gave up on

        async def reconcile() -> Response | None:
            nonlocal sent
            sent = True
            try:
                return await _before(deadline, self.lookup_response(ext), ext)
            except VoiceAPIError as exc:
                lookup_failures.append(exc)
                raise

        resends = 0
        while True:
            try:
                response = await _before(deadline, self._requester.request(
                    "POST", C.PATH_CUSTOM_VOICES, json_body=body, idempotent=False,
                    reconcile=reconcile, retry_rate_limits=retry_rate_limits), ext)
                return Created(_created_task(response, ext), existed=False)
            except VoiceAPIError as exc:
                if lookup_failures and exc is lookup_failures[-1]:
                    # The transport's reconciling lookup failed for good: the outcome is
                    # unknown. Keep looking up (a failed lookup is never a "not found").
                    lookup_failures.clear()
                    found = await self._find_or_unknown(ext, exc, exc, deadline)
                elif isinstance(exc, InvalidRequestError) and is_duplicate_external_id(exc):
                    if caller_id and not sent:
                        raise await self._conflict(ext, exc) from None
                    existed = not sent
                    found = await self.find(ext, deadline)
                    if found is None:  # refused as existing, yet not found: never loop
                        raise
                    return Created(found, existed=existed)
                elif _ambiguous(exc):
                    sent = True
                    found = await self._find_or_unknown(ext, exc, None, deadline)
                else:
                    raise
                if found is not None:
                    return Created(found, existed=False)
                # The lookup answered "not found": nothing landed, so sending again is safe.
                resends += 1
                if resends > self._max_resends:
                    raise

    async def _find_or_unknown(self, ext: str, cause: VoiceAPIError,
                               lookup_error: VoiceAPIError | None,
                               deadline: float) -> VoiceTask | None:
        """``find``; when it fails too, raise the create's error (or, when the transport hid
        it behind its own failed lookup, an APIConnectionError saying the outcome is unknown)."""
        try:
            return await self.find(ext, deadline)
        except VoiceAPIError as exc:
            if lookup_error is None:
                raise cause from exc
            raise _unknown(ext, exc) from None

    async def _conflict(self, ext: str, exc: InvalidRequestError) -> ConflictError:
        existing: str | None = None
        try:
            task = await self.lookup(ext)
            existing = task.task_id if task is not None else None
        except VoiceAPIError:
            pass  # the conflict stands; only the id of the other task is unknown
        return ConflictError(
            f"external_task_id {ext!r} is already used by another task"
            + (f" ({existing})" if existing else "") + f": {exc.message}",
            existing_task_id=existing, code=exc.code, http_status=exc.http_status,
            request_id=exc.request_id)


async def _before(deadline: float, call: Awaitable[T], ext: str) -> T:
    """``await call``, but not past ``deadline`` (the create's retry budget): then an
    APITimeoutError, which the create flow treats as an unknown outcome."""
    remaining = deadline - time.monotonic()
    try:
        if remaining <= 0:
            raise TimeoutError
        return await within(call, remaining)
    except (asyncio.TimeoutError, TimeoutError):
        if inspect.iscoroutine(call):
            call.close()  # never started when the budget was already spent
        raise APITimeoutError(f"the create of {ext!r} ran out of its retry budget") from None


def task_about(response: Response, ref: str) -> VoiceTask:
    """The task in the answer to a lookup of ``ref`` (a task id or an external id, the path
    takes either), refused when it is about another task: neither its ``task_id`` nor its
    ``external_task_id`` is ``ref``. A caching proxy or a misrouted answer must never make
    a create adopt, or a caller act on, a task it did not ask for. An answer without an
    external id cannot be contradicted by it (a server may leave it out)."""
    task = parse_task(response.data, request_id=response.request_id)
    if task.task_id != ref and task.external_task_id not in (None, "", ref):
        raise UnexpectedResponseError(
            f"asked for task {printable(ref, 200)!r}, the answer is about another one (task_id "
            f"{printable(task.task_id, 200)!r}, external_task_id "
            f"{printable(task.external_task_id or '', 200)!r}): a proxy or cache in front of "
            "the API may be answering for it", http_status=response.status,
            request_id=response.request_id)
    return task


def _unknown(ext: str, lookup_error: VoiceAPIError) -> APIConnectionError:
    return APIConnectionError(
        f"the create's answer was lost and looking it up by external_task_id {ext!r} failed "
        f"({lookup_error}); it may exist: look it up before creating it again")


def _created_task(response: Response, ext: str) -> VoiceTask:
    data = response.data
    if not isinstance(data, Mapping):
        raise UnexpectedResponseError("create answered without a task object",
                                      http_status=response.status,
                                      request_id=response.request_id)
    raw = dict(data)
    raw.setdefault("task_status", TaskStatus.SUBMITTED.value)
    info = raw.get("task_info")
    if not isinstance(info, Mapping) or not info.get("external_task_id"):
        raw["task_info"] = {"external_task_id": ext}
    elif str(info["external_task_id"]) != ext:  # an id sent back as a number still matches
        # Like task_about: a misrouted or cached answer is never adopted. Unreadable is an
        # unknown outcome, so the create flow looks its own external id up instead.
        raise UnexpectedResponseError(
            f"the create of {printable(ext, 200)!r} was answered about another task "
            f"(external_task_id {printable(str(info['external_task_id']), 200)!r}): a proxy "
            "or cache in front of the API may be answering for it",
            http_status=response.status, request_id=response.request_id)
    return parse_task(raw, request_id=response.request_id)


__all__ = ["INCURABLE", "CreateFlow", "Created", "build_create_body", "new_external_task_id",
           "task_about", "task_path"]
