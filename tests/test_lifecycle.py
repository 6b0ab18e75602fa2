"""The client core under faults and its lifecycle: coordinator hook, close races, dropped clients,
fork, cancelled waiters, hard budgets, closed sessions, secrets in exception chains, logging."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import io
import itertools
import json
import logging
import os
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.client_reqrep import ConnectionKey
from aioresponses import aioresponses

import voiceapi
from tests.conftest import FAST_RETRY, envelope, serve, task_json
from voiceapi import _logs
from voiceapi._coordinator import (
    Coordinator,
    Grant,
    JournalEntry,
    LookupFunction,
    PollFunction,
)
from voiceapi._models import VoiceTask
from voiceapi.testing import KlingEmulator


class FakeCoordinator:
    """Implements the Coordinator protocol; records what a plain client asks of it.

    The batch-only methods fail loudly: a client must never call them.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, object, object]] = []

    async def before_request(self, *, create: bool) -> None:
        self.calls.append(("before", create, None))

    async def rate_limited(self, code: int | None, retry_after: float | None) -> None:
        self.calls.append(("limited", code, retry_after))

    def _batch_only(self) -> AssertionError:
        return AssertionError("a plain client call used a batch-only coordinator method")

    async def known(self, keys: Sequence[str]) -> Mapping[str, JournalEntry]:
        raise self._batch_only()

    async def record(self, key: str, task_id: str, status: str) -> None:
        raise self._batch_only()

    async def acquire(self, key: str) -> Grant:
        raise self._batch_only()

    async def wait_for_slot(self, timeout: float) -> None:
        raise self._batch_only()

    async def accepted(self, key: str, task_id: str, status: str) -> None:
        raise self._batch_only()

    async def refused(self, key: str) -> float:
        raise self._batch_only()

    async def release(self, key: str) -> None:
        raise self._batch_only()

    async def finished(self, key: str, task_id: str, status: str) -> None:
        raise self._batch_only()

    cap = 1  # snapshots for progress reports; harmless to read
    in_flight = 0

    async def observe(self, mine: Collection[str], poll: PollFunction,
                      lookup: LookupFunction) -> Mapping[str, VoiceTask]:
        raise self._batch_only()


def test_fake_coordinator_implements_the_protocol() -> None:
    assert isinstance(FakeCoordinator(), Coordinator)


async def test_coordinator_is_asked_before_every_attempt_and_told_of_rate_limits(
        emu: KlingEmulator) -> None:
    coord = FakeCoordinator()
    emu.inject("create", 1303, times=2, retry_after=0.01)
    async with voiceapi.AsyncVoiceClient(
            api_key=emu.api_key, base_url=emu.base_url, retry_policy=FAST_RETRY,
            coordinator=coord) as client:
        assert client._transport.coordinator is coord
        await client.preset_voices.list(page_size=1)
        task = await client.custom_voices.create(voice_name="c", voice_url=emu.sample_url())
    assert task.task_id
    assert emu.count("create") == 3  # two refusals, then accepted
    assert coord.calls == [
        ("before", False, None),  # the list: not a create
        ("before", True, None), ("limited", 1303, pytest.approx(0.01)),
        ("before", True, None), ("limited", 1303, pytest.approx(0.01)),
        ("before", True, None),
    ]


def test_sync_client_passes_the_coordinator_through(kling_emulator: KlingEmulator) -> None:
    coord = FakeCoordinator()
    with voiceapi.VoiceClient(api_key=kling_emulator.api_key, base_url=kling_emulator.base_url,
                              retry_policy=FAST_RETRY,
                              coordinator=coord) as client:
        assert client.async_client._transport.coordinator is coord
        client.preset_voices.list(page_size=1)
    assert coord.calls == [("before", False, None)]


def test_no_coordinator_adds_no_middleware() -> None:
    from voiceapi._middlewares import CoordinatorMiddleware, _Layer

    def layers(client: voiceapi.AsyncVoiceClient) -> list[object]:
        out: list[object] = []
        handler = client._transport._handler
        while isinstance(handler, _Layer):
            out.append(handler._mw)
            handler = handler._call_next
        return out

    plain = voiceapi.AsyncVoiceClient(api_key="k", base_url="http://127.0.0.1:9")
    assert plain._transport.coordinator is None
    assert not any(isinstance(m, CoordinatorMiddleware) for m in layers(plain))
    shared = voiceapi.AsyncVoiceClient(api_key="k", base_url="http://127.0.0.1:9",
                                       coordinator=FakeCoordinator())
    assert sum(isinstance(m, CoordinatorMiddleware) for m in layers(shared)) == 1


#: Held handlers wait for this; the test sets it before its server stops.
RELEASE = web.AppKey("release", asyncio.Event)
SEEN = web.AppKey("seen", list[str])  # paths of the requests a test server answered


# --- 12.1 close() while other threads (or tasks) are in calls --------------------------------

def _hammer(client: voiceapi.VoiceClient, outcomes: list[str], stop: threading.Event) -> None:
    """Call until the client is closed; record each outcome's kind (bounded by the close)."""
    for _ in range(10_000):
        try:
            client.preset_voices.list(page_size=2)
        except voiceapi.ClientClosedError:
            outcomes.append("closed")
            return
        except BaseException as exc:  # anything else is the bug this test is about
            outcomes.append(f"{type(exc).__module__}.{type(exc).__name__}: {exc}")
            return
        outcomes.append("ok")
        if stop.is_set():
            return


def test_close_from_another_thread_gives_every_caller_client_closed_error(
        kling_emulator: KlingEmulator) -> None:
    emu = kling_emulator
    for _round in range(15):
        emu.inject("presets", "slow", times=6, delay=0.3)  # some calls are mid-flight at close
        client = voiceapi.VoiceClient(api_key=emu.api_key, base_url=emu.base_url,
                                      retry_policy=FAST_RETRY)
        outcomes: list[str] = []
        stop = threading.Event()
        threads = [threading.Thread(target=_hammer, args=(client, outcomes, stop))
                   for _ in range(12)]
        for t in threads:
            t.start()
        for _ in range(500):  # bounded: until calls are under way
            if len(outcomes) >= 12:
                break
            time.sleep(0.002)
        client.close()
        stop.set()
        for t in threads:
            t.join(20)
        assert not any(t.is_alive() for t in threads), "a caller hung after close()"
        odd = [o for o in outcomes if o not in ("ok", "closed")]
        assert odd == []
        assert outcomes.count("closed") >= 1 and "ok" in outcomes
        emu.clear_faults()


async def test_aclose_while_tasks_are_in_calls(emu: KlingEmulator) -> None:
    for _round in range(10):
        emu.inject("presets", "slow", times=4, delay=0.3)
        client = voiceapi.AsyncVoiceClient(api_key=emu.api_key, base_url=emu.base_url,
                                           retry_policy=FAST_RETRY)
        calls = [asyncio.ensure_future(client.preset_voices.list(page_size=2))
                 for _ in range(10)]
        await asyncio.sleep(0.05)  # let them start; the slow ones are still at the server
        await client.aclose()
        results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 20)
        odd = [r for r in results
               if not isinstance(r, (list, voiceapi.ClientClosedError))]
        assert odd == []
        emu.clear_faults()


# --- 12.2 a VoiceClient dropped without close() ----------------------------------------------

def _voiceapi_threads() -> int:
    return sum(1 for t in threading.enumerate() if t.name == "voiceapi-sync" and t.is_alive())


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
@pytest.mark.slow
def test_dropped_clients_are_closed_by_the_finalizer(kling_emulator: KlingEmulator) -> None:
    emu = kling_emulator
    gc.collect()
    threads_before, fds_before = _voiceapi_threads(), _fds()
    with pytest.warns(ResourceWarning) as record:
        for _ in range(40):
            client = voiceapi.VoiceClient(api_key=emu.api_key, base_url=emu.base_url)
            assert len(client.preset_voices.list(page_size=1)) == 1
            del client
            gc.collect()
    messages = {str(w.message).split("(")[0] for w in record}
    assert messages == {"unclosed VoiceClient"}  # ours only: no aiohttp "Unclosed ..." ones
    assert len(record) == 40
    assert _voiceapi_threads() == threads_before
    assert _fds() <= fds_before + 2  # the emulator's side may still hold a closing socket


DROP_SCRIPT = """
import gc, sys, threading, voiceapi
for i in range(30):
    c = voiceapi.VoiceClient(api_key=sys.argv[1], base_url=sys.argv[2])
    c.preset_voices.list(page_size=1)
    if i % 2:
        del c          # collected now (ResourceWarning)
        gc.collect()
    else:
        keep = globals().setdefault("keep", [])
        keep.append(c)  # still open at interpreter exit: closed quietly
print(sum(t.name == "voiceapi-sync" for t in threading.enumerate()))
"""


def test_dropped_and_forgotten_clients_at_interpreter_exit(kling_emulator: KlingEmulator) -> None:
    out = subprocess.run(
        [sys.executable, "-X", "dev", "-W", "error", "-W", "always::ResourceWarning", "-c",
         DROP_SCRIPT, kling_emulator.api_key, kling_emulator.base_url],
        capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "15"  # one loop thread per client still open
    warned = [line for line in out.stderr.splitlines() if "ResourceWarning" in line]
    assert len(warned) == 15 and all("unclosed VoiceClient" in w for w in warned)
    assert "Unclosed" not in out.stderr and "Traceback" not in out.stderr


# --- 12.3 fork with limits -------------------------------------------------------------------

FORK_SCRIPT = """
import os, signal, sys, threading, time, warnings, voiceapi
warnings.simplefilter("ignore", DeprecationWarning)  # fork() with threads: the point here
c = voiceapi.VoiceClient(api_key=sys.argv[1], base_url=sys.argv[2],
                         max_concurrent_requests=2, max_requests_per_second=200)
results = []
def call():
    results.append(len(c.preset_voices.list(page_size=3)))
busy = [threading.Thread(target=call) for _ in range(4)]
for t in busy:
    t.start()
limits = c.async_client.transport._limits
for _ in range(2000):  # bounded: until both slots are held and a caller queues
    if limits.active == 2 and limits._slot_queue:
        break
    time.sleep(0.005)
assert limits.active == 2 and limits._slot_queue
pid = os.fork()
if pid == 0:
    signal.alarm(30)  # a hang in the child fails the test instead of blocking it
    ok = 0
    for _ in range(8):
        ok += len(c.preset_voices.list(page_size=2)) == 2
    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    c.close()
    os._exit(0 if ok == 8 and results.count(3) == 4 else 3)
for t in busy:
    t.join(30)
status = None
for _ in range(600):  # bounded wait for the child
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        break
    time.sleep(0.05)
print(os.waitstatus_to_exitcode(status), results.count(3), len(c.preset_voices.list(page_size=4)))
c.close()
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_fork_child_resets_limits_and_parent_keeps_working(
        kling_emulator: KlingEmulator) -> None:
    kling_emulator.inject("presets", "slow", times=4, delay=0.5)  # the parent's calls hold slots
    out = subprocess.run([sys.executable, "-c", FORK_SCRIPT, kling_emulator.api_key,
                          kling_emulator.base_url], capture_output=True, text=True, timeout=90,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "4", "4"], out.stderr


# --- 12.4 a cancelled waiter gives its turn back ----------------------------------------------

def _record_departures(client: voiceapi.AsyncVoiceClient, departures: list[float]) -> None:
    """Note when the client's pacer lets each request go (not when it reaches the server:
    arrivals carry the machine's load, so a late one made the next look squeezed)."""
    limits = client.transport._limits
    enter = limits.enter

    async def timed_enter() -> None:
        await enter()
        departures.append(time.monotonic())  # no await since the pacer's own clock read

    limits.enter = timed_enter  # type: ignore[method-assign]


async def test_cancelled_rate_limit_waiters_give_their_turns_back(emu: KlingEmulator) -> None:
    departures: list[float] = []
    async with voiceapi.AsyncVoiceClient(api_key=emu.api_key, base_url=emu.base_url,
                                         max_requests_per_second=10) as client:
        _record_departures(client, departures)
        await client.preset_voices.list(page_size=1)
        queued = [asyncio.ensure_future(client.preset_voices.list(page_size=1))
                  for _ in range(50)]  # 5 s of turns at 10/s
        # Some turns went out while the others waited: a condition, not a fixed pause (on a
        # loaded machine a 0.35 s pause let through anything from one to seven).
        for _ in range(3000):  # bounded
            if sum(call.done() for call in queued) >= 2:
                break
            await asyncio.sleep(0.01)
        for call in queued:
            call.cancel()
        results = await asyncio.gather(*queued, return_exceptions=True)
        assert sum(isinstance(r, list) for r in results) >= 2
        limits = client.transport._limits
        assert not limits._pace_queue and not limits._slot_queue
        assert limits._next_free - time.monotonic() <= 0.1 + 0.01  # at most one interval
        start = time.monotonic()
        await client.preset_voices.list(page_size=1)
        assert time.monotonic() - start < 1.0  # was 4.6 s: the cancelled turns were kept
    gaps = [b - a for a, b in itertools.pairwise(departures)]
    assert min(gaps) >= 0.1 - 0.002, gaps  # the pace held while they waited, and after


async def test_rate_limit_still_paces_after_cancellations() -> None:
    stamps: list[float] = []

    async def presets(request: web.Request) -> web.Response:
        stamps.append(time.monotonic())
        return web.json_response({"code": 0, "message": "SUCCEED", "request_id": "r",
                                  "data": []})

    app = web.Application()
    app.router.add_get("/v1/general/presets-voices", presets)
    departures: list[float] = []
    async with serve(app) as base:
        async with voiceapi.AsyncVoiceClient(api_key="k", base_url=base,
                                             max_requests_per_second=20) as client:
            _record_departures(client, departures)
            calls = [asyncio.ensure_future(client.preset_voices.list(page_size=1))
                     for _ in range(8)]
            await asyncio.sleep(0)
            calls[2].cancel()
            calls[5].cancel()
            results = await asyncio.gather(*calls, return_exceptions=True)
    assert sum(isinstance(r, list) for r in results) == len(stamps) == len(departures) == 6
    # A freed turn is reused, never squeezed in early: each request leaves at least one turn
    # (50 ms) after the one before; a squeezed one would leave a whole turn early. Measured when
    # the pacer lets it go, not when it reaches the server: arrivals carry the machine's load
    # (the first one arriving 27 ms late made the next look 27 ms early, under -n 8 on 3.10).
    gaps = [b - a for a, b in itertools.pairwise(departures)]
    assert min(gaps) >= 0.05 - 0.002, gaps


# --- 12.5 retry_budget is a hard cap ------------------------------------------------------------

async def test_last_attempt_is_clipped_to_the_retry_budget() -> None:
    # The first attempt fails at once (503), the second is never answered. Its own timeout is
    # 30 s, the call's budget 1 s: clipped, the call ends at about 1 s; unclipped, at 30 s. A
    # bound of 15 s tells them apart however loaded the machine (0.7 s attempts against a
    # 1.25 s bound, as before, could be hit by load).
    app = web.Application()
    app[RELEASE] = asyncio.Event()
    app[SEEN] = []
    app.router.add_route("*", "/{tail:.*}", _fails_then_never)
    async with serve(app) as base:
        async with voiceapi.AsyncVoiceClient(api_key="k", base_url=base, timeout=30,
                                             retry_budget=1.0, retry_policy=FAST_RETRY) as client:
            start = time.monotonic()
            with pytest.raises(voiceapi.APITimeoutError):
                await client.preset_voices.list()
            took = time.monotonic() - start
        app[RELEASE].set()  # let the held handlers end, so the server stops at once
    assert len(app[SEEN]) == 2
    assert took < 15  # not 30 s: the second attempt got only what was left of the budget


def test_attempt_timeout_follows_the_deadline() -> None:
    from voiceapi._middlewares import Request

    transport = voiceapi.AsyncVoiceClient(api_key="k", base_url="http://127.0.0.1:9",
                                          timeout=5).transport
    request = Request("GET", "/x")
    request.deadline = time.monotonic() + 60
    assert transport._attempt_timeout(request) is None  # the session's own timeout
    request.deadline = time.monotonic() + 0.5
    clipped = transport._attempt_timeout(request)
    assert clipped is not None and clipped.total is not None and 0.3 < clipped.total <= 0.5
    request.deadline = time.monotonic() - 0.01
    with pytest.raises(voiceapi.APITimeoutError, match="retry budget"):
        transport._attempt_timeout(request)


# --- 12.6 a borrowed session closed by its owner ---------------------------------------------

async def test_borrowed_session_closed_by_its_owner_is_a_typed_error(emu: KlingEmulator) -> None:
    session = aiohttp.ClientSession()
    client = voiceapi.AsyncVoiceClient(api_key=emu.api_key, base_url=emu.base_url,
                                       session=session, retry_policy=FAST_RETRY)
    assert len(await client.preset_voices.list(page_size=1)) == 1
    await session.close()
    with pytest.raises(voiceapi.ClientClosedError, match="closed by its owner"):
        await client.preset_voices.list(page_size=1)
    await client.aclose()


# --- 12.7 secrets in exception chains --------------------------------------------------------

SECRET = "sk-SECRET-chain-0123456789abcdef"
SDK_DIR = Path(voiceapi.__file__).parent
API_KEY = "ak-APIKEY-chain-0123456789abcdef"


def _everything(obj: object, seen: set[int] | None = None, depth: int = 0) -> list[str]:
    """Every text a debugger or error reporter could show for an exception: str, repr, the
    formatted chain with locals, and recursively every attribute, cause and context."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 6:
        return []
    seen.add(id(obj))
    out = [repr(obj)]
    with contextlib.suppress(Exception):  # a str() that fails shows nothing
        out.append(str(obj))
    if isinstance(obj, BaseException):
        out += traceback.format_exception(obj)
        # Locals of the SDK's frames (the test's own frames hold the secret on purpose).
        te = traceback.TracebackException.from_exception(obj, capture_locals=True)
        out += [f"{f.filename}:{f.lineno} {f.locals!r}" for f in te.stack
                if Path(f.filename).is_relative_to(SDK_DIR)]
        for linked in (obj.__cause__, obj.__context__, *obj.args):
            if linked is not None:
                out += _everything(linked, seen, depth + 1)
    attrs = getattr(obj, "__dict__", None)
    if isinstance(attrs, dict):
        for value in attrs.values():
            out += _everything(value, seen, depth + 1)
    for name in getattr(type(obj), "__slots__", ()):
        if hasattr(obj, name):
            out += _everything(getattr(obj, name), seen, depth + 1)
    if isinstance(obj, Mapping):
        for value in obj.values():
            out += _everything(value, seen, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            out += _everything(value, seen, depth + 1)
    return out


async def _bad_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers every request with a malformed header: aiohttp raises ClientResponseError,
    which carries the request's headers (token included) in ``request_info``."""
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.1 200 OK\r\nBad Header Line\r\nContent-Length: 2\r\n\r\n{}")
    await writer.drain()
    writer.close()


async def _redirect_loop(request: web.Request) -> web.Response:
    raise web.HTTPFound(location=str(request.url))


async def _never(request: web.Request) -> web.Response:
    await asyncio.wait_for(request.app[RELEASE].wait(), 30)
    return web.Response()


async def _fails_then_never(request: web.Request) -> web.Response:
    """The first request gets a 503 at once (retried); every later one waits for RELEASE."""
    request.app[SEEN].append(request.path)
    if len(request.app[SEEN]) == 1:
        return web.Response(status=503)
    return await _never(request)


@pytest.mark.parametrize("fault", ["malformed", "redirect", "timeout", "refused"])
async def test_exception_chains_never_carry_secrets(fault: str) -> None:
    server = await asyncio.start_server(_bad_http, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    app = web.Application()
    app[RELEASE] = asyncio.Event()
    app.router.add_route("*", "/{tail:.*}", _redirect_loop if fault == "redirect" else _never)
    try:
        async with serve(app) as app_base:
            base = {"malformed": f"http://127.0.0.1:{port}", "redirect": app_base,
                    "timeout": app_base, "refused": "http://127.0.0.1:9"}[fault]
            for ak, sk, key in (("ak", SECRET, None), (None, None, API_KEY)):
                async with voiceapi.AsyncVoiceClient(
                        ak, sk, api_key=key, base_url=base, timeout=0.3, max_retries=1,
                        retry_budget=1.0, retry_policy=FAST_RETRY) as client:
                    token = client.transport.config.credentials.authorization()
                    for call in (client.preset_voices.list(),
                                 client.custom_voices.create(voice_name="n",
                                                             voice_url="https://x/a.wav")):
                        with pytest.raises(voiceapi.VoiceAPIError) as info:
                            await call
                        text = "\n".join(_everything(info.value))
                        for secret in (SECRET, API_KEY, token, token.removeprefix("Bearer ")):
                            assert secret not in text
                        if fault == "malformed":  # the case that leaked before
                            assert "request_info" not in text
            app[RELEASE].set()
    finally:
        server.close()
        await server.wait_closed()


# --- connect refused vs reset, for a create -------------------------------------------------

CV = "https://kling.test/v1/general/custom-voices"


def _requests(mocked: aioresponses, method: str) -> int:
    return sum(len(calls) for (m, _), calls in mocked.requests.items() if m == method)


async def test_create_after_connect_refused_is_resent_without_a_lookup(
        mocked: aioresponses, mock_client: voiceapi.AsyncVoiceClient) -> None:
    refused = aiohttp.ClientConnectorError(
        ConnectionKey("kling.test", 443, True, True, None, None, None),
        OSError(111, "Connection refused"))
    mocked.post(CV, exception=refused)
    # A create's answer echoes the external id it was sent (or leaves it out): never another.
    mocked.post(CV, payload=envelope(task_json(task_info={})))
    task = await mock_client.custom_voices.create(voice_name="n", voice_url="https://x/a.wav")
    assert task.task_id == "930801301486305328"
    assert _requests(mocked, "POST") == 2 and _requests(mocked, "GET") == 0


async def test_create_after_reset_is_looked_up_before_resending(
        mocked: aioresponses, mock_client: voiceapi.AsyncVoiceClient) -> None:
    mocked.post(CV, exception=aiohttp.ClientOSError(104, "Connection reset by peer"))
    mocked.get(f"{CV}/mine-7", status=400,
               payload=envelope(code=1201, message="Task not found by id/external id: mine-7"))
    mocked.post(CV, payload=envelope(task_json(task_info={"external_task_id": "mine-7"})))
    await mock_client.custom_voices.create(voice_name="n", voice_url="https://x/a.wav",
                                           external_task_id="mine-7")
    assert _requests(mocked, "POST") == 2 and _requests(mocked, "GET") == 1


# --- 12.8 webhooks: delivered only after the listener returned --------------------------------

def _callback(wid: str, status: str = "succeed") -> tuple[bytes, dict[str, str]]:
    body = json.dumps({"task_id": "1", "task_status": status}).encode()
    return body, {"webhook-id": wid}


async def _post(receiver: voiceapi.CallbackReceiver, wid: str,
                status: str = "succeed") -> web.Response:
    from aiohttp.test_utils import make_mocked_request

    body, headers = _callback(wid, status)
    request = make_mocked_request("POST", "/", headers=headers)
    request._read_bytes = body
    return await receiver.handle(request)


async def test_failed_confirm_is_retried_and_the_final_update_arrives() -> None:
    seen: list[str] = []
    answers: list[Exception | None] = [voiceapi.ServerError("down", code=5000), None]

    async def confirm(task_id: str) -> VoiceTask:
        failure = answers.pop(0)
        if failure is not None:
            raise failure
        return voiceapi.parse_callback(*_callback("x"))

    receiver = voiceapi.CallbackReceiver(lambda t: seen.append(t.task_status.value),
                                         confirm=confirm)
    assert (await _post(receiver, "w1")).status == 503  # Kling will retry this delivery
    assert seen == []
    assert (await _post(receiver, "w1")).status == 200  # the retry is not a "duplicate"
    assert seen == ["succeed"]
    again = await _post(receiver, "w1")
    assert again.status == 200 and json.loads(again.body)["duplicate"] is True  # type: ignore[arg-type]
    assert seen == ["succeed"]


async def test_failing_listener_leaves_the_delivery_open() -> None:
    calls = 0

    def flaky(task: VoiceTask) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("listener crashed")

    receiver = voiceapi.CallbackReceiver(flaky)
    with pytest.raises(RuntimeError):
        await _post(receiver, "w2")
    assert (await _post(receiver, "w2")).status == 200
    assert calls == 2


async def test_concurrent_repeat_waits_for_the_first_delivery() -> None:
    gate = asyncio.Event()
    seen: list[str] = []

    async def slow_listener(task: VoiceTask) -> None:
        await gate.wait()
        seen.append(task.task_id)

    receiver = voiceapi.CallbackReceiver(slow_listener)
    first = asyncio.ensure_future(_post(receiver, "w3"))
    await asyncio.sleep(0)
    assert (await _post(receiver, "w3")).status == 409  # in progress: come back later
    gate.set()
    assert (await first).status == 200
    assert seen == ["1"]


async def test_confirm_takes_a_coroutine_function_and_a_client_is_deprecated(
        emu: KlingEmulator) -> None:
    async with voiceapi.AsyncVoiceClient(api_key=emu.api_key, base_url=emu.base_url) as client:
        task = await client.custom_voices.create(voice_name="c", voice_url=emu.sample_url())
        seen: list[VoiceTask] = []
        receiver = voiceapi.CallbackReceiver(seen.append, confirm=client.custom_voices.get)
        body = json.dumps({"task_id": task.task_id, "task_status": "failed"}).encode()
        from aiohttp.test_utils import make_mocked_request

        request = make_mocked_request("POST", "/", headers={"webhook-id": "w4"})
        request._read_bytes = body
        assert (await receiver.handle(request)).status == 200
        assert seen[0].task_status is not voiceapi.TaskStatus.FAILED  # the API's answer won
        with pytest.warns(DeprecationWarning, match="custom_voices.get"):
            voiceapi.CallbackReceiver(confirm=client)  # type: ignore[arg-type]
        with pytest.raises(voiceapi.ValidationError):
            voiceapi.CallbackReceiver(confirm="nope")  # type: ignore[arg-type]


async def test_oversized_callbacks_are_refused() -> None:
    from voiceapi._constants import MAX_CALLBACK_BYTES

    big = b'{"task_id":"1","task_status":"succeed","x":"' + b"a" * MAX_CALLBACK_BYTES + b'"}'
    with pytest.raises(voiceapi.WebhookVerificationError, match="too large"):
        voiceapi.parse_callback(big, {})
    seen: list[VoiceTask] = []
    async with voiceapi.CallbackServer() as cb:
        cb.subscribe(seen.append)
        async with aiohttp.ClientSession() as http:
            async with http.post(cb.url, data=io.BytesIO(big)) as resp:
                assert resp.status == 413
    assert seen == []


# --- 12.9 logging is configured once, from VOICEAPI_LOG -----------------------------------

@pytest.fixture
def fresh_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[logging.Logger]:
    logger = logging.getLogger("voiceapi")
    handlers, level = list(logger.handlers), logger.level
    _logs._reset_for_tests()
    yield logger
    logger.handlers[:] = handlers
    logger.setLevel(level)
    _logs._reset_for_tests()


def test_voiceapi_log_is_read_once(fresh_logging: logging.Logger,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOICEAPI_LOG", "debug")
    for _ in range(5):
        voiceapi.AsyncVoiceClient(api_key="k", base_url="http://127.0.0.1:9")
    assert len(fresh_logging.handlers) == 1 and fresh_logging.level == logging.DEBUG
    monkeypatch.setenv("VOICEAPI_LOG", "info")  # read once: later changes are not re-read
    voiceapi.AsyncVoiceClient(api_key="k", base_url="http://127.0.0.1:9")
    assert fresh_logging.level == logging.DEBUG


def test_unknown_voiceapi_log_value_is_warned_about(fresh_logging: logging.Logger,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOICEAPI_LOG", "verbose")
    with pytest.warns(RuntimeWarning, match="VOICEAPI_LOG='verbose'"):
        voiceapi.AsyncVoiceClient(api_key="k", base_url="http://127.0.0.1:9")
    assert fresh_logging.handlers == []
    voiceapi.AsyncVoiceClient(api_key="k", base_url="http://127.0.0.1:9")  # warned once only


# --- version ---------------------------------------------------------------------------------

def test_version_and_user_agent_come_from_package_metadata() -> None:
    from importlib.metadata import version

    from voiceapi._config import user_agent

    assert voiceapi.__version__ == version("voiceapi")
    assert user_agent() == f"voiceapi-python/{version('voiceapi')}"


def test_a_resource_keeps_its_dropped_client_open(kling_emulator: KlingEmulator) -> None:
    voices = voiceapi.VoiceClient(api_key=kling_emulator.api_key,
                                  base_url=kling_emulator.base_url).preset_voices
    gc.collect()  # the client itself is unreachable except through its resource
    assert len(voices.list(page_size=2)) == 2
    with pytest.warns(ResourceWarning, match="unclosed VoiceClient"):
        del voices
        gc.collect()


def test_concurrent_closers_both_return_after_the_close(kling_emulator: KlingEmulator) -> None:
    for _round in range(10):
        client = voiceapi.VoiceClient(api_key=kling_emulator.api_key,
                                      base_url=kling_emulator.base_url)
        client.preset_voices.list(page_size=1)
        thread = client._runner._thread
        closers = [threading.Thread(target=client.close) for _ in range(4)]
        for t in closers:
            t.start()
        for t in closers:
            t.join(30)
        assert thread is not None and not thread.is_alive()
        assert client.closed


LAZY_SCRIPT = """
import asyncio, sys, voiceapi
from voiceapi.testing import KlingEmulator
async def main():
    async with KlingEmulator() as emu:
        async with voiceapi.AsyncVoiceClient(api_key=emu.api_key, base_url=emu.base_url) as c:
            await c.preset_voices.list(page_size=1)
            first = "tenacity" in sys.modules
            try:  # a failure that is not retried (not found) does not need it either
                await c.custom_voices.get("404404")
            except voiceapi.InvalidRequestError:
                pass
            not_retried = "tenacity" in sys.modules
            emu.inject("presets", 5000)
            await c.preset_voices.list(page_size=1)
            print(first, not_retried, "tenacity" in sys.modules)
asyncio.run(main())
"""


def test_tenacity_is_imported_only_when_a_call_retries() -> None:
    out = subprocess.run([sys.executable, "-W", "error", "-c", LAZY_SCRIPT],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False", "True"]


def test_retry_decisions_are_one_pure_function() -> None:
    from voiceapi._retry import RetryPolicy, Step, decide

    policy = RetryPolicy(initial_delay=0.5, max_delay=4.0)

    def step(exc: BaseException, **kw: object) -> Step:
        args: dict[str, object] = dict(idempotent=True, can_reconcile=False,
                                       retry_rate_limits=True, retries_used=0, max_retries=3,
                                       resigned=False, time_left=100.0, policy=policy,
                                       rng=lambda a, b: b)
        args.update(kw)
        return decide(exc, **args)  # type: ignore[arg-type]

    ambiguous = voiceapi.ServerError("x", code=5000, http_status=500)
    expired = voiceapi.AuthenticationError("x", code=1004, http_status=401)
    limited = voiceapi.RateLimitError("x", code=1303, http_status=429)
    assert step(ambiguous).retry and step(ambiguous).delay == 0.5
    assert not step(ambiguous, retries_used=3).retry
    assert not step(ambiguous, idempotent=False).retry
    create = step(ambiguous, idempotent=False, can_reconcile=True)
    assert create.retry and create.reconcile
    assert step(expired).resign and not step(expired, resigned=True).retry
    assert step(expired, retries_used=3).retry  # a re-sign is not a retry
    assert not step(limited, retry_rate_limits=False).retry
    assert not step(ambiguous, time_left=0.4).retry  # the wait would pass the budget


@pytest.mark.parametrize("closing", [False, True])
def test_a_call_aborted_before_it_started_releases_its_caller(closing: bool) -> None:
    from voiceapi._sync_runner import _Call

    async def work() -> int:
        return 1

    loop = asyncio.new_event_loop()
    call: _Call[int] = _Call(work())
    pending: set[_Call[object]] = set()

    def start_then_abort() -> None:  # Ctrl-C or close() lands before the task's first step
        call.start(loop, pending)
        call.abort()

    try:
        loop.call_soon(start_then_abort)
        loop.run_until_complete(asyncio.sleep(0.01))
    finally:
        loop.close()
    assert call.done.acquire(blocking=False)  # the caller is not left waiting
    assert not pending and inspect.getcoroutinestate(call.coro) == "CORO_CLOSED"
    with pytest.raises(voiceapi.ClientClosedError if closing else asyncio.CancelledError):
        call.outcome(closing)
    gc.collect()  # an unclosed coroutine would warn here (an error under -W error)


async def test_sync_client_errors_carry_no_secrets_and_keep_the_budget() -> None:
    """The same promises through VoiceClient (run in a thread: the servers live on this loop)."""
    server = await asyncio.start_server(_bad_http, "127.0.0.1", 0)
    malformed = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    app = web.Application()
    app[RELEASE] = asyncio.Event()
    app[SEEN] = []
    app.router.add_route("*", "/{tail:.*}", _fails_then_never)

    def call(base: str, **kw: float) -> tuple[voiceapi.VoiceAPIError, str, float]:
        with voiceapi.VoiceClient("ak", SECRET, base_url=base, retry_policy=FAST_RETRY,
                                  **kw) as client:  # type: ignore[arg-type]
            token = client.async_client.transport.config.credentials.authorization()
            start = time.monotonic()
            try:
                client.preset_voices.list()
            except voiceapi.VoiceAPIError as exc:
                return exc, token, time.monotonic() - start
        raise AssertionError("the call should have failed")

    try:
        async with serve(app) as hanging:
            err, token, _ = await asyncio.to_thread(call, malformed, timeout=0.3, max_retries=1)
            text = "\n".join(_everything(err))
            for secret in (SECRET, token, token.removeprefix("Bearer ")):
                assert secret not in text
            # As in test_last_attempt_is_clipped_to_the_retry_budget: a 503, then a 30 s
            # attempt that the 1 s budget clips (15 s tells clipped from not, under any load).
            err, _, took = await asyncio.to_thread(call, hanging, timeout=30, retry_budget=1.0)
            assert isinstance(err, voiceapi.APITimeoutError)
            assert took < 15 and len(app[SEEN]) == 2
            app[RELEASE].set()
    finally:
        server.close()
        await server.wait_closed()


ASYNC_DROP_SCRIPT = """
import asyncio, gc, sys, voiceapi
from voiceapi.testing import KlingEmulator
async def main() -> None:
    async with KlingEmulator() as emu:
        unused = voiceapi.AsyncVoiceClient(api_key=emu.api_key, base_url=emu.base_url)
        c = voiceapi.AsyncVoiceClient(api_key=emu.api_key, base_url=emu.base_url)
        await c.preset_voices.list(page_size=1)
        if sys.argv[1] == "close":
            await c.aclose()
        del c, unused
        gc.collect()
        print("collected", flush=True)
asyncio.run(main())
"""


@pytest.mark.parametrize("how", ["drop", "close"])
def test_a_dropped_async_client_says_how_to_close_it(how: str) -> None:
    out = subprocess.run([sys.executable, "-c", ASYNC_DROP_SCRIPT, how], capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "collected", out.stderr
    hint = "AsyncVoiceClient was garbage-collected with its HTTP session open"
    # Once for the client that opened a session; nothing for one never used, or closed.
    assert out.stderr.count(hint) == (1 if how == "drop" else 0), out.stderr
    if how == "drop":
        assert "`async with AsyncVoiceClient(...) as client:`" in out.stderr
