"""A local emulator of the Kling Custom Voice API (kling-api.md §10), on a real loopback socket.

It deliberately shares nothing with the SDK's models, converter or error table: its answers are
plain JSON written from the API notes, so a decoding bug in the SDK cannot be mirrored here.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import functools
import hashlib
import heapq
import hmac
import io
import json
import math
import random
import re
import secrets
import struct
import threading
import time
import traceback
import urllib.parse
import uuid
import wave
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import aiohttp
import attrs
import jwt
from aiohttp import web

from ._options import check_number, options_from_args, resolve_readings

# The emulator's own view of Kling's error table (kling-api.md §6.1): code -> (HTTP, message).
_ERRORS: dict[int, tuple[int, str]] = {
    1000: (401, "Authentication failed"),
    1001: (401, "Authorization is empty"),
    1002: (401, "Authorization is invalid"),
    1003: (401, "Authorization is not yet valid"),
    1004: (401, "Authorization has expired"),
    1100: (429, "Account exception"),
    1101: (429, "Account in arrears"),
    1102: (429, "Account balance not enough"),
    1103: (403, "No permission to access the requested resource"),
    1200: (400, "Invalid request parameters"),
    1201: (400, "Invalid parameter"),
    1202: (404, "Invalid request method"),
    1203: (404, "Requested resource does not exist"),
    1300: (400, "Trigger platform strategy"),
    1301: (400, "Trigger the content security policy of the platform"),
    1302: (429, "The API request is too fast, please slow down the request rate"),
    1303: (429, "parallel task over resource pack limit"),
    1304: (429, "Trigger the IP whitelisting policy"),
    5000: (500, "Internal server error"),
    5001: (503, "Service temporarily unavailable"),
    5002: (504, "Server internal timeout"),
}

ROUTES = ("create", "get", "list", "presets", "delete")
FAULTS = ("reset", "slow", "garbage", "truncated", "html502", "commit_then_5000",
          "commit_then_drop")
#: Internal errors kept per emulator (a bug hit in a loop must not fill the memory).
MAX_INTERNAL_ERRORS = 100
#: The ``code`` recorded (and counted in stats) for a request whose connection was dropped
#: without an answer.
DROPPED = "dropped"
_BASE = "/v1/general"
#: The emulator's own inspection route (not part of the Kling API).
STATS_PATH = "/_emulator/stats"
#: Seconds a stopping emulator lets in-flight answers finish (a ``slow`` fault may hold one for
#: long; a server going away drops it, and SIGTERM to the standalone runner stays prompt).
_SHUTDOWN_GRACE = 0.5
_MEDIA_EXTS = (".mp3", ".wav", ".mp4", ".mov")
_FETCH_FAILED = "Something went wrong when we tried to get the contents of the file."
_PRESET_NAMES = (
    "Warm Narrator", "Bright Host", "Calm Teacher", "Deep Trailer", "Friendly Guide",
    "News Anchor", "Storyteller", "Young Hero", "Wise Elder", "Cheerful Kid", "Radio DJ",
    "Soft Whisper", "Sports Caster", "Noir Detective", "Game Announcer", "Gentle Nurse",
)


class _Fault:
    __slots__ = ("delay", "kind", "retry_after", "times")

    def __init__(self, kind: str, times: int, delay: float, retry_after: float | None) -> None:
        self.kind, self.times, self.delay, self.retry_after = kind, times, delay, retry_after


class RecordedRequest:
    """What the emulator saw and answered.

    ``status`` is 0 while the request is still being answered, and stays 0 (with ``code``
    ``"dropped"``) when a fault dropped the connection without an answer.
    """

    __slots__ = ("code", "external_task_id", "method", "path", "route", "status")

    def __init__(self, method: str, path: str, route: str, status: int,
                 code: int | str | None, external_task_id: str | None) -> None:
        self.method, self.path, self.route = method, path, route
        self.status, self.code, self.external_task_id = status, code, external_task_id

    def __repr__(self) -> str:
        return f"<{self.method} {self.path} -> {self.status}/{self.code}>"


@attrs.define(slots=True)
class _Task:
    task_id: str
    voice_id: str
    voice_name: str
    voice_url: str | None
    video_id: str | None
    callback_url: str | None
    external_task_id: str | None
    created: float
    processing_at: float
    done_at: float
    fail_msg: str
    deleted: bool = False
    notified: str = ""

    def status(self, now: float) -> str:
        if now >= self.done_at:
            return "failed" if self.fail_msg else "succeed"
        return "processing" if now >= self.processing_at else "submitted"


class _Dropped(Exception):
    """Abort the connection without answering (faults ``reset`` and ``commit_then_drop``)."""

    def __init__(self, request: web.Request, ext: str | None) -> None:
        super().__init__("connection dropped by the emulator")
        if request.transport is not None:
            request.transport.abort()
        self.ext = ext


class _ApiError(Exception):
    def __init__(self, code: int, message: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message or _ERRORS[code][1]
        self.headers = headers or {}


def make_wav(seconds: float, rate: int = 8000) -> bytes:
    """A mono 16-bit WAV tone of the given length (the emulator's "voice sample")."""
    frames = int(seconds * rate)
    tone = [int(8000 * math.sin(2 * math.pi * 220 * i / rate)) for i in range(min(frames, rate))]
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        chunk = struct.pack(f"<{len(tone)}h", *tone) if tone else b""
        whole, rest = divmod(frames, rate)
        w.writeframes(chunk * whole + chunk[: rest * 2])
    return buf.getvalue()


@functools.lru_cache(maxsize=16)
def _cached_wav(seconds: float) -> bytes:
    """Samples by duration; bounded, so requests for many names cannot fill the memory."""
    return make_wav(seconds)


def wav_seconds(data: bytes) -> float:
    with wave.open(io.BytesIO(data), "rb") as w:
        return w.getnframes() / float(w.getframerate())


def sign_webhook(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """Standard Webhooks signature: ``v1,`` + base64(HMAC-SHA256(key, id.ts.body))."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{webhook_id}.{timestamp}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


class KlingEmulator:
    """An in-process Kling Custom Voice server on loopback.

    ``async with KlingEmulator() as emu`` on the current loop, or ``with KlingEmulator() as emu``
    on a background thread (for sync code). Give the SDK ``emu.base_url`` and either
    ``emu.access_key``/``emu.secret_key`` or ``emu.api_key``.

    Samples: ``emu.sample_url(seconds)`` serves a real WAV whose duration the emulator reads; a
    sample outside 5–30 s makes a ``failed`` task. Other URLs are not fetched: a ``-12s`` token
    in the file name sets their duration (default 10 s), ``noisy`` / ``multi-speaker`` /
    ``unreachable`` in the URL make the task fail, and ``?kling_fail=<message>`` fails it with
    that message.
    """

    def __init__(
        self,
        *,
        concurrency: int = 5,
        task_seconds: float = 0.2,
        processing_after: float | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        access_key: str = "emulator-access-key",
        secret_key: str | None = None,
        api_key: str | None = None,
        account_id: str = "100000000001",
        presets: int = 48,
        profile: str | None = None,
        strict_auth: bool | None = None,
        reject_both_sources: bool = True,
        unique_voice_names: bool = False,
        max_page_size: int | None = None,
        list_order: str | None = None,
        deleted_voices: str | None = None,
        voice_status: bool | None = None,
        numeric_money: bool | None = None,
        unique_external_ids: bool | None = None,
        check_url_extension: bool | None = None,
        pending_voices: str | None = None,
        webhook_secret: str | None = None,
        callback_retries: int = 0,
        qps: float | None = None,
        max_body_bytes: int = 64 * 1024,
        max_recorded_requests: int = 100_000,
        seed: int = 0,
    ) -> None:
        # Reading options left as None take the profile's value, else the built-in default.
        readings = resolve_readings(profile, {
            "strict_auth": strict_auth, "max_page_size": max_page_size,
            "list_order": list_order, "deleted_voices": deleted_voices,
            "voice_status": voice_status, "numeric_money": numeric_money,
            "unique_external_ids": unique_external_ids,
            "check_url_extension": check_url_extension, "pending_voices": pending_voices})
        check_number("concurrency", concurrency, minimum=1, integer=True)
        check_number("port", port, minimum=0, integer=True)
        if port > 65535:  # else an OverflowError traceback from bind() at start
            raise ValueError(f"port must be an int from 0 to 65535, got {port!r}")
        check_number("task_seconds", task_seconds, minimum=0)
        check_number("processing_after", processing_after, minimum=0, allow_none=True)
        check_number("presets", presets, minimum=0, integer=True)
        check_number("callback_retries", callback_retries, minimum=0, integer=True)
        check_number("qps", qps, minimum=0, allow_none=True)
        check_number("max_body_bytes", max_body_bytes, minimum=1, integer=True)
        check_number("max_recorded_requests", max_recorded_requests, minimum=0, integer=True)
        self.profile = profile
        self.concurrency = concurrency
        self.task_seconds = task_seconds
        self.processing_after = (task_seconds * 0.25 if processing_after is None
                                 else processing_after)
        self.host, self._port = host, port
        self.access_key = access_key
        self.secret_key = secret_key or secrets.token_urlsafe(24)
        self.api_key = api_key or "emu-" + secrets.token_urlsafe(24)
        self.account_id = account_id
        self.strict_auth: bool = readings["strict_auth"]
        self.max_page_size: int = readings["max_page_size"]
        self.list_order: str = readings["list_order"]
        self.deleted_voices: str = readings["deleted_voices"]
        self.voice_status: bool = readings["voice_status"]
        self.numeric_money: bool = readings["numeric_money"]
        self.unique_external_ids: bool = readings["unique_external_ids"]
        self.check_url_extension: bool = readings["check_url_extension"]
        self.pending_voices: str = readings["pending_voices"]
        self.reject_both_sources = reject_both_sources
        self.unique_voice_names = unique_voice_names
        self.webhook_secret = webhook_secret
        self.callback_retries = callback_retries
        self.qps = qps
        self.max_body_bytes = max_body_bytes
        self.ineligible_video_ids: set[str] = set()

        self._rng = random.Random(seed)
        self._next_id = 930801301486305328 + self._rng.randrange(10**9)
        self._offset = 0.0
        self._mono0 = time.monotonic()
        self._wall0 = time.time()
        self._tasks: dict[str, _Task] = {}
        self._order: list[str] = []
        self._by_ext: dict[str, str] = {}
        self._ext_counts: collections.Counter[str] = collections.Counter()
        # Exact totals that survive the bounded request log: arrivals by route, answers by
        # (route, code) — code None for answers without a JSON envelope.
        self._arrivals: collections.Counter[str] = collections.Counter()
        self._answers: collections.Counter[tuple[str, int | str | None]] = (
            collections.Counter())
        self._voices: dict[str, str] = {}  # voice_id -> task_id
        self._names: set[str] = set()
        self._active: list[tuple[float, str]] = []  # heap of (done_at, task_id)
        self._callback_pending: set[str] = set()
        self._faults: dict[str, collections.deque[_Fault]] = collections.defaultdict(
            collections.deque)
        self._qps_window: collections.deque[float] = collections.deque()
        # Newest last; bounded so a long-running mock-server does not grow without end.
        self.requests: collections.deque[RecordedRequest] = collections.deque(
            maxlen=max_recorded_requests)
        self.callbacks: list[dict[str, Any]] = []
        #: Tracebacks of unexpected exceptions inside the emulator (its own bugs), oldest
        #: first, at most ``MAX_INTERNAL_ERRORS``. The request still gets a 5000 envelope, but
        #: the pytest fixtures fail the test at teardown so such a bug is never hidden by a
        #: client that retries 5000.
        self.internal_errors: list[str] = []
        self.peak_in_progress = 0
        self._presets = [self._make_preset(i) for i in range(presets)]

        self._runner: web.AppRunner | None = None
        self._site_port: int | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._cb_session: aiohttp.ClientSession | None = None
        self._cb_round: asyncio.Lock | None = None  # one delivery round at a time (start())
        self._cb_rounds: set[asyncio.Task[None]] = set()  # deliver_callbacks() rounds, for stop()
        self._thread: threading.Thread | None = None
        self._thread_loop: asyncio.AbstractEventLoop | None = None
        self._lock = threading.Lock()

    @staticmethod
    def options_from_args(argv: Sequence[str] | None = None) -> dict[str, Any]:
        """Keyword arguments for ``KlingEmulator`` from command-line flags (``--port 0
        --max-page-size 500 --profile strict-real`` …); see ``python -m voiceapi.testing -h``."""
        return options_from_args(argv)

    # --- lifecycle -------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        if self._site_port is None:
            raise RuntimeError("the emulator is not running")
        return f"http://{self.host}:{self._site_port}"

    @property
    def port(self) -> int:
        return self._site_port if self._site_port is not None else self._port

    async def start(self) -> None:
        app = web.Application(client_max_size=self.max_body_bytes)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        runner = web.AppRunner(app, access_log=None, handle_signals=False,
                               shutdown_timeout=_SHUTDOWN_GRACE)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self._port)
        try:
            await site.start()
        except BaseException:  # e.g. the port is taken: leave nothing half-started behind
            await runner.cleanup()
            raise
        self._runner = runner
        server = site._server
        assert isinstance(server, asyncio.base_events.Server)
        self._site_port = server.sockets[0].getsockname()[1]
        self._cb_round = asyncio.Lock()
        self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def stop(self) -> None:
        self._cb_round = None  # no delivery round starts from now on
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        # A deliver_callbacks() round still sending (to a receiver that hangs, say) ends here:
        # left running it would open a fresh session after ours closed, and in `with` mode its
        # caller would wait forever on a loop that is about to close.
        rounds = list(self._cb_rounds)
        for task in rounds:
            task.cancel()
        await asyncio.gather(*rounds, return_exceptions=True)
        if self._cb_session is not None:
            await self._cb_session.close()
            self._cb_session = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> KlingEmulator:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    def __enter__(self) -> KlingEmulator:
        """Run on a background thread with its own loop (for sync tests and scripts)."""
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._thread_loop = loop
            try:
                loop.run_until_complete(self.start())
            except BaseException as exc:  # report start-up failure to the caller
                errors.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.stop())
            _cancel_leftovers(loop)
            loop.close()

        self._thread = threading.Thread(target=run, name="kling-emulator", daemon=True)
        self._thread.start()
        if not ready.wait(30):
            raise RuntimeError("the emulator did not start within 30 s")
        if errors:
            raise errors[0]
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        loop, thread = self._thread_loop, self._thread
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(30)
        self._thread = self._thread_loop = None

    # --- controls and inspection ----------------------------------------------------------

    def now(self) -> float:
        """The emulator clock (monotonic seconds, plus any :meth:`advance`)."""
        return time.monotonic() + self._offset

    def advance(self, seconds: float) -> None:
        """Move the task clock forward: tasks progress as if ``seconds`` had passed."""
        with self._lock:
            self._offset += seconds

    def _now_ms(self, mono: float) -> int:
        return int((self._wall0 + (mono - self._mono0)) * 1000)

    def _wall_now(self) -> float:
        return self._wall0 + (self.now() - self._mono0)

    def sample_url(self, seconds: float = 10.0, *, ext: str = "wav") -> str:
        """A URL on this emulator serving a real WAV of that duration."""
        return f"{self.base_url}/samples/voice-{seconds:g}s.{ext}"

    def inject(self, route: str, kind: str | int, *, times: int = 1, delay: float = 1.0,
               retry_after: float | None = None) -> None:
        """Script a fault for the next ``times`` requests to ``route`` (or ``"*"``).

        ``kind``: a Kling error code (e.g. 5000, 1302, 1303, 1102), or one of ``reset`` (drop
        the connection before any work), ``slow`` (do the work, answer after ``delay`` s),
        ``garbage``, ``truncated``, ``html502``, ``commit_then_5000`` (the create lands but
        the answer is an error) and ``commit_then_drop`` (the create lands, then the
        connection is dropped without an answer; counted with code ``"dropped"``).
        """
        kind = str(kind)
        if route != "*" and route not in ROUTES:
            raise ValueError(f"unknown route {route!r}; one of {ROUTES} or '*'")
        if kind not in FAULTS and not (kind.isdigit() and int(kind) in _ERRORS):
            raise ValueError(f"unknown fault {kind!r}")
        # times=0 still fired once, and a NaN delay broke the handler it was meant to slow.
        check_number("times", times, minimum=1, integer=True)
        check_number("delay", delay, minimum=0)
        check_number("retry_after", retry_after, minimum=0, allow_none=True)
        if not math.isfinite(delay) or (retry_after is not None
                                        and not math.isfinite(retry_after)):
            raise ValueError("delay and retry_after must be finite")
        with self._lock:
            self._faults[route].append(_Fault(kind, times, delay, retry_after))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def count(self, route: str | None = None, *, code: int | str | None = None) -> int:
        """Requests received, optionally for one route and/or answered with one code.

        Kept as counters, not read from :attr:`requests`, so the answer stays exact after the
        bounded request log has dropped old entries.
        """
        with self._lock:
            if code is None:
                return (sum(self._arrivals.values()) if route is None
                        else self._arrivals[route])
            return sum(n for (r, c), n in self._answers.items()
                       if c == code and (route is None or r == route))

    def stats(self) -> dict[str, Any]:
        """What the server saw, as JSON-ready data (also served at ``GET /_emulator/stats``).

        ``tasks_per_external_id`` is a histogram {tasks per id: ids}, so ``{"1": 300}`` proves
        300 voices were each created once; ``repeated_external_ids`` names the ids with more.
        """
        with self._lock:
            by_route_code: dict[str, dict[str, int]] = {}
            for (route, code), n in sorted(self._answers.items(), key=str):
                by_route_code.setdefault(route, {})[str(code)] = n
            histogram = collections.Counter(self._ext_counts.values())
            return {
                "requests": sum(self._arrivals.values()),
                "by_route": dict(sorted(self._arrivals.items())),
                "by_route_code": by_route_code,
                "in_progress": self._prune_active(self.now()),
                "peak_in_progress": self.peak_in_progress,
                "task_count": len(self._order),
                "tasks_per_external_id": {str(k): histogram[k] for k in sorted(histogram)},
                "repeated_external_ids": sorted(e for e, n in self._ext_counts.items() if n > 1),
            }

    def in_progress(self) -> int:
        with self._lock:
            return self._prune_active(self.now())

    @property
    def task_count(self) -> int:
        return len(self._order)

    def tasks(self) -> list[dict[str, Any]]:
        """Every task as the API would show it, oldest first."""
        now = self.now()
        with self._lock:
            return [self._task_json(self._tasks[t], now) for t in self._order]

    def tasks_by_name(self, voice_name: str) -> list[dict[str, Any]]:
        return [t for t in self.tasks()
                if self._tasks[t["task_id"]].voice_name == voice_name]

    def tasks_by_external_id(self, external_task_id: str) -> list[dict[str, Any]]:
        return [t for t in self.tasks()
                if t.get("task_info", {}).get("external_task_id") == external_task_id]

    def preset_ids(self) -> list[str]:
        return [p["task_result"]["voices"][0]["voice_id"] for p in self._presets]

    def internal_error_report(self) -> str | None:
        """The emulator's own errors as one message (None when there were none): what the
        fixtures fail a test with."""
        errors = list(self.internal_errors)
        if not errors:
            return None
        return (f"the Kling emulator hit {len(errors)} internal error(s) (a bug in the "
                "emulator, answered as 5000):\n\n" + "\n".join(errors))

    def _record_internal_error(self, where: str) -> None:
        """Keep the current exception's traceback (called from an ``except`` block)."""
        if len(self.internal_errors) < MAX_INTERNAL_ERRORS:
            self.internal_errors.append(f"{where}:\n{traceback.format_exc()}")

    # --- internals --------------------------------------------------------------------------

    def _new_id(self) -> str:
        self._next_id += self._rng.randrange(1, 10**6)
        return str(self._next_id)

    def _make_preset(self, i: int) -> dict[str, Any]:
        name = _PRESET_NAMES[i % len(_PRESET_NAMES)]
        if i >= len(_PRESET_NAMES):
            name = f"{name} {i // len(_PRESET_NAMES) + 1}"
        vid = str(829877809978941442 + i * 7919)
        ms = 1722769557708 + i
        return {"task_id": str(856607216122601495 + i * 104729), "task_status": "succeed",
                "task_status_msg": "", "created_at": ms, "updated_at": ms,
                "task_result": {"voices": [{
                    "voice_id": vid, "voice_name": name, "owned_by": "kling",
                    "trial_url": f"https://emulator.invalid/presets/{vid}.wav"}]}}

    def _prune_active(self, now: float) -> int:
        active = self._active
        while active and active[0][0] <= now:
            heapq.heappop(active)
        return len(active)

    def _task_json(self, t: _Task, now: float) -> dict[str, Any]:
        status = t.status(now)
        changed = t.done_at if status in ("succeed", "failed") else (
            t.processing_at if status == "processing" else t.created)
        voices = []
        if status == "succeed" and not (t.deleted and self.deleted_voices == "drop"):
            voice = {"voice_id": t.voice_id, "voice_name": t.voice_name,
                     "trial_url": f"{self._trial_base()}/trial/{t.voice_id}.wav",
                     "owned_by": self.account_id}
            if self.voice_status:
                voice["status"] = "deleted" if t.deleted else "succeed"
            voices.append(voice)
        # numeric_money plays a server that sends money as numbers and times as digit strings.
        stamp: Any = str if self.numeric_money else int
        out: dict[str, Any] = {
            "task_id": t.task_id, "task_status": status,
            "task_status_msg": t.fail_msg if status == "failed" else "",
            "task_info": ({"external_task_id": t.external_task_id}
                          if t.external_task_id else {}),
            "task_result": {"voices": voices},
            "created_at": stamp(self._now_ms(t.created)),
            "updated_at": stamp(self._now_ms(changed)),
        }
        if status != "succeed" and self.pending_voices != "empty":
            # "Empty or absent until succeed" (kling-api.md §4.2): play the other shapes too.
            if self.pending_voices == "absent":
                del out["task_result"]
            else:
                out["task_result"] = {"voices": None}
        if status in ("succeed", "failed"):
            units = "0.05" if status == "succeed" else "0"
            if self.numeric_money:
                out["final_unit_deduction"] = float(units)
                out["final_balance_deduction"] = {"quota": 0, "list_price": 0}
            else:
                out["final_unit_deduction"] = units
                out["final_balance_deduction"] = {"quota": "0", "list_price": "0"}
        return out

    def _trial_base(self) -> str:
        return self.base_url if self._site_port is not None else "http://emulator.invalid"

    def _sample(self, name: str) -> bytes | None:
        m = re.fullmatch(r"[\w.-]*?(\d+(?:\.\d+)?)s\.(wav|mp3|mp4|mov)", name)
        if not m or float(m.group(1)) > 120:
            return None
        return _cached_wav(float(m.group(1)))

    def _media_failure(self, voice_url: str | None, video_id: str | None) -> str:
        """Why the sample is unusable ("" when it is fine): these become failed tasks."""
        if video_id is not None:
            if video_id in self.ineligible_video_ids:
                return ("The video is not eligible: it must be made by V2.6 with sound on, "
                        "the Avatar API or the Lip-Sync API")
            return ""
        assert voice_url is not None
        parsed = urllib.parse.urlsplit(voice_url)
        forced = urllib.parse.parse_qs(parsed.query).get("kling_fail")
        if forced:
            return forced[0]
        low = voice_url.lower()
        if "unreachable" in low:
            return _FETCH_FAILED
        if "noisy" in low or "multi-speaker" in low:
            return "The audio must contain exactly one clean human voice with no noise"
        name = urllib.parse.unquote(parsed.path.rsplit("/", 1)[-1])
        own = parsed.port == self._site_port and parsed.hostname in ("127.0.0.1", "localhost",
                                                                      self.host)
        if own and parsed.path.startswith("/samples/"):
            data = self._sample(name)
            if data is None:
                return _FETCH_FAILED
            try:
                seconds = wav_seconds(data)
            except (wave.Error, EOFError):
                return "The audio could not be decoded"
        else:
            ext = name.lower().rpartition(".")[2] if "." in name else ""
            if ext and "." + ext not in _MEDIA_EXTS:
                # Reached only without check_url_extension: the media, not the URL, is judged.
                return "The file format is not supported: use mp3, wav, mp4 or mov"
            # "-12s.wav"; without an extension only a separated token ("clip-12s") counts, so
            # a random CDN key ending in digits and "s" is not read as a duration.
            m = re.search(r"(\d+(?:\.\d+)?)s\.[a-z0-9]+$" if ext else
                          r"(?:^|[-_])(\d+(?:\.\d+)?)s$", name.lower())
            seconds = float(m.group(1)) if m else 10.0
        if not 5.0 <= seconds <= 30.0:
            return f"The audio must be between 5s and 30s long; this one is {seconds:g}s"
        return ""

    def _take_fault(self, route: str) -> _Fault | None:
        with self._lock:
            for key in (route, "*"):
                queue = self._faults.get(key)
                if queue:
                    fault = queue[0]
                    fault.times -= 1
                    if fault.times <= 0:
                        queue.popleft()
                    return fault
        return None

    @staticmethod
    def _envelope(code: int, message: str, data: Any = None, *, with_data: bool) -> bytes:
        body: dict[str, Any] = {"code": code, "message": message,
                                "request_id": str(uuid.uuid4())}
        if with_data:
            body["data"] = data
        return json.dumps(body, separators=(",", ":")).encode()

    def _error_response(self, err: _ApiError) -> web.Response:
        status = _ERRORS.get(err.code, (400, ""))[0]
        return web.Response(status=status, body=self._envelope(err.code, err.message,
                                                               with_data=False),
                            content_type="application/json", headers=err.headers)

    # --- HTTP -------------------------------------------------------------------------------

    def _route_of(self, method: str, path: str) -> tuple[str, str | None]:
        """(route, path id); raises 1202 for a known path with the wrong method, 1203 else."""
        if path == f"{_BASE}/custom-voices":
            routes = {"POST": "create", "GET": "list"}
        elif path.startswith(f"{_BASE}/custom-voices/") and path.count("/") == 4:
            routes = {"GET": "get"}
        elif path == f"{_BASE}/presets-voices":
            routes = {"GET": "presets"}
        elif path == f"{_BASE}/delete-voices":
            routes = {"POST": "delete"}
        else:
            raise _ApiError(1203, f"Requested resource does not exist: {path}")
        if method not in routes:
            raise _ApiError(1202, f"Invalid request method {method} for {path}")
        route = routes[method]
        ident = urllib.parse.unquote(path.rsplit("/", 1)[1]) if route == "get" else None
        return route, ident

    def _side_route(self, method: str, raw_path: str) -> web.Response | None:
        """The emulator's own routes (samples, trial clips, stats), or None for API paths."""
        if method != "GET":
            return None
        if raw_path.startswith("/samples/"):
            return self._serve_sample(raw_path[len("/samples/"):])
        if raw_path.startswith("/trial/"):
            return web.Response(body=_cached_wav(6.0), content_type="audio/wav")
        if raw_path == STATS_PATH:
            # Unauthenticated and uncounted: for tests and benchmarks in other processes.
            return web.json_response(self.stats())
        return None

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        raw_path = request.raw_path.split("?", 1)[0]
        try:
            side = self._side_route(request.method, raw_path)
        except Exception:  # an emulator bug here too must not pass unseen
            self._record_internal_error(f"{request.method} {raw_path} (emulator route)")
            return web.Response(status=500, text="emulator error")
        if side is not None:
            return side
        route, ext = "unknown", None
        record = RecordedRequest(request.method, raw_path, route, 0, None, None)
        self.requests.append(record)  # on arrival, so in-flight requests are counted too
        try:
            try:
                route, ident = self._route_of(request.method, raw_path)
            finally:
                record.route = route
                with self._lock:
                    self._arrivals[route] += 1
            self._authenticate(request)
            self._check_qps()
            fault = self._take_fault(route)
            response, ext = await self._handle_with_fault(route, ident, request, fault)
        except _ApiError as err:
            response = self._error_response(err)
        except _Dropped as drop:
            # No answer reaches the client; the response below only satisfies aiohttp.
            record.status, record.code, record.external_task_id = 0, DROPPED, drop.ext
            with self._lock:
                self._answers[route, DROPPED] += 1
            return web.Response(status=500)
        except ConnectionError:  # the client went away mid-request: not the emulator's fault
            response = self._error_response(_ApiError(5000, "connection lost"))
        except Exception as exc:  # never a traceback page: an envelope, like the real server
            self._record_internal_error(f"{request.method} {raw_path} ({route})")
            response = self._error_response(
                _ApiError(5000, f"emulator error: {type(exc).__name__}"))
        record.status, record.code, record.external_task_id = (
            response.status, self._code_of(response), ext)
        with self._lock:
            self._answers[route, record.code] += 1
        return response

    @staticmethod
    def _code_of(response: web.StreamResponse) -> int | None:
        body = getattr(response, "body", None)
        if isinstance(body, bytes) and body.startswith(b"{"):
            try:
                code = json.loads(body).get("code")
            except ValueError:
                return None
            return code if isinstance(code, int) else None
        return None

    def _serve_sample(self, name: str) -> web.Response:
        data = self._sample(urllib.parse.unquote(name))
        if data is None:
            return web.Response(status=404, text="no such sample")
        return web.Response(body=data, content_type="audio/wav")

    async def _handle_with_fault(
        self, route: str, ident: str | None, request: web.Request, fault: _Fault | None
    ) -> tuple[web.Response, str | None]:
        kind = fault.kind if fault is not None else None
        if kind is not None and kind.isdigit():
            headers = {}
            if fault is not None and fault.retry_after is not None:
                headers["Retry-After"] = f"{fault.retry_after:g}"
            raise _ApiError(int(kind), headers=headers)
        if kind == "reset":
            raise _Dropped(request, None)
        if kind == "html502":
            return web.Response(status=502, text="<html><body><h1>502 Bad Gateway</h1></body>"
                                "</html>", content_type="text/html"), None
        if kind == "garbage":
            return web.Response(status=200, body=b"\x00\xffnot json{", content_type=
                                "application/json"), None
        payload, ext = await self._handle(route, ident, request)
        if kind == "slow" and fault is not None:
            await asyncio.sleep(fault.delay)  # the work is done; only the answer is late
        if kind == "commit_then_5000":
            raise _ApiError(5000)
        if kind == "commit_then_drop":  # the work is stored; the caller never hears of it
            raise _Dropped(request, ext)
        body = self._envelope(0, "SUCCEED", payload, with_data=payload is not None)
        if kind == "truncated":
            body = body[: max(1, len(body) // 2)]
        return web.Response(status=200, body=body, content_type="application/json"), ext

    def _authenticate(self, request: web.Request) -> None:
        def fail(code: int) -> _ApiError:
            return _ApiError(1002) if self.strict_auth else _ApiError(code)

        header = request.headers.get("Authorization", "").strip()
        if not header:
            raise fail(1001)
        if not header.startswith("Bearer "):
            raise fail(1002)
        token = header[len("Bearer "):].strip()
        if hmac.compare_digest(token.encode(), self.api_key.encode()):
            return
        try:
            claims = jwt.decode(token, self.secret_key, algorithms=["HS256"],
                                options={"verify_exp": False, "verify_nbf": False,
                                         "require": ["iss", "exp"]})
        except jwt.PyJWTError:
            raise fail(1002) from None
        if claims.get("iss") != self.access_key:
            raise fail(1002)
        now = self._wall_now()
        nbf, exp = claims.get("nbf"), claims.get("exp")
        if isinstance(nbf, (int, float)) and nbf > now:
            raise fail(1003)
        if not isinstance(exp, (int, float)) or exp < now:
            raise fail(1004)

    def _check_qps(self) -> None:
        if not self.qps:
            return
        now = time.monotonic()
        with self._lock:
            window = self._qps_window
            while window and window[0] <= now - 1.0:
                window.popleft()
            if len(window) >= self.qps:
                raise _ApiError(1302, headers={"Retry-After": "1"})
            window.append(now)

    async def _json_body(self, request: web.Request) -> dict[str, Any]:
        ctype = request.headers.get("Content-Type", "")
        if not ctype.split(";")[0].strip().lower() == "application/json":
            raise _ApiError(1200, "Content-Type must be application/json")
        try:
            raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise _ApiError(1200, "request body too large") from None
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            raise _ApiError(1200, "request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise _ApiError(1200, "request body must be a JSON object")
        return body

    async def _handle(self, route: str, ident: str | None,
                      request: web.Request) -> tuple[Any, str | None]:
        if route == "create":
            return self._create(await self._json_body(request))
        if route == "get":
            assert ident is not None
            alt = request.query.get("external_task_id")
            if alt and alt not in ("true", "1"):
                ident = alt
            return self._get(ident), None
        if route == "list":
            num, size = self._paging(request)
            now = self.now()
            with self._lock:
                if self.list_order == "oldest":
                    ids = self._order[(num - 1) * size:num * size]
                else:
                    end = len(self._order) - (num - 1) * size
                    ids = self._order[max(0, end - size):max(0, end)][::-1]
                return [self._task_json(self._tasks[t], now) for t in ids], None
        if route == "presets":
            num, size = self._paging(request)
            return self._presets[(num - 1) * size:num * size], None
        return self._delete(await self._json_body(request)), None

    def _paging(self, request: web.Request) -> tuple[int, int]:
        out = []
        for name, default, top in (("pageNum", 1, 1000), ("pageSize", 30, self.max_page_size)):
            raw = request.query.get(name)
            try:
                value = default if raw is None else int(raw)
            except ValueError:
                raise _ApiError(1201, f"{name} must be an integer") from None
            if not 1 <= value <= top:
                raise _ApiError(1201, f"{name} must be between 1 and {top}")
            out.append(value)
        return out[0], out[1]

    @staticmethod
    def _opt_str(body: dict[str, Any], field: str) -> str | None:
        value = body.get(field)
        if value is None or value == "":
            return None
        if not isinstance(value, str):
            raise _ApiError(1201, f"{field} must be a string")
        return value

    def _create(self, body: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
        name = body.get("voice_name")
        if not isinstance(name, str) or not name.strip():
            raise _ApiError(1201, "voice_name is required")
        if len(name) > 20:
            raise _ApiError(1201, "voice_name must be at most 20 characters")
        voice_url = self._opt_str(body, "voice_url")
        video_id = self._opt_str(body, "video_id")
        if voice_url is None and video_id is None:
            raise _ApiError(1201, "one of voice_url or video_id is required")
        if voice_url is not None and video_id is not None and self.reject_both_sources:
            raise _ApiError(1201, "voice_url and video_id are mutually exclusive")
        if voice_url is not None:
            parsed = urllib.parse.urlsplit(voice_url)
            if parsed.scheme not in ("http", "https") or not parsed.hostname:
                raise _ApiError(1201, "voice_url must be an http(s) URL")
            if self.check_url_extension and not parsed.path.lower().endswith(_MEDIA_EXTS):
                raise _ApiError(1201, "voice_url must be an http(s) URL of a mp3/wav/mp4/mov "
                                      "file")
        # ASCII digits only: str.isdigit() also takes "١٢٣" and "12²".
        if video_id is not None and not (video_id.isascii() and video_id.isdigit()):
            raise _ApiError(1201, "video_id is invalid")
        callback_url = self._opt_str(body, "callback_url")
        ext = self._opt_str(body, "external_task_id")
        now = self.now()
        with self._lock:
            if ext is not None and ext in self._by_ext and self.unique_external_ids:
                # The real server's text (kling-api.md §11.1), which SDKs match on.
                raise _ApiError(1201, f"External_task_id {ext} already exists")
            if self.unique_voice_names and name in self._names:
                raise _ApiError(1201, f"voice_name already exists: {name}")
            in_progress = self._prune_active(now)
            if in_progress >= self.concurrency:
                raise _ApiError(1303)
            task = _Task(task_id=self._new_id(), voice_id=self._new_id(), voice_name=name,
                         voice_url=voice_url, video_id=video_id, callback_url=callback_url,
                         external_task_id=ext, created=now,
                         processing_at=now + self.processing_after,
                         done_at=now + self.task_seconds,
                         fail_msg=self._media_failure(voice_url, video_id))
            self._tasks[task.task_id] = task
            self._order.append(task.task_id)
            self._voices[task.voice_id] = task.task_id
            self._names.add(name)
            if ext is not None:
                # A lookup by a repeated external id finds the first task made with it.
                self._by_ext.setdefault(ext, task.task_id)
                self._ext_counts[ext] += 1
            heapq.heappush(self._active, (task.done_at, task.task_id))
            self.peak_in_progress = max(self.peak_in_progress, len(self._active))
            if callback_url:
                self._callback_pending.add(task.task_id)
        ms = self._now_ms(now)
        return ({"task_id": task.task_id,
                 "task_info": {"external_task_id": ext} if ext else {},
                 "task_status": "submitted", "created_at": ms, "updated_at": ms}, ext)

    def _get(self, ident: str) -> dict[str, Any]:
        with self._lock:
            task_id = ident if ident in self._tasks else self._by_ext.get(ident)
            if task_id is None:
                raise _ApiError(1201, f"Task not found by id/external id: {ident}")
            return self._task_json(self._tasks[task_id], self.now())

    def _delete(self, body: dict[str, Any]) -> dict[str, Any]:
        voice_id = body.get("voice_id")
        if isinstance(voice_id, int) and not isinstance(voice_id, bool):
            voice_id = str(voice_id)
        if not isinstance(voice_id, str) or not voice_id:
            raise _ApiError(1201, "voice_id is required")
        if voice_id in set(self.preset_ids()):
            raise _ApiError(1201, f"Preset voices cannot be deleted: {voice_id}")
        with self._lock:
            task_id = self._voices.get(voice_id)
            task = self._tasks.get(task_id) if task_id else None
            if task is None or task.status(self.now()) != "succeed":
                raise _ApiError(1201, f"Voice not found for id: {voice_id}")
            if task.deleted:
                raise _ApiError(1201, f"Voice already be deleted for id: {voice_id}")
            task.deleted = True
            return {"task_id": self._new_id(), "task_status": "succeed"}

    # --- callbacks ----------------------------------------------------------------------------

    async def _tick(self) -> None:
        """Sends callbacks for status changes; runs as long as the emulator does."""
        interval = max(0.005, min(0.05, self.task_seconds / 8))
        while True:
            await asyncio.sleep(interval)
            if self._callback_pending:
                try:
                    await self._send_due_callbacks()
                except Exception:  # an emulator bug: report it, keep serving
                    self._record_internal_error("callbacks")

    async def deliver_callbacks(self) -> None:
        """Send every status-change callback due now, and return once each was delivered (or
        failed), rather than on the emulator's own tick.

        A client can learn a task's end by polling before its callback went out; a test that
        asserts on ``emu.callbacks`` right after its client returned calls this first.
        """
        loop = self._thread_loop
        if loop is not None and loop is not asyncio.get_running_loop():  # `with` mode
            round_ = self._delivery_round()
            try:
                future = asyncio.run_coroutine_threadsafe(round_, loop)
            except RuntimeError:  # its loop closed: __exit__ is under way
                round_.close()
                raise RuntimeError("the emulator is not running") from None
            await asyncio.wrap_future(future)
        else:
            await self._delivery_round()

    async def _delivery_round(self) -> None:
        """One round on the emulator's loop, in a task of its own so that stop() can end it.

        Shielded: a caller that gives up (a timeout) leaves the round to finish, rather than
        leave callbacks marked as sent that never went out.
        """
        if self._cb_round is None:
            raise RuntimeError("the emulator is not running")
        task = asyncio.get_running_loop().create_task(self._send_due_callbacks())
        self._cb_rounds.add(task)
        task.add_done_callback(self._cb_rounds.discard)
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled() and self._cb_round is None:  # stop() ended it, not our caller
                raise RuntimeError("the emulator stopped before the callbacks were "
                                   "delivered") from None
            raise

    async def _send_due_callbacks(self) -> None:
        lock = self._cb_round
        if lock is None:
            raise RuntimeError("the emulator is not running")
        async with lock:  # a round the tick has under way finishes first
            if self._cb_round is not lock:  # stopped while this round waited for its turn
                raise RuntimeError("the emulator stopped before the callbacks were delivered")
            await self._send_due_callbacks_now()

    async def _send_due_callbacks_now(self) -> None:
        now = self.now()
        due: list[tuple[_Task, dict[str, Any]]] = []
        with self._lock:
            for task_id in list(self._callback_pending):
                task = self._tasks[task_id]
                status = task.status(now)
                if status != task.notified and status != "submitted":
                    # Fire for each change since the last one (processing may be skipped past).
                    if task.notified in ("", "submitted") and status != "processing":
                        mid = self._task_json(task, task.processing_at)
                        mid["task_status"] = "processing"
                        due.append((task, mid))
                    task.notified = status
                    due.append((task, self._task_json(task, now)))
                if status in ("succeed", "failed"):
                    self._callback_pending.discard(task_id)
        for task, record in due:
            if task.callback_url:
                await self._deliver(task.callback_url, record)

    async def _deliver(self, url: str, record: dict[str, Any]) -> None:
        if self._cb_session is None:
            self._cb_session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        body = json.dumps(record, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json; charset=utf-8"}
        if self.webhook_secret:
            wid, ts = str(uuid.uuid4()), int(self._wall_now())
            headers.update({"webhook-id": wid, "webhook-timestamp": str(ts),
                            "webhook-signature": sign_webhook(self.webhook_secret, wid, ts,
                                                              body)})
        entry: dict[str, Any] = {"url": url, "record": record, "status": None, "attempts": 0}
        self.callbacks.append(entry)
        for _ in range(1 + max(0, self.callback_retries)):
            entry["attempts"] += 1
            try:
                async with self._cb_session.post(url, data=body, headers=headers) as resp:
                    entry["status"] = resp.status
                    if 200 <= resp.status < 300:
                        return
            except (aiohttp.ClientError, asyncio.TimeoutError):
                entry["status"] = "error"


def _cancel_leftovers(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what still runs on the `with` thread's loop before it closes, as asyncio.run does.

    aiohttp stops tracking a handler once its client went away (a ``slow`` fault whose client
    gave up, a killed batch), so the runner's shutdown does not end it: closing the loop under
    it logged "Task was destroyed but it is pending!" into whichever test ran next.
    """
    for _ in range(10):  # bounded: a cancelled task may start others (a call handed over late)
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        if not pending:
            return
        for task in pending:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))


__all__ = ["DROPPED", "FAULTS", "ROUTES", "STATS_PATH", "KlingEmulator", "RecordedRequest",
           "make_wav", "sign_webhook", "wav_seconds"]
