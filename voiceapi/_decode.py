"""Everything that reads an answer: the envelope, the error it means, and the task records.

One module, so the question "what did the server say?" has one answer: envelope decoding, the
business-code → error-class table, not-found and duplicate-id recognition, and the one cattrs
converter that builds models from API JSON. Anything that does not fit becomes a typed
VoiceAPIError here, so callers never see KeyError, TypeError or JSONDecodeError.
"""

from __future__ import annotations

import decimal
import email.utils
import json
import logging
import math
import operator
import re
import time
from collections.abc import Callable, Mapping
from datetime import datetime
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
    SentCredential,
    ServerError,
    UnexpectedResponseError,
    printable,
)
from ._models import _PENDING, BalanceDeduction, TaskStatus, Voice, VoiceTask, stamp_from_ms

logger = logging.getLogger(C.LOGGER_NAME)

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

# The real server answers "not found" as 400/1201 with "Task not found by id/external id: <x>"
# (kling-api.md §6.2, §11.1); 1201 alone means nothing more than "some parameter is wrong".
# The two mistakes do not cost the same: reading another error as "not found" makes a create
# resend and may bill a voice twice, while missing a not-found only surfaces an error. So the
# pattern is narrow: it must say that the *task* is not found (or does not exist), which
# "voice_url not found", "callback host not found" or "pageSize must be…" never do.
_NOT_FOUND_MESSAGE = re.compile(
    r"\btask\s+(?:is\s+)?(?:not\s+found|does\s*n[o']t\s+exist)\b", re.IGNORECASE)
_ID = r"external[\s_-]?task[\s_-]?id"
# "The id … already exists" in either order, or "duplicate(d) external_task_id". Three plain
# searches rather than one pattern with ".*" between the parts: that pattern backtracks
# quadratically (a 340 kB message of repeated ids took 50 s, blocking the event loop).
_EXTERNAL_ID = re.compile(rf"\b{_ID}\b", re.IGNORECASE)
_ALREADY_EXISTS = re.compile(r"\balready\s+exists?\b", re.IGNORECASE)
_DUPLICATE_ID = re.compile(rf"\bduplicated?\s+{_ID}\b", re.IGNORECASE)


def _says_already_exists(message: str) -> bool:
    return (_ALREADY_EXISTS.search(message) is not None
            and _EXTERNAL_ID.search(message) is not None) or \
        _DUPLICATE_ID.search(message) is not None


def is_not_found(exc: BaseException) -> bool:
    """True only when the server said the task does not exist.

    Told by the message first ("Task not found by id/external id: …"); code 1203 and a bare
    HTTP 404 (no business code) count too. Any other 1201 is a different problem and must never
    be read as "not found": that would resend a create that exists and is billed.
    """
    if not isinstance(exc, InvalidRequestError):
        return False
    if exc.code == 1203 or (exc.code is None and exc.http_status == 404):
        return True
    message = exc.message
    return exc.code in (1200, 1201) and isinstance(message, str) and \
        _NOT_FOUND_MESSAGE.search(message) is not None and not _says_already_exists(message)


def is_duplicate_external_id(exc: BaseException) -> bool:
    """True when a create was refused because its external_task_id is already used.

    The real message is ``External_task_id <x> already exists`` (400/1201).
    """
    message = getattr(exc, "message", None)
    return isinstance(exc, InvalidRequestError) and exc.code in (1200, 1201) and \
        isinstance(message, str) and _says_already_exists(message)


# "Voice already be deleted for id: …" (the sibling element API's live wording, kling-api.md
# §4.5), "already deleted", "has already been deleted": a plain search, linear like the others.
_ALREADY_DELETED = re.compile(r"\balready\s+(?:been\s+|be\s+)?deleted\b", re.IGNORECASE)


def is_already_deleted(exc: BaseException) -> bool:
    """True when a delete was refused because the voice is deleted already (400/1201).

    Only meaningful for a delete resent after an attempt that may have landed: then it is
    that attempt's success, not an error (``AsyncCustomVoices.delete``).
    """
    message = getattr(exc, "message", None)
    return isinstance(exc, InvalidRequestError) and exc.code in (1200, 1201) and \
        isinstance(message, str) and _ALREADY_DELETED.search(message) is not None


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
    status: int, headers: Mapping[str, str], body: bytes, *, retry_after_max: float = 60.0,
    sent: SentCredential | None = None,
) -> tuple[Any, str | None]:
    """Turn one HTTP answer into ``(data, request_id)`` or raise the matching typed error.

    Every malformed answer (non-JSON, truncated, wrong types, no code) becomes a VoiceAPIError.
    ``sent``: the credential the request carried; if the server echoes it in its texts, it is
    masked in the error.
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
            # The content type is the answer's text too: shown printable, and masked.
            kind = printable(headers.get("Content-Type", "unknown"), 100, sent)
            raise UnexpectedResponseError(
                f"HTTP {status} answer is not a Kling JSON envelope "
                f"(content-type {kind!r}, {len(body)} bytes)", http_status=status)
        cls = error_class_for(None, status)
        location = headers.get("Location") if 300 <= status < 400 else None
        if location:
            # Kling never redirects (and we never follow): most often http:// was typed for
            # https://, or base_url points at a web page rather than the API host.
            shown = printable(location, 200, sent)
            raise cls(f"HTTP {status} redirect to {shown!r}: the API never "
                      "redirects; check base_url", http_status=status)
        raise cls(f"HTTP {status} without a Kling JSON envelope (likely from a proxy)",
                  http_status=status)
    assert isinstance(envelope, dict)
    rid = envelope.get("request_id")
    request_id = rid if isinstance(rid, str) else None
    if code == 0 and 200 <= status < 300:
        return envelope.get("data"), request_id
    if request_id is not None:
        request_id = printable(request_id, 200, sent)
    msg = envelope.get("message")
    # The message goes into str(exc), logs and terminals: made safe first (errors.printable).
    message = printable(msg, sent=sent) if isinstance(msg, str) and msg \
        else f"Kling error {code}"
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
#
# One pass from the raw record to the frozen model. The hooks below are registered on the one
# cattrs converter (so ``converter.structure(raw, VoiceTask)`` is the same parser), but they read
# the nested API record directly instead of flattening it first and structuring the flat dict
# field by field: that halves the cost per task (about 97k → 45k instructions under callgrind),
# and every task of every page goes through here.
#
# Leniency, field by field (kling-api.md §11.1 "one odd field never loses a page"): a field of
# an unexpected type or value falls back to its default (None / "" / no voices / UNKNOWN) and
# the rest of the record is kept. Only a record without a usable ``task_id`` is unreadable,
# because nothing can be done with a task one cannot name.

converter = cattrs.Converter(detailed_validation=False)


def _fast_constructor(cls: type[Any], extra: tuple[str, ...] = ()) -> Callable[..., Any]:
    """A constructor for a frozen slotted attrs class taking every field positionally.

    attrs' own ``__init__`` of a frozen class sets each field through a bound
    ``object.__setattr__`` (a call and a generic attribute lookup per field), about a quarter
    of the cost of reading a task. Instead the fields are stored into an instance of a
    mutable twin with the same slots (plain slot stores), which then becomes an instance of
    ``cls`` by ``__class__`` assignment: CPython allows it exactly when the two layouts are
    the same, which needs ``cls`` without a ``__weakref__`` slot (``weakref_slot=False``).
    Where that is refused (another layout, another interpreter) the slot descriptors' own
    ``__set__`` are used. Only for classes without validators, converters or
    ``__attrs_post_init__``: the result is the object ``cls(*values)`` builds.

    ``extra``: slots of a base class (not fields) to fill too, after the fields
    (``VoiceTask``'s raw timestamps, ``_models._RawStamps``).
    """
    fields = attrs.fields(cls)
    assert not any(f.validator or f.converter for f in fields), cls
    assert not hasattr(cls, "__attrs_post_init__"), cls
    own = tuple(f.name for f in fields)
    names = own + extra
    params = ", ".join(f"v{i}" for i in range(len(names)))
    # The twin derives from cls's own bases, so base slots (``extra``) lie where cls has them.
    twin: type[Any] = type(f"_{cls.__name__}Twin", cls.__bases__, {"__slots__": own})
    try:
        probe = twin()
        for name in names:
            setattr(probe, name, None)
        probe.__class__ = cls
    except TypeError:
        setters = [next(k.__dict__[name] for k in cls.__mro__ if name in k.__dict__).__set__
                   for name in names]
        body = ["    obj = new(cls)"] + [f"    set{i}(obj, v{i})" for i in range(len(names))]
        scope: dict[str, Any] = {"new": object.__new__, "cls": cls, **{
            f"set{i}": setter for i, setter in enumerate(setters)}}
    else:
        body = ["    obj = twin()"] + [f"    obj.{name} = v{i}" for i, name in enumerate(names)]
        body.append("    obj.__class__ = cls")
        scope = {"twin": twin, "cls": cls}
    # Generated like attrs' own __init__: one straight-line function per class.
    exec("\n".join([f"def build({params}):", *body, "    return obj"]), scope)
    build: Callable[..., Any] = scope["build"]
    return build


_new_voice: Callable[[str, str, str, str, str | None], Voice] = _fast_constructor(Voice)
_new_balance: Callable[[str, str], BalanceDeduction] = _fast_constructor(BalanceDeduction)
#: Every VoiceTask field, then the two raw millisecond stamps (None unless the fields are
#: ``_PENDING``).
_new_task: Callable[..., VoiceTask] = _fast_constructor(VoiceTask, ("_created_ms", "_updated_ms"))

#: A known status and its own text, kept as ``raw_status`` instead of the page's copy of it
#: (equal, and shared: a tracked task holds no string of its own for it).
_KNOWN_STATUS: dict[str, tuple[TaskStatus, str]] = {m.value: (m, m.value) for m in TaskStatus}
_NUMBER = (int, float)


def _text(value: Any, default: str) -> str:
    """A text field: strings as sent, numbers as their text, anything else the default."""
    if type(value) is str:
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, _NUMBER) and not isinstance(value, bool):
        return _number_text(value) or default
    return default


def _number_text(value: int | float) -> str | None:
    """Decimal text of a number: ``0.05`` stays "0.05", never "5e-02"; NaN/inf are no value."""
    if type(value) is int:
        return _int_text(value)
    if not math.isfinite(value):
        return None
    return format(decimal.Decimal(repr(value)), "f")


def _int_text(value: int) -> str | None:
    try:
        return str(value)
    except ValueError:  # more digits than Python will print (sys.set_int_max_str_digits)
        return None


def _money(value: Any) -> str | None:
    """Deduction amounts are decimal strings in the API; a number means the same amount."""
    if type(value) is str:
        return value
    if isinstance(value, str):
        return str(value)
    if isinstance(value, _NUMBER) and not isinstance(value, bool):
        return _number_text(value)
    return None


def _timestamp(value: Any) -> datetime | None:
    """Milliseconds since the epoch as int, float or numeric string; anything else is None."""
    if type(value) is not int and type(value) is not float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            return None
        try:
            value = float(value)
        except ValueError:
            return None
    return stamp_from_ms(value)  # None when out of range, NaN or infinite


def _task_id(value: Any) -> str | None:
    """A usable id: a non-blank string, or an integer (the same digits); otherwise None."""
    if type(value) is str:
        return value if value and not value.isspace() else None
    if isinstance(value, int) and not isinstance(value, bool):
        return _int_text(int(value))
    if isinstance(value, str):
        return _task_id(str(value))
    return None


def _status(value: Any) -> tuple[TaskStatus, str | None]:
    if type(value) is str:
        known = _KNOWN_STATUS.get(value)
        return known if known is not None else (TaskStatus(value), value)
    if isinstance(value, str):
        return _status(str(value))
    # A missing or non-string status is one we do not know (wait() keeps waiting); keep its
    # text, if it has one, for the user to see.
    return TaskStatus.UNKNOWN, (None if value is None else _text(value, "") or None)


def _voice_status(value: Any) -> str | None:
    if type(value) is str or value is None:
        return value
    return _text(value, "") or None  # tolerated: a number becomes its text, others None


def _voice_or_none(raw: Any) -> Voice | None:
    """One voice entry, or None when it is not an object or has no usable ``voice_id``."""
    if type(raw) is not dict and not isinstance(raw, Mapping):
        return None
    get = raw.get
    vid = get("voice_id")
    if type(vid) is not str or not vid or vid.isspace():
        vid = _task_id(vid)
        if vid is None:
            return None
    name, url, owner, status = (get("voice_name"), get("trial_url"), get("owned_by"),
                                get("status"))
    return _new_voice(vid,
                      name if type(name) is str else _text(name, ""),
                      url if type(url) is str else _text(url, ""),
                      owner if type(owner) is str else _text(owner, ""),
                      status if type(status) is str or status is None
                      else _voice_status(status))


def _voices(result: Any) -> list[Voice]:
    if type(result) is not dict and not isinstance(result, Mapping):
        return []
    raw = result.get("voices")
    if type(raw) is not list:
        if raw is None:
            return []
        if not isinstance(raw, Mapping):
            return []
        raw = [raw]  # one voice object instead of an array still names a real voice
    out = []
    skipped = 0
    first_skipped: Any = None
    for entry in raw:
        voice = _voice_or_none(entry)
        if voice is not None:
            out.append(voice)
        else:
            if not skipped:
                first_skipped = entry
            skipped += 1
    if skipped:
        # One line per record, not per entry: a record (or an unsigned callback) of many
        # junk entries must not flood the log, nor hold the loop writing it.
        logger.warning("skipped %d voice entr%s without a usable voice_id (first: %s)",
                       skipped, "y" if skipped == 1 else "ies", _preview(first_skipped))
    return out


def _structure_voice(raw: Any, _: Any = Voice) -> Voice:
    """The Voice hook (for ``converter.structure(raw, Voice)``): an unusable entry raises."""
    voice = _voice_or_none(raw)
    if voice is None:
        raise TypeError("voice entry is not an object with a usable voice_id")
    return voice


_BALANCES: dict[tuple[str, str], BalanceDeduction] = {}
_BALANCE_CACHE_SIZE = 256


def _balance(value: Any) -> BalanceDeduction | None:
    if type(value) is not dict and not isinstance(value, Mapping):
        return None
    quota, price = value.get("quota"), value.get("list_price")
    if type(quota) is str and type(price) is str:
        # Frozen and nearly always the same few amounts ("0", "0"): one shared instance per
        # pair, as the interpreter shares small ints. The table is bounded.
        key = (quota, price)
        found = _BALANCES.get(key)
        if found is None:
            if len(_BALANCES) >= _BALANCE_CACHE_SIZE:
                _BALANCES.clear()
            found = _BALANCES[key] = _new_balance(quota, price)
        return found
    return _new_balance(quota if type(quota) is str else (_money(quota) or ""),
                        price if type(price) is str else (_money(price) or ""))


def _external_id(info: Any) -> str | None:
    if type(info) is not dict and not isinstance(info, Mapping):
        return None
    ext = info.get("external_task_id")
    if type(ext) is str:
        return ext or None
    return _task_id(ext)


def _preview(value: Any) -> str:
    """A short repr for an error message; never fails (huge ints cannot be printed)."""
    try:
        return f"{value!r:.80}"
    except (ValueError, RecursionError):
        return f"a {type(value).__name__}"


class _NoTaskId(TypeError):
    """The one unreadable case: a record we cannot name."""


# The record every server sends for a task, in the types the API documents, read with C-level
# getters and straight type checks: about half the cost of going field by field. Any other
# shape (a missing field, a number for a string, an odd voice) goes to _structure_task_lenient,
# which decides every case; both give the same VoiceTask.
_TASK_FIELDS = operator.itemgetter("task_id", "task_status", "task_status_msg", "task_info",
                                   "task_result", "created_at", "updated_at")
_VOICE_FIELDS = operator.itemgetter("voice_id", "voice_name", "trial_url", "owned_by")


def _structure_task_record(raw: Any, _: Any = VoiceTask) -> VoiceTask:
    """The VoiceTask hook: the common record in one pass, anything else field by field."""
    try:
        tid, raw_status, msg, info, result, created, updated = _TASK_FIELDS(raw)
    except (KeyError, TypeError, IndexError):
        return _structure_task_lenient(raw)
    if type(raw) is not dict or type(tid) is not str or type(raw_status) is not str or \
            type(msg) is not str or type(info) is not dict or type(result) is not dict or \
            type(created) is not int or type(updated) is not int or not tid or tid.isspace():
        return _structure_task_lenient(raw)
    known = _KNOWN_STATUS.get(raw_status)
    ext = info.get("external_task_id")
    unit = raw.get("final_unit_deduction")
    balance = raw.get("final_balance_deduction")
    voices = result.get("voices")
    if known is None or (ext is not None and type(ext) is not str) or \
            (unit is not None and type(unit) is not str):
        return _structure_task_lenient(raw)
    status, raw_status = known
    if balance is not None:
        if type(balance) is not dict:
            return _structure_task_lenient(raw)
        quota, price = balance.get("quota"), balance.get("list_price")
        balance = _BALANCES.get((quota, price)) if type(quota) is str and \
            type(price) is str else None
        if balance is None:  # not one of the shared amounts: built (and shared) there
            return _structure_task_lenient(raw)
    if voices:
        if type(voices) is not list or len(voices) != 1 or type(voices[0]) is not dict:
            return _structure_task_lenient(raw)
        voice = voices[0]
        try:
            vid, name, url, owner = _VOICE_FIELDS(voice)
        except KeyError:
            return _structure_task_lenient(raw)
        vstatus = voice.get("status")
        if type(vid) is not str or type(name) is not str or type(url) is not str or \
                type(owner) is not str or not vid or vid.isspace() or \
                (vstatus is not None and type(vstatus) is not str):
            return _structure_task_lenient(raw)
        voices = [_new_voice(vid, name, url, owner, vstatus)]
    elif voices is None or (type(voices) is list and not voices):
        voices = []
    else:
        return _structure_task_lenient(raw)
    # The datetimes are built when first read (_models._RawStamps): most tasks never are.
    return _new_task(tid, status, msg, ext or None, voices, _PENDING, _PENDING, unit, balance,
                     raw_status, created, updated)


def _structure_task_lenient(raw: Any) -> VoiceTask:
    """Any record, one field at a time: odd values fall back to their defaults.

    Only records the fast path (``_structure_task_record``) declined come here, so nothing is
    inlined for speed: each field goes through its own reader.
    """
    if type(raw) is not dict and not isinstance(raw, Mapping):
        raise _NoTaskId(f"task record is not an object (got {type(raw).__name__})")
    get = raw.get
    tid = _task_id(get("task_id"))
    if tid is None:
        raise _NoTaskId(f"task record has no usable task_id (got {_preview(get('task_id'))})")
    status, raw_status = _status(get("task_status"))
    msg, unit = get("task_status_msg"), get("final_unit_deduction")
    raw_created, raw_updated = get("created_at"), get("updated_at")
    created = _timestamp(raw_created)
    updated: datetime | None
    if type(raw_updated) is int and raw_updated == raw_created and created is not None:
        updated = created  # equal stamps (a task that never changed): one datetime, shared
    else:
        updated = _timestamp(raw_updated)
    return _new_task(
        tid, status,
        msg if type(msg) is str else ("" if msg is None else str(msg)),
        _external_id(get("task_info")),
        _voices(get("task_result")),
        created,
        updated,
        unit if type(unit) is str else (None if unit is None else _money(unit)),
        _balance(get("final_balance_deduction")),
        raw_status,
        None, None,
    )


converter.register_structure_hook(VoiceTask, _structure_task_record)
converter.register_structure_hook(Voice, _structure_voice)

# Looked up once: every task in every page goes through it.
_structure_task: Callable[[Any, type[VoiceTask]], VoiceTask] = \
    converter.get_structure_hook(VoiceTask)


def _unreadable(exc: BaseException, request_id: str | None,
                index: int | None) -> UnexpectedResponseError:
    where = f"task record #{index} of the page" if index is not None else "task record"
    reason = str(exc).removeprefix("task record ")
    return UnexpectedResponseError(f"unexpected {where}: {reason}", request_id=request_id)


def parse_task(raw: Any, *, request_id: str | None = None) -> VoiceTask:
    """Build a VoiceTask from one task object of the API.

    Odd fields fall back to defaults; only a record without a usable ``task_id`` (or not an
    object at all) raises UnexpectedResponseError.
    """
    try:
        return _structure_task(raw, VoiceTask)
    except (TypeError, ValueError, RecursionError) as exc:
        raise _unreadable(exc, request_id, None) from None


def parse_task_list(raw: Any, *, request_id: str | None = None) -> list[VoiceTask]:
    """Build every task of a list page.

    A record without a usable ``task_id`` fails the whole page with an error naming its index,
    rather than being skipped: a skipped record would be a task (and a billed voice) that
    ``iter_all`` never shows and that batch tracking reads as "gone", which could lead to a
    resend. A loud, retryable error loses nothing; a silent skip can.
    """
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise UnexpectedResponseError(
            f"expected an array of tasks, got {type(raw).__name__}", request_id=request_id)
    structure = _structure_task
    out = []
    for index, item in enumerate(raw):
        try:
            out.append(structure(item, VoiceTask))
        except (TypeError, ValueError, RecursionError) as exc:
            raise _unreadable(exc, request_id, index) from None
    return out


def parse_voices(raw: Any, *, request_id: str | None = None) -> list[Voice]:
    """Flatten ``data[*].task_result.voices[*]`` (the presets list) into Voice items.

    Only the voices matter here, so a record without a ``task_id`` still gives its voices; a
    record that is not an object at all fails the page, naming its index.
    """
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise UnexpectedResponseError(
            f"expected an array of tasks, got {type(raw).__name__}", request_id=request_id)
    out: list[Voice] = []
    for index, item in enumerate(raw):
        if type(item) is not dict and not isinstance(item, Mapping):
            raise _unreadable(_NoTaskId(f"task record is not an object (got "
                                        f"{type(item).__name__})"), request_id, index)
        out.extend(_voices(item.get("task_result")))
    return out
