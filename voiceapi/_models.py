"""Typed, frozen models: what users hold. Building them from API JSON lives in ``_decode``."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

import attrs

from ._errors import VoiceAPIError


class TaskStatus(str, enum.Enum):
    """Status of a voice-creation task (legacy spelling: ``succeed``)."""

    SUBMITTED = "submitted"
    PROCESSING = "processing"
    SUCCEED = "succeed"
    FAILED = "failed"
    #: A status this SDK version does not know; treated as "not finished yet".
    UNKNOWN = "unknown"

    @classmethod
    def _missing_(cls, value: object) -> TaskStatus:
        # New-standard payloads spell success "succeeded"; tolerate it (kling-api.md §3.4).
        if isinstance(value, str) and value.lower() == "succeeded":
            return cls.SUCCEED
        if isinstance(value, str) and value.lower() in cls._value2member_map_:
            return cls(value.lower())
        return cls.UNKNOWN

    @property
    def is_terminal(self) -> bool:
        return self in (TaskStatus.SUCCEED, TaskStatus.FAILED)

    def __str__(self) -> str:
        return self.value


# weakref_slot=False: no per-instance weakref slot (tasks are many and never weakly
# referenced), and the parser's fast constructor needs that layout (_decode._fast_constructor).
@attrs.frozen(weakref_slot=False)
class Voice:
    """A voice usable in video generation: a custom voice or a Kling preset."""

    voice_id: str
    voice_name: str = ""
    trial_url: str = ""
    #: ``"kling"`` for presets, otherwise the creator's numeric id as a string.
    owned_by: str = ""
    #: As the server sends it (``"succeed"``, ``"deleted"``, …), or None when it sends none.
    #: Deleted voices may stay listed with ``status == "deleted"`` (kling-api.md §11.1).
    status: str | None = None

    @property
    def is_deleted(self) -> bool:
        """True when the server lists the voice as deleted (it may stay listed after delete)."""
        return self.status is not None and self.status.strip().lower() == "deleted"

    @property
    def is_preset(self) -> bool:
        return self.owned_by == "kling"


@attrs.frozen
class BalanceDeduction:
    quota: str = ""
    list_price: str = ""


@attrs.frozen(weakref_slot=False)
class VoiceTask:
    """A voice-creation task; ``voices`` holds the created voice once the task succeeded."""

    task_id: str
    task_status: TaskStatus
    task_status_msg: str = ""
    external_task_id: str | None = None
    voices: list[Voice] = attrs.field(factory=list)
    created_at: datetime | None = None
    updated_at: datetime | None = None
    #: Money fields are kept as the decimal strings the API documents (numbers sent by a
    #: server are turned into the same text), never floats.
    final_unit_deduction: str | None = None
    final_balance_deduction: BalanceDeduction | None = None
    #: ``task_status`` exactly as the server sent it (None if it sent none). Useful when
    #: ``task_status`` is ``UNKNOWN``: a status this SDK version does not know yet. Not part of
    #: equality, so "succeed" and "succeeded" readings of one task compare equal.
    raw_status: str | None = attrs.field(default=None, eq=False)

    @property
    def is_terminal(self) -> bool:
        return self.task_status.is_terminal

    @property
    def voice(self) -> Voice | None:
        """The created voice (a task creates one), or None before success."""
        return self.voices[0] if self.voices else None

    @property
    def voice_id(self) -> str | None:
        v = self.voice
        return v.voice_id if v is not None else None


@attrs.frozen
class BatchResult:
    """The outcome of one ``create_many`` item, in input order."""

    input: dict[str, Any]
    task: VoiceTask | None = None
    error: VoiceAPIError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.task is not None and \
            self.task.task_status is TaskStatus.SUCCEED
