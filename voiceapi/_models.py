"""Typed, frozen models and the one cattrs converter that builds them from API JSON.

The wire shape nests what users care about (``task_info.external_task_id``,
``task_result.voices``); the models flatten it. Anything that does not fit becomes an
UnexpectedResponseError here, so callers never see KeyError or TypeError from a bad answer.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any

import attrs
import cattrs

from ._errors import UnexpectedResponseError, VoiceAPIError


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


@attrs.frozen
class Voice:
    """A voice usable in video generation: a custom voice or a Kling preset."""

    voice_id: str
    voice_name: str = ""
    trial_url: str = ""
    #: ``"kling"`` for presets, otherwise the creator's numeric id as a string.
    owned_by: str = ""

    @property
    def is_preset(self) -> bool:
        return self.owned_by == "kling"


@attrs.frozen
class BalanceDeduction:
    quota: str = ""
    list_price: str = ""


@attrs.frozen
class VoiceTask:
    """A voice-creation task; ``voices`` holds the created voice once the task succeeded."""

    task_id: str
    task_status: TaskStatus
    task_status_msg: str = ""
    external_task_id: str | None = None
    voices: list[Voice] = attrs.field(factory=list)
    created_at: datetime | None = None
    updated_at: datetime | None = None
    final_unit_deduction: str | None = None
    final_balance_deduction: BalanceDeduction | None = None

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


# --- the converter ----------------------------------------------------------------------------

# detailed_validation off: the generated code is several times faster, and we report
# mismatches through UnexpectedResponseError either way.
converter = cattrs.Converter(detailed_validation=False)


def _structure_str(value: Any, _: Any) -> str:
    if isinstance(value, str):
        return value
    # Ids are digit strings; a server that sends them as numbers still means the same id.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise TypeError(f"expected a string, got {type(value).__name__}")


def _structure_ms(value: Any, _: Any) -> datetime:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"expected a millisecond timestamp, got {type(value).__name__}")
    return datetime.fromtimestamp(value / 1000, tz=timezone.utc)


def _structure_status(value: Any, _: Any) -> TaskStatus:
    if not isinstance(value, str):
        raise TypeError(f"expected a status string, got {type(value).__name__}")
    return TaskStatus(value)


def _optional(hook: Any) -> Any:
    def structure(value: Any, cls: Any) -> Any:
        return None if value is None else hook(value, cls)

    return structure


converter.register_structure_hook(str, _structure_str)
converter.register_structure_hook(datetime, _structure_ms)
converter.register_structure_hook(TaskStatus, _structure_status)
# Direct hooks for the optional fields: cattrs' generic Optional handling is the slow path.
converter.register_structure_hook(str | None, _optional(_structure_str))
converter.register_structure_hook(datetime | None, _optional(_structure_ms))

_TASK_FIELDS = frozenset(f.name for f in attrs.fields(VoiceTask))
_VOICE_FIELDS = frozenset(f.name for f in attrs.fields(Voice))


def _mapping(value: Any, what: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(f"{what} is a {type(value).__name__}, expected an object")
    return value


def _voices_of(raw: Mapping[str, Any]) -> list[dict[str, Any]]:
    voices = _mapping(raw.get("task_result"), "task_result").get("voices") or []
    if not isinstance(voices, list):
        raise TypeError("task_result.voices is not an array")
    out = []
    for v in voices:
        v = _mapping(v, "voice")
        out.append({k: ("" if v[k] is None and k != "voice_id" else v[k])
                    for k in _VOICE_FIELDS if k in v})
    return out


def _flatten_task(raw: Any) -> dict[str, Any]:
    raw = _mapping(raw, "task")
    flat = {k: v for k, v in raw.items() if k in _TASK_FIELDS and v is not None}
    ext = _mapping(raw.get("task_info"), "task_info").get("external_task_id")
    if ext not in (None, ""):
        flat["external_task_id"] = ext
    flat["voices"] = _voices_of(raw)
    if "task_status_msg" in flat and not isinstance(flat["task_status_msg"], str):
        flat["task_status_msg"] = str(flat["task_status_msg"])
    return flat


# Looked up once: every task in every page goes through it.
_structure_task: Callable[[Any, type[VoiceTask]], VoiceTask] = \
    converter.get_structure_hook(VoiceTask)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, cattrs.BaseValidationError):
        subs = [_describe(e) for e in exc.exceptions]
        return "; ".join(subs) if subs else str(exc)
    return str(exc)


def parse_task(raw: Any, *, request_id: str | None = None) -> VoiceTask:
    """Build a VoiceTask from one task object of the API; any misfit is UnexpectedResponseError."""
    try:
        return _structure_task(_flatten_task(raw), VoiceTask)
    except (cattrs.BaseValidationError, TypeError, ValueError, KeyError,
            OverflowError, OSError, AttributeError) as exc:
        raise UnexpectedResponseError(
            f"unexpected task object in response: {_describe(exc)}", request_id=request_id
        ) from None


def parse_task_list(raw: Any, *, request_id: str | None = None) -> list[VoiceTask]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise UnexpectedResponseError(
            f"expected an array of tasks, got {type(raw).__name__}", request_id=request_id)
    return [parse_task(item, request_id=request_id) for item in raw]


def parse_voices(raw: Any, *, request_id: str | None = None) -> list[Voice]:
    """Flatten ``data[*].task_result.voices[*]`` (the presets list) into Voice items."""
    return [v for task in parse_task_list(raw, request_id=request_id) for v in task.voices]
