"""Callbacks under attack: hostile senders and odd headers, secrets, stalled senders, shutdown.

tests/test_webhooks.py covers the happy paths and ordinary malformed bodies; each test here
failed on the code before its fix.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import hashlib
import hmac
import socket
import threading
import time
import tracemalloc
from collections.abc import Callable

import aiohttp
import pytest

import voiceapi
from voiceapi import _webhooks

SECRET = "whsec_dGVzdHNlY3JldHRlc3RzZWNyZXR0ZXN0c2VjcmV0MTI="
BODY = b'{"task_id":"1","task_status":"succeed"}'


def _sign(body: bytes, *, secret: str = SECRET, wid: str = "msg_1",
          ts: str | None = None) -> dict[str, str]:
    """Standard Webhooks headers for ``body``, computed independently of the SDK."""
    stamp = str(int(time.time())) if ts is None else ts
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{wid}.{stamp}.".encode() + body, hashlib.sha256).digest()
    return {"webhook-id": wid, "webhook-timestamp": stamp,
            "webhook-signature": "v1," + base64.b64encode(digest).decode()}


def _port(cb: voiceapi.CallbackServer) -> int:
    return int(cb.url.rsplit(":", 1)[1].split("/", 1)[0])


# --- verification: what a forger controls ------------------------------------------------------

@pytest.mark.parametrize("stamp", ["1" + "0" * 400, "-" + "9" * 400])
def test_a_huge_timestamp_is_a_typed_error(stamp: str) -> None:
    """``time() - 10**400`` overflowed a float: an OverflowError (a 500) instead of a 400."""
    headers = {**_sign(BODY), "webhook-timestamp": stamp}
    with pytest.raises(voiceapi.WebhookVerificationError, match="window"):
        voiceapi.verify_signature(BODY, headers, SECRET)


@pytest.mark.parametrize("name", ["webhook-id", "webhook-signature"])
def test_undecodable_header_bytes_are_a_typed_error(name: str) -> None:
    """aiohttp decodes header bytes that are not UTF-8 to lone surrogates; ``encode()`` of
    them raised UnicodeEncodeError (a 500) instead of a refusal."""
    headers = {**_sign(BODY), name: "v1,\udcff\udcfe"}
    with pytest.raises(voiceapi.WebhookVerificationError, match="ASCII"):
        voiceapi.verify_signature(BODY, headers, SECRET)


async def test_a_receiver_answers_400_to_header_bytes_that_are_not_utf8() -> None:
    """End to end over a socket: raw non-UTF-8 bytes in webhook-id get a 400, not a 500."""
    async with voiceapi.CallbackServer(webhook_secret=SECRET) as cb:
        headers = _sign(BODY)
        reader, writer = await asyncio.open_connection("127.0.0.1", _port(cb))
        try:
            writer.write(b"POST /kling-callback HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                         b"webhook-id: msg_\xff\xfe\r\n"
                         + f"webhook-timestamp: {headers['webhook-timestamp']}\r\n"
                           f"webhook-signature: {headers['webhook-signature']}\r\n"
                           f"Content-Length: {len(BODY)}\r\nConnection: close\r\n\r\n".encode()
                         + BODY)
            await writer.drain()
            status_line = await asyncio.wait_for(reader.readline(), 10)
        finally:
            writer.close()
        assert status_line.split()[1] == b"400"
        assert cb.receiver.rejected == 1 and cb.receiver.received == 0


@pytest.mark.parametrize("secret", ["", "whsec_"])
def test_an_empty_secret_verifies_nothing(secret: str) -> None:
    """An HMAC keyed with nothing is one anybody computes: a forger's callback passed when
    the secret was empty (an unset environment variable read as "")."""
    forged = _sign(BODY, secret=secret)
    with pytest.raises(voiceapi.WebhookVerificationError, match="empty") as info:
        voiceapi.parse_callback(BODY, forged, webhook_secret=secret)
    assert forged["webhook-signature"][3:] not in str(info.value)


@pytest.mark.parametrize("secret", ["", "whsec_", "whsec_not base64!", "whsec_abc"])
def test_a_receiver_refuses_an_unusable_secret_when_it_is_built(secret: str) -> None:
    """It used to start fine and answer 400 to every callback Kling sent (which then gives
    up on them): the misconfiguration surfaced nowhere but in ``receiver.rejected``."""
    with pytest.raises(voiceapi.ValidationError) as info:
        voiceapi.CallbackReceiver(webhook_secret=secret)
    assert "whsec_abc" not in str(info.value) and "base64!" not in str(info.value)
    with pytest.raises(voiceapi.ValidationError):
        voiceapi.CallbackServer(webhook_secret=secret)


# --- senders that stall, servers that stop ---------------------------------------------------

async def _stalled_sender(cb: voiceapi.CallbackServer) -> tuple[asyncio.StreamReader,
                                                                 asyncio.StreamWriter]:
    """A connection that announces a body and sends only its first byte (a slow-loris)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", _port(cb))
    writer.write(b"POST /kling-callback HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 + f"Content-Length: {len(BODY)}\r\n\r\n".encode() + BODY[:1])
    await writer.drain()
    return reader, writer


async def test_a_stalled_sender_is_answered_408(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sender that never finishes its body held a handler (and a connection) for ever."""
    monkeypatch.setattr(_webhooks, "CALLBACK_READ_TIMEOUT", 0.2)
    seen: list[voiceapi.VoiceTask] = []
    async with voiceapi.CallbackServer() as cb:
        cb.subscribe(seen.append)
        reader, writer = await _stalled_sender(cb)
        try:
            status_line = await asyncio.wait_for(reader.readline(), 10)
        finally:
            writer.close()
        assert status_line.split()[1] == b"408"
        assert cb.receiver.rejected == 1 and seen == []
        # The receiver still serves everybody else.
        async with aiohttp.ClientSession() as http, http.post(cb.url, data=BODY) as resp:
            assert resp.status == 200
    assert [t.task_id for t in seen] == ["1"]


async def _until_a_request_is_in_progress(cb: voiceapi.CallbackServer) -> None:
    assert cb._runner is not None and cb._runner.server is not None
    server = cb._runner.server
    for _ in range(1000):  # bounded: until the server's handler has the stalled request
        if any(c._current_request is not None for c in server.connections):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the stalled request never reached the server")


async def test_stop_does_not_wait_a_minute_for_a_stalled_sender() -> None:
    """aiohttp's default shutdown timeout (60 s) let one stalled sender hold stop() and so
    every ``async with CallbackServer()`` exit for a minute."""
    cb = voiceapi.CallbackServer()
    await cb.start()
    _, writer = await _stalled_sender(cb)
    try:
        await _until_a_request_is_in_progress(cb)
        await asyncio.wait_for(cb.stop(), 20)
    finally:
        writer.close()


async def test_stop_cancels_a_listener_that_hangs_and_forgets_its_delivery() -> None:
    """A listener that never returns: stop() ends it (it used to wait 2 x 60 s) and the
    delivery is not marked done, so the sender's retry is handled afresh."""
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def hang(task: voiceapi.VoiceTask) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    cb = voiceapi.CallbackServer(webhook_secret=SECRET)
    await cb.start()
    cb.subscribe(hang)
    async with aiohttp.ClientSession() as http:
        posting = asyncio.create_task(http.post(cb.url, data=BODY, headers=_sign(BODY)))
        await asyncio.wait_for(started.wait(), 10)
        await asyncio.wait_for(cb.stop(), 20)
        with pytest.raises(aiohttp.ClientError):
            await posting
    assert cancelled.is_set()
    assert cb.receiver._in_progress == set() and not cb.receiver._delivered


# --- the standalone server's own life -------------------------------------------------------

def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
async def test_an_ipv6_host_gives_a_usable_url() -> None:
    """``host="::1"`` gave "http://::1:PORT/…", which no HTTP client (nor Kling) accepts."""
    async with voiceapi.CallbackServer(host="::1") as cb:
        assert cb.url.startswith("http://[::1]:")
        async with aiohttp.ClientSession() as http, http.post(cb.url, data=BODY) as resp:
            assert resp.status == 200
    assert cb.receiver.received == 1


async def test_a_second_start_is_refused_and_stop_closes_everything() -> None:
    """A second start() bound a second socket and forgot the first: after stop() the first
    port still answered callbacks (and its socket leaked)."""
    cb = voiceapi.CallbackServer()
    await cb.start()
    first = cb.url
    try:
        with pytest.raises(RuntimeError, match="already running"):
            await cb.start()
        assert cb.url == first
    finally:
        await cb.stop()
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientConnectionError):
            async with http.post(first, data=BODY):
                pass
    assert cb.receiver.received == 0


async def test_a_failed_start_leaves_nothing_running_and_can_be_retried() -> None:
    """The port is taken: start() raises, and a later start() (on a free port) works; the
    runner of the failed one used to stay behind (``async with`` never calls stop() then)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cb = voiceapi.CallbackServer(port=taken.getsockname()[1])
        with pytest.raises(OSError):
            async with cb:
                pass
        assert cb._runner is None
    cb._port = 0
    async with cb:
        async with aiohttp.ClientSession() as http, http.post(cb.url, data=BODY) as resp:
            assert resp.status == 200



async def test_two_stops_at_once_both_return() -> None:
    """A second stop() while the first was cleaning up failed inside aiohttp
    (AttributeError: 'NoneType' object has no attribute 'pre_shutdown')."""
    cb = voiceapi.CallbackServer()
    await cb.start()
    url = cb.url
    await asyncio.wait_for(asyncio.gather(cb.stop(), cb.stop()), 20)
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientConnectionError):
            async with http.post(url, data=BODY):
                pass


# --- listeners on another event loop (the sync client's) ---------------------------------------

class _LoopThread:
    """An event loop running in its own thread, as the sync client's runner has."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> _LoopThread:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


async def _handle(receiver: voiceapi.CallbackReceiver, wid: str) -> int:
    from aiohttp.test_utils import make_mocked_request

    request = make_mocked_request("POST", "/", headers={"webhook-id": wid})
    request._read_bytes = BODY
    return (await receiver.handle(request)).status


async def test_a_listener_runs_on_the_loop_it_subscribed_from() -> None:
    """create_many(callbacks=cb) on the sync client subscribes from its runner's loop while
    the server serves on another: the listener ran on the server's thread and set an
    asyncio.Event of the other loop from there (asyncio's "Non-thread-safe operation" in
    debug mode; otherwise the batch slept through the callback until its safety-net poll)."""
    receiver = voiceapi.CallbackReceiver()
    ran_on: list[asyncio.AbstractEventLoop] = []

    async def listen(task: voiceapi.VoiceTask) -> None:
        await asyncio.sleep(0)
        ran_on.append(asyncio.get_running_loop())

    with _LoopThread() as other:
        async def subscribe() -> Callable[[], None]:
            return receiver.subscribe(listen)

        unsubscribe = await asyncio.wrap_future(
            asyncio.run_coroutine_threadsafe(subscribe(), other.loop))
        assert await asyncio.wait_for(_handle(receiver, "a"), 10) == 200
        assert ran_on == [other.loop]  # it ran there, and the answer waited for it
        unsubscribe()
        assert await _handle(receiver, "b") == 200
        assert ran_on == [other.loop]


async def test_a_listener_whose_loop_ended_is_still_called() -> None:
    """Subscribed inside an ``asyncio.run()`` that has ended: called here, as before."""
    receiver = voiceapi.CallbackReceiver()
    seen: list[str] = []

    def subscribe_elsewhere() -> None:
        async def subscribe() -> None:
            receiver.subscribe(lambda t: seen.append(t.task_id))

        asyncio.run(subscribe())

    await asyncio.to_thread(subscribe_elsewhere)
    assert await _handle(receiver, "a") == 200
    assert seen == ["1"]


def test_sync_create_many_wakes_on_callbacks_from_a_server_on_another_loop() -> None:
    """End to end with the sync client: three short tasks, polls every 10 minutes, so only
    the callbacks can end the batch within its timeout."""
    from voiceapi.testing import KlingEmulator

    with _LoopThread() as other, KlingEmulator(concurrency=3, task_seconds=0.05) as emu:
        cb = voiceapi.CallbackServer()
        asyncio.run_coroutine_threadsafe(cb.start(), other.loop).result(10)
        try:
            with voiceapi.VoiceClient(emu.access_key, emu.secret_key,
                                      base_url=emu.base_url) as client:
                results = client.custom_voices.create_many(
                    [{"voice_name": f"v{i}", "voice_url": emu.sample_url(10)} for i in range(3)],
                    callbacks=cb, poll_interval=600, timeout=10)
        finally:
            asyncio.run_coroutine_threadsafe(cb.stop(), other.loop).result(10)
    assert [r.ok for r in results] == [True] * 3, [r.error for r in results]


def test_the_sync_clients_get_works_as_confirm() -> None:
    """``confirm=sync_client.custom_voices.get`` was accepted, then every callback was a 500
    (TypeError: a VoiceTask cannot be awaited), so no update ever reached the listeners."""
    from voiceapi.testing import KlingEmulator

    seen: list[voiceapi.VoiceTask] = []
    with KlingEmulator(task_seconds=60) as emu, voiceapi.VoiceClient(
            emu.access_key, emu.secret_key, base_url=emu.base_url) as client:
        task = client.custom_voices.create(voice_name="c", voice_url=emu.sample_url(10))

        async def post_a_forged_end() -> int:
            async with voiceapi.CallbackServer(confirm=client.custom_voices.get) as cb:
                cb.subscribe(seen.append)
                lie = {"task_id": task.task_id, "task_status": "failed"}
                async with aiohttp.ClientSession() as http, http.post(cb.url, json=lie) as resp:
                    return resp.status

        assert asyncio.run(post_a_forged_end()) == 200
    assert [t.task_id for t in seen] == [task.task_id]
    assert seen[0].task_status is not voiceapi.TaskStatus.FAILED  # the API's answer won


async def test_a_lambda_returning_a_coroutine_still_confirms() -> None:
    """The adapter for plain functions still awaits what they return."""
    confirmed: list[str] = []

    async def get(task_id: str) -> voiceapi.VoiceTask:
        confirmed.append(task_id)
        return voiceapi.parse_callback(b'{"task_id":"%s","task_status":"processing"}'
                                       % task_id.encode(), {})

    seen: list[voiceapi.VoiceTask] = []
    receiver = voiceapi.CallbackReceiver(seen.append, confirm=lambda i: get(i))
    assert await _handle(receiver, "a") == 200
    assert confirmed == ["1"] and seen[0].task_status is voiceapi.TaskStatus.PROCESSING


async def test_long_webhook_ids_do_not_pile_up_in_memory() -> None:
    """Delivered ``webhook-id``s are remembered (10 000 by default) to drop repeats; kept as
    sent, an unsigned sender's 8 kB ids made that 80 MB. 300 of them must not keep 2.4 MB."""
    receiver = voiceapi.CallbackReceiver()
    assert await _handle(receiver, "warm-up") == 200
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(300):
            assert await _handle(receiver, f"{i:08d}" + "x" * 8000) == 200
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 1_000_000, kept
    assert await _handle(receiver, "00000007" + "x" * 8000) == 200  # a repeat: not added
    assert len(receiver._delivered) == 301

# --- found here, fixed in voiceapi/_decode.py ----------------------------------------------------

def test_one_callback_cannot_flood_the_log(caplog: pytest.LogCaptureFixture) -> None:
    body = (b'{"task_id":"1","task_status":"succeed","task_result":{"voices":['
            + b",".join([b"{}"] * 1000) + b"]}}")
    with caplog.at_level("WARNING", logger="voiceapi"):
        task = voiceapi.parse_callback(body, {})
    assert task.voices == []
    assert len(caplog.records) <= 10
