"""The error hierarchy. Every error the SDK raises on purpose derives from VoiceAPIError.

``str()`` of an API error always carries the business code, the server's message and the
request id, because that triple is what Kling support asks for.
"""

from __future__ import annotations

import re
from typing import Any, Protocol

# --- text from the server, made safe to show ------------------------------------------------
#
# Server messages, request ids and task texts end up in str(exc), logs and the CLI's terminal.
# A hostile or broken server (or a proxy in front of it) controls them, so before they are
# shown: a token the server echoes back ("invalid header Authorization: Bearer eyJ…") is
# masked, control characters (ANSI escapes, forged log lines), bidirectional controls (an
# U+202E shows the rest of a line reversed: a spoofed id or message) and lone surrogates (which
# make a UTF-8 log handler raise) are escaped, and the length is capped.
_BEARER = re.compile(r"(?i)\b(bearer)(\s+)[^\s\"',;]+")
# The look-behind lets a match start only where a token starts: without it "eyJeyJeyJ…" is
# scanned from every "eyJ" in it, which is quadratic (120 kB took 8 s).
JWT_TOKEN = re.compile(r"(?<![A-Za-z0-9_-])eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")
#: Bidirectional controls ("Trojan Source", CVE-2021-42574): an U+202E in a voice name
#: reverses the rest of its line on screen, so an id or a status after it reads otherwise.
BIDI_CONTROLS = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_UNSHOWABLE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")
#: Longest server text kept in an error; a real Kling message is one short sentence.
SERVER_TEXT_MAX = 1000
#: Longer than any token we send (a JWT is ~200 characters): a token the cut splits is seen whole.
_TOKEN_MARGIN = 2000


def escape_char(match: re.Match[str]) -> str:
    """A matched character as ``\\xNN`` / ``\\uNNNN``."""
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


#: A credential shorter than this is not masked by its literal text (it would blank out
#: ordinary words); real keys and tokens are far longer.
SECRET_MIN_CHARS = 8


class SentCredential:
    """The Authorization header a request carried, to mask in what the server says back: a
    server may echo the API key without the "Bearer" that the patterns recognise.

    Its repr never shows the value, so a traceback with locals does not either.
    """

    __slots__ = ("_header",)

    def __init__(self, header: str | None) -> None:
        self._header = header or ""

    def mask(self, text: str) -> str:
        token = self._header.partition(" ")[2].strip() or self._header
        return text.replace(token, "***") if len(token) >= SECRET_MIN_CHARS else text

    def __repr__(self) -> str:
        return "SentCredential(***)"


def printable(text: str, limit: int = SERVER_TEXT_MAX,
              sent: SentCredential | None = None) -> str:
    """Server text made safe for ``str(exc)``, logs and terminals (see above); ``sent``: the
    credential the request carried, masked wherever it appears."""
    size = len(text)
    # Masked before the final cut, so a token split by it is still masked as a whole; the
    # first cut keeps the work bounded whatever the server sent.
    text = text[:limit + _TOKEN_MARGIN]
    if sent is not None:
        text = sent.mask(text)
    text = JWT_TOKEN.sub("***", _BEARER.sub(r"\1\2***", text))
    if size > limit:
        text = f"{text[:limit]}… ({size - limit} more characters)"
    return _UNSHOWABLE.sub(escape_char, text)


def _rebuild(cls: type[VoiceAPIError], args: tuple[Any, ...],
             state: dict[str, Any]) -> VoiceAPIError:
    """Unpickle without calling ``__init__`` (whose keyword-only arguments pickle cannot see)."""
    exc = cls.__new__(cls)
    Exception.__init__(exc, *args)
    exc.__dict__.update(state)
    return exc


class VoiceAPIError(Exception):
    """Base of every error the SDK raises on purpose.

    ``http_status`` and ``request_id`` live here (None when there is no answer, e.g. a
    ValidationError), so code that logs or reports an error never needs isinstance chains.
    """

    http_status: int | None = None
    request_id: str | None = None

    def __init__(self, *args: Any, http_status: int | None = None,
                 request_id: str | None = None) -> None:
        super().__init__(*args)
        self.http_status = http_status
        self.request_id = request_id

    def __reduce__(self) -> tuple[Any, ...]:
        # Errors cross process boundaries (multiprocessing, concurrent.futures); the default
        # reduce would call __init__(*args) and lose or break the keyword-only attributes.
        return _rebuild, (type(self), self.args, dict(self.__dict__))


def drop_foreign_context(exc: BaseException) -> None:
    """Unlink, along ``exc``'s chain, every ``__context__`` that is not one of ours.

    Python 3.10 can still count an exception that aiohttp caught inside its own coroutine as
    being handled in ours, and chains it to the next error we raise: it may quote the
    answer's bytes (a reflected token) or carry the request's headers. Every link the SDK
    means to show is one of its own errors.
    """
    seen: set[int] = set()
    stack = [exc]
    while stack:  # bounded: each error of the chain is visited once
        error = stack.pop()
        if id(error) in seen:
            continue
        seen.add(id(error))
        if error.__context__ is not None and not isinstance(error.__context__, VoiceAPIError):
            error.__context__ = None
        stack += [link for link in (error.__cause__, error.__context__)
                  if isinstance(link, VoiceAPIError)]


class ValidationError(VoiceAPIError, ValueError):
    """Bad input caught before any request was sent."""


class ClientClosedError(VoiceAPIError, RuntimeError):
    """The client was used after ``aclose()``/``close()``."""


class APIError(VoiceAPIError):
    """The server answered with a non-zero business code (or an error HTTP status)."""

    def __init__(
        self,
        message: str,
        *,
        code: int | None = None,
        http_status: int | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message, http_status=http_status, request_id=request_id)
        self.message = message
        self.code = code

    def __str__(self) -> str:
        parts = [f"code={self.code}" if self.code is not None else None,
                 f"http={self.http_status}" if self.http_status is not None else None,
                 f"request_id={self.request_id}" if self.request_id else None]
        suffix = ", ".join(p for p in parts if p)
        return f"{self.message} ({suffix})" if suffix else self.message

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(message={self.message!r}, code={self.code!r}, "
                f"http_status={self.http_status!r}, request_id={self.request_id!r})")


class AuthenticationError(APIError):
    """1000–1004: the credential is missing, wrong, not yet valid or expired.

    ``server_time`` is the server's clock (from its ``Date`` header) when it answered, so a
    token refused as not-yet-valid or expired can be re-signed on the server's time.
    """

    def __init__(self, message: str, *, server_time: float | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.server_time = server_time


class PermissionDeniedError(APIError):
    """1103: the account may not use this API or resource."""


class AccountError(APIError):
    """1100–1102: account status, arrears, or resource pack used up."""


class InvalidRequestError(APIError):
    """1200–1203: bad parameters, wrong method, unknown resource (incl. task not found)."""


class ConflictError(InvalidRequestError):
    """A caller-supplied ``external_task_id`` is already used by another task of the account.

    ``existing_task_id`` is that task's id when a lookup found it (None if it could not be read).
    Only raised for an id *you* chose; the SDK's own ids are reconciled, never raised.
    """

    def __init__(self, message: str, *, existing_task_id: str | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.existing_task_id = existing_task_id


class PolicyError(APIError):
    """1300, 1301, 1304: blocked by platform, content-safety or IP-whitelist policy."""


class RateLimitError(APIError):
    """1302 (rate) and 1303 (too many tasks in progress). Safe to retry after ``retry_after``."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class ServerError(APIError):
    """5000–5002, and non-JSON 5xx answers from proxies in front of the API."""


class APIConnectionError(VoiceAPIError):
    """The request did not get an answer: DNS failure, refused, reset, broken body.

    ``http_status`` is set only when a proxy refused the tunnel (e.g. 407): it is the proxy's.
    """

    def __init__(self, message: str, *, maybe_sent: bool = True, **kw: Any) -> None:
        super().__init__(message, **kw)
        # False only when we know nothing reached the server (connect refused / DNS):
        # then even a create may be resent without looking it up first.
        self.maybe_sent = maybe_sent


class APITimeoutError(APIConnectionError):
    """No complete answer within the per-attempt timeout."""


class UnexpectedResponseError(VoiceAPIError):
    """A 2xx answer that is not a valid envelope, or data of an unexpected shape.

    ``http_status`` and ``request_id`` are the base class's.
    """


class _TaskLike(Protocol):
    """What the task-carrying errors read from a task.

    Errors sit below the models in the layer order, so they cannot name ``VoiceTask``; at
    run time ``.task`` is always a ``VoiceTask``.
    """

    @property
    def task_id(self) -> str: ...

    @property
    def task_status_msg(self) -> str: ...

    @property
    def task_status(self) -> object: ...


class TaskFailedError(VoiceAPIError):
    """A voice task ended in ``failed``; ``.task`` is the final task (a ``VoiceTask``)."""

    #: A ``VoiceTask``; typed loosely because errors may not import the models (layering).
    task: Any

    def __init__(self, task: _TaskLike, *, sent: SentCredential | None = None) -> None:
        # ``sent``: the client's credential. A server may echo it in a task's text, which
        # the envelope's masking never saw (it is data, kept as sent in ``.task``).
        msg = printable(task.task_status_msg or "no reason given", sent=sent)
        super().__init__(f"voice task {printable(task.task_id, 200, sent)} failed: {msg}")
        self.task = task


class WaitTimeoutError(VoiceAPIError, TimeoutError):
    """``wait()`` ran out of time; ``.task`` is the last task seen (None if none was seen)."""

    #: A ``VoiceTask`` or None; typed loosely because errors may not import the models.
    task: Any

    def __init__(self, task_id: str, timeout: float, task: _TaskLike | None) -> None:
        status = str(task.task_status) if task is not None else "unknown"
        raw = getattr(task, "raw_status", None)
        if isinstance(raw, str) and raw != status:  # e.g. "unknown (queued)": say what it was
            status = f"{status} ({printable(raw, 40)})"
        super().__init__(f"voice task {printable(task_id, 200)} not finished after {timeout:g}s "
                         f"(last status: {status})")
        self.task_id = task_id
        self.timeout = timeout
        self.task = task


class WebhookVerificationError(VoiceAPIError):
    """A callback failed signature or timestamp verification, or is not a task record."""


class EventLoopError(VoiceAPIError, RuntimeError):
    """A client's session was used from an event loop other than the one that created it."""
