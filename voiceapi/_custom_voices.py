"""Custom voices: create (an asynchronous task), get, list, iterate, delete, wait."""

from __future__ import annotations

import asyncio
import builtins
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from . import _validation as V
from ._aio import within
from ._constants import (
    DEFAULT_ITER_PAGE_SIZE,
    DEFAULT_PAGE_SIZE,
    DEFAULT_POLL_INTERVAL,
    DEFAULT_WAIT_TIMEOUT,
    MAX_PAGES,
    PATH_CUSTOM_VOICES,
    PATH_DELETE_VOICES,
    POLL_BACKOFF_FACTOR,
    POLL_INTERVAL_MAX,
)
from ._decode import is_not_found, parse_task, parse_task_list
from ._errors import (
    InvalidRequestError,
    TaskFailedError,
    UnexpectedResponseError,
    ValidationError,
    WaitTimeoutError,
)
from ._models import BatchResult, TaskStatus, VoiceTask

if TYPE_CHECKING:
    from ._batch import BatchItem, ProgressCallback
    from ._middlewares import Response
    from ._transport import Transport
    from ._webhooks import CallbackServer

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


def _task_path(task_ref: str) -> str:
    return f"{PATH_CUSTOM_VOICES}/{V.path_segment(task_ref)}"


class AsyncCustomVoices:
    """``client.custom_voices``: the voices you clone, and their creation tasks."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

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
        an ``external_task_id`` (yours, or a generated one), and after an ambiguous failure the
        SDK looks the task up by it before sending again, so a retry never creates (and bills)
        a second voice.
        """
        body = build_create_body(voice_name=voice_name, voice_url=voice_url, video_id=video_id,
                                 callback_url=callback_url, external_task_id=external_task_id)
        return await self._submit(body)

    async def _submit(self, body: dict[str, str], *, retry_rate_limits: bool = True) -> VoiceTask:
        """Send a validated create body. The batch scheduler passes ``retry_rate_limits=False``
        to handle 1302/1303 itself (it learns the account's cap from them)."""
        ext = body["external_task_id"]

        async def reconcile() -> Response | None:
            try:
                return await self._transport.request("GET", _task_path(ext))
            except InvalidRequestError as exc:
                if is_not_found(exc):
                    return None
                raise

        response = await self._transport.request(
            "POST", PATH_CUSTOM_VOICES, json_body=body, idempotent=False, reconcile=reconcile,
            retry_rate_limits=retry_rate_limits)
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
        return parse_task(raw, request_id=response.request_id)

    async def get(
        self, task_id: str | None = None, *, external_task_id: str | None = None
    ) -> VoiceTask:
        """One task, by Kling's ``task_id`` or by the ``external_task_id`` you chose."""
        if (task_id is None) == (external_task_id is None):
            raise ValidationError("give exactly one of task_id or external_task_id")
        ref = V.identifier(task_id if task_id is not None else external_task_id,
                           "task_id" if task_id is not None else "external_task_id")
        response = await self._transport.request("GET", _task_path(ref))
        return parse_task(response.data, request_id=response.request_id)

    async def list(
        self, *, page_num: int = 1, page_size: int = DEFAULT_PAGE_SIZE
    ) -> builtins.list[VoiceTask]:
        """One page of your voice-creation tasks (each holds its voice once it succeeded)."""
        params = V.page_params(page_num, page_size)
        response = await self._transport.request("GET", PATH_CUSTOM_VOICES, params=params)
        return parse_task_list(response.data, request_id=response.request_id)

    async def iter_all(
        self, *, page_size: int = DEFAULT_ITER_PAGE_SIZE
    ) -> AsyncIterator[VoiceTask]:
        """Every task, page after page, until a short or empty page; each task once."""
        V.page(page_size, "page_size")
        seen: set[str] = set()
        for page_num in range(1, MAX_PAGES + 1):
            tasks = await self.list(page_num=page_num, page_size=page_size)
            for task in tasks:
                if task.task_id not in seen:  # pages shift when tasks are created meanwhile
                    seen.add(task.task_id)
                    yield task
            if len(tasks) < page_size:
                return

    async def delete(self, voice_id: str) -> None:
        """Delete a custom voice by its ``voice_id`` (not the task id). Presets cannot be."""
        vid = V.identifier(voice_id, "voice_id")
        await self._transport.request("POST", PATH_DELETE_VOICES, json_body={"voice_id": vid})

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
        if not timeout > 0 or not poll_interval > 0:
            raise ValidationError("timeout and poll_interval must be > 0")
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
                raise TaskFailedError(last)
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
    ) -> builtins.list[BatchResult]:
        """Create many voices while keeping at most N tasks in progress (N learned from 1303s
        unless ``max_in_flight`` is given). One result per item, in input order; one bad item
        never stops the batch. With ``callbacks`` (a running CallbackServer), items without a
        ``callback_url`` get its URL and each callback triggers an immediate status check, so
        the safety-net polling can be rare. See the README, "Batch uploads".
        """
        from ._batch import run_batch

        return await run_batch(
            self, items, max_in_flight=max_in_flight, wait=wait, item_timeout=item_timeout,
            timeout=timeout, poll_interval=poll_interval, on_progress=on_progress,
            journal=journal, callbacks=callbacks)
