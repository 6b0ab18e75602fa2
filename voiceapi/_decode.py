"""Everything that reads an answer: the envelope, the error it means, and the task records.

One module, so the question "what did the server say?" has one answer: envelope decoding, the
business-code → error-class table, not-found and duplicate-id recognition, and the one cattrs
converter that builds models from API JSON. Anything that does not fit becomes a typed
VoiceAPIError here, so callers never see KeyError, TypeError or JSONDecodeError.
"""

from __future__ import annotations

import email.utils
import json
import math
import re
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any

import attrs
import cattrs

from . import _constants as C
from ._errors import (
    AccountError,
    APIError,
    AuthenticationError,
    InvalidRequestError,
    PermissionDeniedError,
    PolicyError,
    RateLimitError,
    ServerError,
    UnexpectedResponseError,
)
from ._models import TaskStatus, Voice, VoiceTask

# Business code -> error class (kling-api.md §6.1).
_CODE_CLASSES: dict[int, type[APIError]] = {
    **dict.fromkeys(range(1000, 1005), AuthenticationError),
    **dict.fromkeys((1100, 1101, 1102), AccountError),
    1103: PermissionDeniedError,
    **dict.fromkeys(range(1200, 1204), InvalidRequestError),
    **dict.fromkeys((1300, 1301, 1304), PolicyError),
    **dict.fromkeys((1302, 1303), RateLimitError),
    **dict.fromkeys((5000, 5001, 5002), ServerError),
}


def error_class_for(code: int | None, http_status: int) -> type[APIError]:
    """Pick the error class: the business code wins, the HTTP status decides for unknown codes."""
    if code is not None and code in _CODE_CLASSES:
        return _CODE_CLASSES[code]
    if http_status == 401:
        return AuthenticationError
    if http_status == 403:
        return PermissionDeniedError
    if http_status == 429:
        return RateLimitError
    if http_status >= 500:
        return ServerError
    if 400 <= http_status < 500:
        return InvalidRequestError
    return APIError



# --- what an error means -------------------------------------------------------------------

# The real server answers "not found" as 400/1201 with this message (kling-api.md §6.2, §11.1);
# 1201 alone means nothing more than "some parameter is wrong".
_NOT_FOUND_MESSAGE = re.compile(r"not\s+found", re.IGNORECASE)
_ALREADY_EXISTS_MESSAGE = re.compile(r"external[_ ]task[_ ]id\b.*\balready exists|"
                                     r"already exists.*external[_ ]task[_ ]id", re.IGNORECASE)


def is_not_found(exc: BaseException) -> bool:
    """True only when the server said the task does not exist.

    Told by the message first ("Task not found by id/external id: …"); code 1203 and a bare
    HTTP 404 count too. Any other 1201 is a different problem and must never be read as
    "not found" (that would resend a create that exists and is billed).
    """
    if not isinstance(exc, InvalidRequestError):
        return False
    if exc.code == 1203 or (exc.code is None and exc.http_status == 404):
        return True
    return exc.code in (1200, 1201) and bool(_NOT_FOUND_MESSAGE.search(exc.message or ""))


def is_duplicate_external_id(exc: BaseException) -> bool:
    """True when a create was refused because its external_task_id is already used."""
    return isinstance(exc, InvalidRequestError) and exc.code in (1200, 1201) and bool(
        _ALREADY_EXISTS_MESSAGE.search(exc.message or ""))


# --- the envelope ---------------------------------------------------------------------------

def parse_retry_after(
    headers: Mapping[str, str], *, now: float | None = None, maximum: float = C.RETRY_AFTER_MAX
) -> float | None:
    """Seconds to wait from ``retry-after-ms``, or ``Retry-After`` as seconds or an HTTP-date.

    Clamped to [0, maximum]; anything unparsable means "no advice" (None).
    """
    raw_ms = headers.get("retry-after-ms") or headers.get("Retry-After-Ms")
    if raw_ms:
        try:
            value = float(raw_ms) / 1000.0
        except ValueError:
            value = math.nan
        if math.isfinite(value):
            return min(max(value, 0.0), maximum)
    raw = headers.get("Retry-After") or headers.get("retry-after")
    if not raw:
        return None
    raw = raw.strip()
    try:
        value = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            return None
        if when is None or when.tzinfo is None:
            return None
        value = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(value):
        return None
    return min(max(value, 0.0), maximum)


def _server_time(headers: Mapping[str, str]) -> float | None:
    raw = headers.get("Date")
    if not raw:
        return None
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError, IndexError):
        return None
    return when.timestamp() if when.tzinfo is not None else None


def decode_envelope(
    status: int, headers: Mapping[str, str], body: bytes, *, retry_after_max: float = 60.0
) -> tuple[Any, str | None]:
    """Turn one HTTP answer into ``(data, request_id)`` or raise the matching typed error.

    Every malformed answer (non-JSON, truncated, wrong types, no code) becomes a VoiceAPIError.
    """
    envelope: Any
    try:
        # Kling answers in UTF-8; decoding first skips json's encoding sniffing.
        envelope = json.loads(body.decode()) if body else None
    except (ValueError, RecursionError):
        envelope = None
    code = envelope.get("code") if isinstance(envelope, dict) else None
    if not isinstance(code, int) or isinstance(code, bool):
        if 200 <= status < 300:
            raise UnexpectedResponseError(
                f"HTTP {status} answer is not a Kling JSON envelope "
                f"(content-type {headers.get('Content-Type', 'unknown')!r}, {len(body)} bytes)",
                http_status=status)
        cls = error_class_for(None, status)
        raise cls(f"HTTP {status} without a Kling JSON envelope (likely from a proxy)",
                  http_status=status)
    assert isinstance(envelope, dict)
    rid = envelope.get("request_id")
    request_id = rid if isinstance(rid, str) else None
    if code == 0 and 200 <= status < 300:
        return envelope.get("data"), request_id
    msg = envelope.get("message")
    message = msg if isinstance(msg, str) and msg else f"Kling error {code}"
    if code == 0:
        code_or_none = None
        message = f"HTTP {status} with code 0"
    else:
        code_or_none = code
    cls = error_class_for(code_or_none, status)
    if cls is AuthenticationError:
        raise AuthenticationError(message, code=code_or_none, http_status=status,
                                  request_id=request_id, server_time=_server_time(headers))
    if cls is RateLimitError:
        raise RateLimitError(message, code=code_or_none, http_status=status,
                             request_id=request_id,
                             retry_after=parse_retry_after(headers, maximum=retry_after_max))
    raise cls(message, code=code_or_none, http_status=status, request_id=request_id)


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
        out.append({k: ("" if v[k] is None and k not in ("voice_id", "status") else v[k])
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
