"""Callbacks from Kling (``callback_url``): verify, parse, de-duplicate, hand over.

Kling POSTs the task record (without the envelope) on status changes; when a Webhook Secret is
set in the console it signs it with Standard Webhooks headers (kling-api.md §8.4). Callbacks are
hints: they may repeat, arrive out of order, or be forged if unsigned, so the receiver can
confirm each one with ``get()`` before your code acts on it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import hashlib
import hmac
import inspect
import json
import time
import warnings
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, cast

from ._aio import within
from ._constants import (
    CALLBACK_READ_TIMEOUT,
    CALLBACK_SHUTDOWN_GRACE,
    DEFAULT_TOLERANCE,
    MAX_CALLBACK_BYTES,
)
from ._decode import parse_task
from ._errors import (
    UnexpectedResponseError,
    ValidationError,
    VoiceAPIError,
    WebhookVerificationError,
)
from ._models import VoiceTask

if TYPE_CHECKING:  # aiohttp.web is only needed by receivers; keep `import voiceapi` light
    from aiohttp import web


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is not None:
        return value
    lowered = name.lower()
    for key, val in headers.items():
        if key.lower() == lowered:
            return val
    return None


def _secret_bytes(secret: str) -> bytes:
    try:
        key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
    except (binascii.Error, ValueError):
        raise WebhookVerificationError(
            "the webhook secret is not a valid whsec_ (base64) value") from None
    if not key:
        # An HMAC keyed with nothing is one anybody can compute: an empty secret (an unset
        # environment variable, say) must not turn verification into a formality.
        raise WebhookVerificationError("the webhook secret is empty")
    return key


def verify_signature(body: bytes, headers: Mapping[str, str], webhook_secret: str, *,
                     tolerance: float = DEFAULT_TOLERANCE, now: float | None = None) -> None:
    """Check Standard Webhooks headers; raises WebhookVerificationError when they do not match.

    Any one of several space-separated ``v1,`` signatures may match (key rotation). The
    comparison is constant-time; no message ever contains the secret or a signature.
    """
    wid = _header(headers, "webhook-id")
    ts = _header(headers, "webhook-timestamp")
    sigs = _header(headers, "webhook-signature")
    if not wid or not ts or not sigs:
        raise WebhookVerificationError("missing webhook-id, webhook-timestamp or "
                                       "webhook-signature header")
    # aiohttp hands undecodable header bytes over as lone surrogates, which encode() refuses;
    # the scheme's ids, timestamps and signatures are ASCII, so anything else is a forgery.
    if not (wid.isascii() and ts.isascii() and sigs.isascii()):
        raise WebhookVerificationError("webhook headers are not ASCII")
    try:
        stamp = int(ts)
    except ValueError:
        raise WebhookVerificationError("webhook-timestamp is not an integer") from None
    current = time.time() if now is None else now
    # Compared, not subtracted: ``current - stamp`` overflows a float for a huge timestamp.
    if not current - tolerance <= stamp <= current + tolerance:
        raise WebhookVerificationError("webhook-timestamp is outside the allowed window")
    key = _secret_bytes(webhook_secret)
    expected = base64.b64encode(hmac.new(key, f"{wid}.{stamp}.".encode() + body,
                                         hashlib.sha256).digest())
    for candidate in sigs.split():
        version, _, value = candidate.partition(",")
        if version == "v1" and hmac.compare_digest(value.encode(), expected):
            return
    raise WebhookVerificationError("no webhook signature matched")


def _from_new_standard(record: Mapping[str, Any]) -> dict[str, Any]:
    """Map the new-standard shape (``id``/``status``/``outputs``) onto the legacy record."""
    outputs = record.get("outputs") or []
    if not isinstance(outputs, list):
        raise WebhookVerificationError("callback outputs is not an array")
    voices = [{"voice_id": o.get("id"), "voice_name": o.get("name") or "",
               "trial_url": o.get("url") or "", "owned_by": o.get("owned_by") or "",
               "status": o.get("status")}
              for o in outputs if isinstance(o, Mapping) and o.get("type") == "voice"]
    out: dict[str, Any] = {"task_id": record.get("id"), "task_status": record.get("status"),
                           "task_status_msg": record.get("message") or "",
                           "task_result": {"voices": voices}}
    for src, dst in (("create_time", "created_at"), ("update_time", "updated_at")):
        if record.get(src) is not None:
            out[dst] = record[src]
    if record.get("external_id"):
        out["task_info"] = {"external_task_id": record["external_id"]}
    return out


def parse_callback(body: bytes, headers: Mapping[str, str], *,
                   webhook_secret: str | None = None,
                   tolerance: float = DEFAULT_TOLERANCE, now: float | None = None) -> VoiceTask:
    """Verify (when a secret is given) and parse one callback body into a VoiceTask.

    Accepts the legacy task record (``task_id``) and tolerates the new-standard shape (``id``);
    a body with both, or neither, is rejected.
    """
    if webhook_secret is not None:
        verify_signature(body, headers, webhook_secret, tolerance=tolerance, now=now)
    if len(body) > MAX_CALLBACK_BYTES:
        raise WebhookVerificationError("callback body is too large")
    try:
        record = json.loads(body)
    except (ValueError, RecursionError):
        raise WebhookVerificationError("callback body is not JSON") from None
    if not isinstance(record, dict):
        raise WebhookVerificationError("callback body is not a JSON object")
    legacy, modern = "task_id" in record, "id" in record
    if legacy == modern:
        raise WebhookVerificationError("callback body must have exactly one of task_id or id")
    try:
        return parse_task(record if legacy else _from_new_standard(record))
    except UnexpectedResponseError as exc:
        raise WebhookVerificationError(f"callback is not a task record: {exc}") from None


Listener = Callable[[VoiceTask], Awaitable[None] | None]
#: Re-reads a task by id from the API, e.g. ``client.custom_voices.get``.
Confirm = Callable[[str], Awaitable[VoiceTask]]
#: What ``confirm=`` takes: an async ``get``, or the sync client's (run in a worker thread).
ConfirmArg = Callable[[str], Awaitable[VoiceTask]] | Callable[[str], VoiceTask]


def _confirm_function(confirm: Any) -> Confirm | None:
    """``confirm=client.custom_voices.get``; a whole client still works, with a warning."""
    if confirm is None or inspect.iscoroutinefunction(confirm):
        return cast("Confirm | None", confirm)
    voices = getattr(confirm, "custom_voices", None)
    if voices is not None and inspect.iscoroutinefunction(getattr(voices, "get", None)):
        warnings.warn("CallbackReceiver(confirm=client) is deprecated: pass "
                      "confirm=client.custom_voices.get", DeprecationWarning, stacklevel=3)
        return cast("Confirm", voices.get)
    if callable(confirm):
        return _off_the_loop(confirm)
    raise ValidationError("confirm must be a coroutine function taking a task id, "
                    "e.g. client.custom_voices.get")


def _off_the_loop(confirm: Callable[[str], Any]) -> Confirm:
    """A plain function as ``confirm`` (the sync client's ``custom_voices.get``) runs in a
    worker thread: awaiting the VoiceTask it returns raised TypeError, a 500 for every
    callback, and calling it on the loop would stall every other callback for a request.
    One that returns an awaitable (a lambda around an async ``get``) is awaited, as before."""

    async def call(task_id: str) -> VoiceTask:
        result = await asyncio.to_thread(confirm, task_id)
        if inspect.isawaitable(result):
            result = await result
        return cast("VoiceTask", result)

    return call


class CallbackReceiver:
    """An aiohttp request handler: verify, parse, drop repeats (by ``webhook-id``), notify.

    ``app.router.add_post("/kling", receiver.handle)``. With
    ``confirm=client.custom_voices.get``, each update is re-read from the API and listeners
    get its answer. A ``webhook-id`` counts as delivered only once every listener returned:
    when confirming or a listener fails, the answer is an error and Kling's retry is handled
    like a first delivery, so the final update cannot be lost.
    """

    def __init__(self, *listeners: Listener, webhook_secret: str | None = None,
                 confirm: ConfirmArg | None = None, remember: int = 10_000) -> None:
        if webhook_secret is not None:
            # Checked now: a mistyped or empty secret otherwise surfaces only as every
            # callback answered 400 (Kling gives up on them) while the code looks fine.
            try:
                _secret_bytes(webhook_secret)
            except WebhookVerificationError as exc:
                raise ValidationError(str(exc)) from None
        self._listeners: list[tuple[Listener, asyncio.AbstractEventLoop | None]] = [
            (listener, None) for listener in listeners]
        self._secret = webhook_secret
        self._confirm = _confirm_function(confirm)
        self._delivered: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._in_progress: set[bytes] = set()
        self._remember = remember
        self.received = 0
        self.rejected = 0

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Add a listener; returns a function that removes it.

        Subscribed from inside an event loop, the listener is called on that loop even when
        the receiver serves on another (the sync client's ``create_many(callbacks=cb)`` runs
        on its own thread's loop: its listener poked that loop from the server's thread,
        which asyncio does not allow, and the batch slept through the callback).
        """
        entry = (listener, _running_loop())
        self._listeners.append(entry)

        def remove() -> None:
            for index, each in enumerate(self._listeners):
                if each is entry:
                    del self._listeners[index]
                    return

        return remove

    def _mark_delivered(self, wid: bytes) -> None:
        self._delivered[wid] = None
        if len(self._delivered) > self._remember:
            self._delivered.popitem(last=False)

    async def handle(self, request: web.Request) -> web.Response:
        from aiohttp import web

        try:
            body = await within(request.read(), CALLBACK_READ_TIMEOUT)
        except TimeoutError:
            self.rejected += 1
            return web.json_response({"error": "the callback body did not arrive in time"},
                                     status=408)
        try:
            task = parse_callback(body, request.headers, webhook_secret=self._secret)
        except WebhookVerificationError as exc:
            self.rejected += 1
            return web.json_response({"error": str(exc)}, status=400)
        self.received += 1
        wid = _delivery_key(_header(request.headers, "webhook-id"))
        if wid is not None:
            if wid in self._delivered:
                return web.json_response({"ok": True, "duplicate": True})
            if wid in self._in_progress:
                # The same delivery is being handled right now; its outcome is not known yet,
                # so ask the sender to come back rather than claim it was delivered.
                return web.json_response({"ok": False, "in_progress": True}, status=409)
            self._in_progress.add(wid)
        try:
            if self._confirm is not None:
                try:
                    task = await self._confirm(task.task_id)
                except VoiceAPIError:
                    return web.json_response({"ok": False}, status=503)  # Kling may retry
            await self.dispatch(task)
            if wid is not None:
                self._mark_delivered(wid)
        finally:
            if wid is not None:
                self._in_progress.discard(wid)
        return web.json_response({"ok": True})

    async def dispatch(self, task: VoiceTask) -> None:
        here = _running_loop()
        for listener, loop in list(self._listeners):
            if loop is not None and loop is not here and loop.is_running():
                # Run on the listener's own loop, and wait for it: a delivery counts as done
                # only once every listener returned.
                await asyncio.wrap_future(
                    asyncio.run_coroutine_threadsafe(_call(listener, task), loop))
            else:  # this loop, or one that is gone (subscribed in an asyncio.run() that ended)
                await _call(listener, task)


def _delivery_key(wid: str | None) -> bytes | None:
    """A ``webhook-id`` as remembered: its digest, so that an unsigned sender's 8 kB ids
    cannot make the ``remember`` memory hold 80 MB (32 bytes each, whatever they send)."""
    if not wid:
        return None
    return hashlib.sha256(wid.encode("utf-8", "surrogatepass")).digest()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


async def _call(listener: Listener, task: VoiceTask) -> None:
    result = listener(task)
    if inspect.isawaitable(result):
        await result


class CallbackServer:
    """A tiny standalone receiver (its own aiohttp server) for scripts and ``create_many``.

    ``async with CallbackServer(port=8080, public_url="https://me.example/kling") as cb:``
    then pass ``callback_url=cb.url`` (or ``callbacks=cb`` to ``create_many``).
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, path: str = "/kling-callback",
                 public_url: str | None = None, webhook_secret: str | None = None,
                 confirm: ConfirmArg | None = None) -> None:
        self.receiver = CallbackReceiver(webhook_secret=webhook_secret, confirm=confirm)
        self._host, self._port, self._path = host, port, path
        self._public_url = public_url
        self._runner: web.AppRunner | None = None
        self._bound_port: int | None = None

    @property
    def url(self) -> str:
        """The URL to give Kling as ``callback_url``."""
        if self._public_url:
            return self._public_url
        if self._bound_port is None:
            raise RuntimeError("the callback server is not running")
        # An IPv6 literal needs brackets in a URL ("http://::1:8080/" is not one).
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._bound_port}{self._path}"

    def subscribe(self, listener: Listener) -> Callable[[], None]:
        return self.receiver.subscribe(listener)

    async def start(self) -> None:
        from aiohttp import web

        if self._runner is not None:
            # A second runner would replace the first, whose socket stop() then never closes:
            # it kept serving (and leaked) after the server was "stopped".
            raise RuntimeError("the callback server is already running")
        app = web.Application(client_max_size=MAX_CALLBACK_BYTES)
        app.router.add_post(self._path, self.receiver.handle)
        runner = web.AppRunner(app, access_log=None, handle_signals=False,
                               shutdown_timeout=CALLBACK_SHUTDOWN_GRACE)
        await runner.setup()
        try:
            await web.TCPSite(runner, self._host, self._port).start()
        except BaseException:
            # e.g. the port is taken: ``async with`` calls no __aexit__ after a failed enter.
            await runner.cleanup()
            raise
        self._runner = runner
        self._bound_port = runner.addresses[0][1]

    async def stop(self) -> None:
        # Taken before the await: a second stop() meanwhile (a signal handler and an
        # ``async with`` exit) cleaned the same runner again, failing inside aiohttp.
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> CallbackServer:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()


__all__ = ["CallbackReceiver", "CallbackServer", "parse_callback", "verify_signature"]
