"""What a batch takes and reports: items, progress counts, the batch's own errors, and the narrow
protocol the scheduler needs from the resource. Both the resource and the scheduler import
this module, so neither imports the other at module level."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import attrs

from ._coordinator import Coordinator
from ._create import Created
from ._errors import SentCredential, VoiceAPIError, printable
from ._models import VoiceTask
from ._pages import PageLimit

#: The keys of an item (create()'s keyword arguments).
CREATE_FIELDS = ("voice_name", "voice_url", "video_id", "callback_url", "external_task_id")


@attrs.frozen
class BatchItem:
    """One voice to create (a dict with the same keys works as well)."""

    voice_name: str
    voice_url: str | None = None
    video_id: str | None = None
    callback_url: str | None = None
    external_task_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in attrs.asdict(self).items() if v is not None}


@attrs.frozen
class BatchProgress:
    """Counts passed to ``on_progress`` when items change state (throttled)."""

    total: int
    #: Not yet sent, or being sent.
    pending: int
    submitted: int
    processing: int
    succeeded: int
    #: Items with a final error: failed tasks, bad input, timeouts, items never sent.
    failed: int
    #: Tasks currently counted against the slot limit, and the limit itself.
    in_flight: int
    slots: int

    @property
    def done(self) -> int:
        return self.succeeded + self.failed


ProgressCallback = Callable[[BatchProgress], None]


class NotSubmittedError(VoiceAPIError):
    """The batch ended (timeout, cancellation) before this item's task was created."""


class VoiceGoneError(VoiceAPIError):
    """A re-attached task succeeded earlier, but its voice has since been deleted.

    ``.task`` is the task as the server shows it now. Rerun with ``retry_failed=True`` to create
    the voice again under a fresh id.
    """

    def __init__(self, task: VoiceTask) -> None:
        super().__init__(f"voice task {printable(task.task_id, 200)} succeeded earlier, but its "
                         "voice has been deleted since")
        self.task = task


class JournalError(VoiceAPIError):
    """The batch journal cannot be used: its directory is missing, it is not writable, or
    another batch is writing it right now."""


class BatchApi(Protocol):
    """What the scheduler needs from ``custom_voices`` (built by the resource)."""

    rate_limit_delay: float
    coordinator: Coordinator | None
    page_limit: PageLimit

    async def create(self, body: dict[str, str]) -> Created:
        """Create with reconciliation (never twice); 1302/1303 raised as RateLimitError."""
        ...

    async def lookup(self, external_task_id: str) -> VoiceTask | None:
        """The task under that external id; None only when the server answered not-found."""
        ...

    async def get(self, task_id: str) -> VoiceTask: ...

    async def list_page(self, page_num: int, page_size: int) -> list[Any]:
        """One list page as raw records."""
        ...

    def credential_mask(self) -> SentCredential:
        """The client's credential, masked in a failed task's error (servers may echo it)."""
        ...


__all__ = ["CREATE_FIELDS", "BatchApi", "BatchItem", "BatchProgress", "JournalError",
           "NotSubmittedError", "ProgressCallback", "VoiceGoneError"]
