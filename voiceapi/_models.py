"""Typed, frozen models: what users hold. Building them from API JSON lives in ``_decode``."""

from __future__ import annotations

import enum
from datetime import datetime, timezone
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


#: The mark a task read from the API carries in ``created_at``/``updated_at`` until either is
#: read (``_lazy_stamp``); never seen outside this module.
_PENDING: Any = type("_Pending", (), {"__slots__": (), "__repr__": lambda self: "<pending>"})()


_fromtimestamp, _UTC = datetime.fromtimestamp, timezone.utc


def stamp_from_ms(ms: int | float | None) -> datetime | None:
    """An API timestamp (milliseconds since the epoch) as an aware UTC datetime; None when
    there is none or it is out of the range a datetime can hold (or NaN)."""
    if ms is None:
        return None
    try:
        return _fromtimestamp(ms / 1000, _UTC)
    except (OverflowError, OSError, ValueError):
        return None


class _RawStamps:
    """Where the parser leaves a task's two timestamps as the API's milliseconds.

    Turning milliseconds into an aware datetime is the costliest single step of reading a task
    (the two are a quarter of it), and most tasks read from a page are never asked their times:
    batch tracking, ``iter_all`` looking for a voice, polling a status. So the parser stores the
    integers here and marks both fields ``_PENDING``; the first read of a field builds its
    datetime (``_lazy_stamp``), once. Everything that reads a field (attribute access, ``==``,
    ``repr``, ``attrs.asdict``/``evolve``, pickling, cattrs) sees the datetime, never the mark.
    """

    __slots__ = ("_created_ms", "_updated_ms")
    # Read only while the fields are _PENDING (then the parser set both to ints); None from the
    # field-by-field parser, unset on a task built by hand.
    _created_ms: int | None
    _updated_ms: int | None


@attrs.frozen(weakref_slot=False)
class VoiceTask(_RawStamps):
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


# VoiceTask.created_at/updated_at: properties over the attrs slots (the same storage, so attrs'
# __init__, __eq__, __repr__, pickling and cattrs go through them), which build the datetime on
# the first read of a field the parser left pending (``_RawStamps``). The getters and
# setters are the slots' own, bound once: a read of a built stamp is one Python call.
#: The attrs slots themselves (``created_at``, ``updated_at``), under their properties.
SLOTS = {name: VoiceTask.__dict__[name] for name in ("created_at", "updated_at")}


def _lazy_stamp(name: str, raw: str, doc: str) -> property:
    slot = SLOTS[name]
    get, store = slot.__get__, slot.__set__
    read_raw = _RawStamps.__dict__[raw].__get__

    def read(task: VoiceTask) -> datetime | None:
        value = get(task)
        if value is _PENDING:
            # Each field on its own first read, so a field set by hand meanwhile
            # (object.__setattr__) stays, as on a task parsed eagerly. Two threads racing
            # here build equal values; either store is right.
            value = stamp_from_ms(read_raw(task))
            store(task, value)
        return value  # type: ignore[no-any-return]

    return property(read, store, slot.__delete__, doc)


VoiceTask.created_at = _lazy_stamp(  # type: ignore[assignment]
    "created_at", "_created_ms", "When the task was created (UTC).")
VoiceTask.updated_at = _lazy_stamp(  # type: ignore[assignment]
    "updated_at", "_updated_ms", "When the task last changed (UTC).")


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
