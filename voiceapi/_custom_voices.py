"""Custom voices: create (an asynchronous task), get, list, iterate, delete, wait."""

from __future__ import annotations

import asyncio
import builtins
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from . import _validation as V
from ._aio import within
from ._constants import (
    DEFAULT_ITER_PAGE_SIZE,
    DEFAULT_PAGE_SIZE,
    DEFAULT_POLL_INTERVAL,
    DEFAULT_WAIT_TIMEOUT,
    PATH_CUSTOM_VOICES,
    PATH_DELETE_VOICES,
    POLL_BACKOFF_FACTOR,
    POLL_INTERVAL_MAX,
)
from ._create import (
    Created,
    CreateFlow,
    build_create_body,
    new_external_task_id,
    task_about,
    task_path,
)
from ._decode import is_already_deleted, parse_task_list
from ._errors import (
    InvalidRequestError,
    SentCredential,
    TaskFailedError,
    ValidationError,
    WaitTimeoutError,
)
from ._models import BatchResult, TaskStatus, VoiceTask
from ._pages import PageLimit, records_of, walk_pages

if TYPE_CHECKING:
    from ._batch_models import BatchItem, ProgressCallback
    from ._coordinator import Coordinator
    from ._transport import Transport
    from ._webhooks import CallbackServer

# Kept importable from here: older code imports them from this module.
__all__ = ["AsyncCustomVoices", "build_create_body", "new_external_task_id"]


class _BatchApi:
    """What the batch scheduler may do with this resource: a narrow protocol, so the scheduler
    never reaches into the resource's or the transport's private attributes."""

    def __init__(self, resource: AsyncCustomVoices) -> None:
        self._resource = resource
        transport = resource._transport
        self.rate_limit_delay = transport.retry_policy.rate_limit_min_delay
        self.coordinator: Coordinator | None = getattr(transport, "coordinator", None)
        self.page_limit = resource._page_limit

    async def create(self, body: dict[str, str]) -> Created:
        """The shared create flow, with 1302/1303 raised (the scheduler learns from them)."""
        return await self._resource._flow.create_outcome(body, caller_id=False,
                                                         retry_rate_limits=False)

    async def lookup(self, external_task_id: str) -> VoiceTask | None:
        """By external id, failures retried with backoff; None only for an answered
        not-found."""
        return await self._resource._flow.find(external_task_id)

    async def get(self, task_id: str) -> VoiceTask:
        return await self._resource.get(task_id)

    async def list_page(self, page_num: int, page_size: int) -> builtins.list[Any]:
        return await self._resource._list_raw(page_num, page_size)

    def credential_mask(self) -> SentCredential:
        return self._resource._transport.credential_mask()


class AsyncCustomVoices:
    """``client.custom_voices``: the voices you clone, and their creation tasks."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport
        policy = transport.retry_policy
        self._flow = CreateFlow(transport, lookup_delay=policy.initial_delay,
                                max_lookup_delay=policy.max_delay,
                                budget=transport.config.retry_budget)
        # The page size this server accepts, learned once for this client.
        self._page_limit = PageLimit()

    async def create(
        self,
        *,
        voice_name: str,
        voice_url: str | None = None,
        video_id: str | None = None,
        callback_url: str | None = None,
        external_task_id: str | None = None,
    ) -> VoiceTask:
        """Start cloning a voice from a 5–30 s sample (a URL, or a Kling ``video_id``).

        Returns the task (usually ``submitted``); follow it with :meth:`wait`. The call carries
        an ``external_task_id`` (yours, or a generated one). After an ambiguous failure the SDK
        looks the task up by it and resends only when the server answered "not found", so a
        retry never creates (and bills) a second voice; a task that landed is returned, never
        raised. Raises ConflictError only when *your* ``external_task_id`` already belongs to
        another task (``existing_task_id`` names it).
        """
        body = build_create_body(voice_name=voice_name, voice_url=voice_url, video_id=video_id,
                                 callback_url=callback_url, external_task_id=external_task_id)
        return await self._flow.create(body, caller_id=external_task_id not in (None, ""))

    async def get(
        self, task_id: str | None = None, *, external_task_id: str | None = None
    ) -> VoiceTask:
        """One task, by Kling's ``task_id`` or by the ``external_task_id`` you chose."""
        if (task_id is None) == (external_task_id is None):
            raise ValidationError("give exactly one of task_id or external_task_id")
        ref = V.identifier(task_id if task_id is not None else external_task_id,
                           "task_id" if task_id is not None else "external_task_id")
        response = await self._transport.request("GET", task_path(ref))
        return task_about(response, ref)

    async def list(
        self, *, page_num: int = 1, page_size: int = DEFAULT_PAGE_SIZE
    ) -> builtins.list[VoiceTask]:
        """One page of your voice-creation tasks (each holds its voice once it succeeded).

        ``page_size`` is sent as given (1–1000); a server that allows less refuses it.
        """
        params = V.page_params(page_num, page_size)
        response = await self._transport.request("GET", PATH_CUSTOM_VOICES, params=params)
        return parse_task_list(response.data, request_id=response.request_id)

    async def _list_raw(self, page_num: int, page_size: int) -> builtins.list[Any]:
        """One page as raw records (the batch tracker parses only the ones it follows)."""
        response = await self._transport.request(
            "GET", PATH_CUSTOM_VOICES, params=V.page_params(page_num, page_size))
        return records_of(response.data, response.request_id)

    async def iter_all(
        self, *, page_size: int = DEFAULT_ITER_PAGE_SIZE
    ) -> AsyncIterator[VoiceTask]:
        """Every task, page after page, until a short or empty page; each task once.

        A page size the server refuses steps down (1000 → 500 → 100), remembered per client.
        """
        V.page(page_size, "page_size")
        seen: set[str] = set()
        # aclosing: an iteration closed early closes the page walker with it, on the spot;
        # left to the garbage collector, its close could be scheduled on a loop that a
        # VoiceClient.close() is stopping, and be reported destroyed while pending.
        async with aclosing(walk_pages(self._list_raw, page_size=page_size,
                                       limit=self._page_limit)) as pages:
            async for records in pages:
                for task in parse_task_list(records):
                    if task.task_id not in seen:  # pages shift as tasks are created meanwhile
                        seen.add(task.task_id)
                        yield task

    async def delete(self, voice_id: str) -> None:
        """Delete a custom voice by its ``voice_id`` (not the task id). Presets cannot be.

        Retried after a lost answer like any call; the resend's "already deleted" then means
        the lost attempt did it, and is success. A voice deleted before the call raises.
        """
        vid = V.identifier(voice_id, "voice_id")
        resent_after_ambiguity = False

        async def note_resend() -> None:
            nonlocal resent_after_ambiguity
            resent_after_ambiguity = True

        try:
            await self._transport.request("POST", PATH_DELETE_VOICES,
                                          json_body={"voice_id": vid}, reconcile=note_resend)
        except InvalidRequestError as exc:
            # An attempt whose answer was lost (a dropped connection, a 5000, a truncated
            # body) may have deleted the voice: the resend's "already deleted" is its success.
            # Deleting a voice that was deleted before this call still raises.
            if not (resent_after_ambiguity and is_already_deleted(exc)):
                raise

    async def wait(
        self,
        task_id: str | VoiceTask,
        *,
        timeout: float = DEFAULT_WAIT_TIMEOUT,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
    ) -> VoiceTask:
        """Poll until the task ends; return it when it succeeded.

        Raises TaskFailedError (with ``.task``) when it failed, WaitTimeoutError (with the last
        task seen) when ``timeout`` seconds pass. Polls back off from ``poll_interval``.
        """
        ref = task_id.task_id if isinstance(task_id, VoiceTask) else V.identifier(task_id,
                                                                                  "task_id")
        for name, value in (("timeout", timeout), ("poll_interval", poll_interval)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not value > 0:
                raise ValidationError(f"{name} must be a number > 0, got {value!r}")
        deadline = time.monotonic() + timeout
        interval = poll_interval
        cap = max(POLL_INTERVAL_MAX, poll_interval)
        last: VoiceTask | None = None
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WaitTimeoutError(ref, timeout, last)
            try:
                last = await within(self.get(ref), remaining)
            except (asyncio.TimeoutError, TimeoutError):
                raise WaitTimeoutError(ref, timeout, last) from None
            if last.task_status is TaskStatus.SUCCEED:
                return last
            if last.task_status is TaskStatus.FAILED:
                raise TaskFailedError(last, sent=self._transport.credential_mask())
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WaitTimeoutError(ref, timeout, last)
            await asyncio.sleep(min(interval, remaining))
            interval = min(interval * POLL_BACKOFF_FACTOR, cap)

    async def create_many(
        self,
        items: Iterable[Mapping[str, Any] | BatchItem],
        *,
        max_in_flight: int | None = None,
        wait: bool = True,
        item_timeout: float | None = None,
        timeout: float | None = None,
        poll_interval: float | None = None,
        on_progress: ProgressCallback | None = None,
        journal: str | None = None,
        callbacks: CallbackServer | None = None,
        coordinator: Coordinator | None = None,
        retry_failed: bool = False,
    ) -> builtins.list[BatchResult]:
        """Create many voices while keeping at most N tasks in progress (N learned from 1303s
        unless ``max_in_flight`` is given; a 1303 still lowers it). One result per item, in
        input order; one bad item never stops the batch. With ``callbacks`` (a running
        CallbackServer), items without a ``callback_url`` get its URL and each callback
        triggers an immediate status check, so the safety-net polling can be rare.
        ``coordinator`` shares slots, cap, journal and polling with other batches or processes
        (default: the client's, else one for this batch). ``retry_failed`` creates items whose
        earlier task failed (or whose voice was deleted) again under a fresh id. See the README,
        "Batch".
        """
        from ._batch import run_batch  # the scheduler sits above the resources

        return await run_batch(
            _BatchApi(self), items, max_in_flight=max_in_flight, wait=wait,
            item_timeout=item_timeout, timeout=timeout, poll_interval=poll_interval,
            on_progress=on_progress, journal=journal, callbacks=callbacks,
            coordinator=coordinator, retry_failed=retry_failed)
