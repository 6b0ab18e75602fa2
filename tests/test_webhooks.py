"""Callbacks: Standard Webhooks verification, parsing both shapes, receivers end to end."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web

import voiceapi
from tests.conftest import FAST_RETRY, serve
from voiceapi.testing import KlingEmulator

SECRET = "whsec_dGVzdHNlY3JldHRlc3RzZWNyZXR0ZXN0c2VjcmV0MTI="
VECTOR_BODY = (b'{"id":"1234567890","status":"succeeded","message":"","create_time":'
               b'1781080778802,"update_time":1781080794151}')
VECTOR_HEADERS = {"webhook-id": "9876543210", "webhook-timestamp": "1781080794",
                  "webhook-signature": "v1,UsKlJP00XoQyOn410NM9xv34sP+Gl0jnOO9Lcpr7NJ4="}


def test_official_vector_verifies_and_parses() -> None:
    task = voiceapi.parse_callback(VECTOR_BODY, VECTOR_HEADERS, webhook_secret=SECRET,
                                   now=1781080794 + 10)
    assert task.task_id == "1234567890"
    assert task.task_status is voiceapi.TaskStatus.SUCCEED


def test_headers_are_case_insensitive_and_rotation_is_supported() -> None:
    headers = {k.upper(): v for k, v in VECTOR_HEADERS.items()}
    headers["WEBHOOK-SIGNATURE"] = "v1,bm9wZQ== " + VECTOR_HEADERS["webhook-signature"]
    voiceapi.verify_signature(VECTOR_BODY, headers, SECRET, now=1781080794)


@pytest.mark.parametrize(("change", "needle"), [
    ({"webhook-signature": "v1,AAAA"}, "no webhook signature matched"),
    ({"webhook-signature": "v2," + VECTOR_HEADERS["webhook-signature"][3:]}, "matched"),
    ({"webhook-timestamp": "1781080794x"}, "integer"),
    ({"webhook-id": ""}, "missing"),
])
def test_bad_signatures_are_rejected(change: dict[str, str], needle: str) -> None:
    headers = {**VECTOR_HEADERS, **change}
    with pytest.raises(voiceapi.WebhookVerificationError, match=needle) as info:
        voiceapi.parse_callback(VECTOR_BODY, headers, webhook_secret=SECRET, now=1781080794)
    assert SECRET not in str(info.value) and "UsKlJP00" not in str(info.value)


def test_tampered_body_and_stale_timestamp_are_rejected() -> None:
    with pytest.raises(voiceapi.WebhookVerificationError):
        voiceapi.parse_callback(VECTOR_BODY.replace(b"succeeded", b"failed"), VECTOR_HEADERS,
                                webhook_secret=SECRET, now=1781080794)
    with pytest.raises(voiceapi.WebhookVerificationError, match="window"):
        voiceapi.parse_callback(VECTOR_BODY, VECTOR_HEADERS, webhook_secret=SECRET,
                                now=1781080794 + 301)
    voiceapi.parse_callback(VECTOR_BODY, VECTOR_HEADERS, webhook_secret=SECRET,
                            now=1781080794 - 299)


def test_legacy_record_parses_with_voices() -> None:
    body = json.dumps({"task_id": "930801301486305328", "task_status": "succeed",
                       "task_status_msg": "", "created_at": 1722769557708,
                       "updated_at": 1722769557708, "final_unit_deduction": "0.05",
                       "task_info": {"external_task_id": "e-1"},
                       "task_result": {"voices": [{"voice_id": "9", "voice_name": "n",
                                                   "trial_url": "u", "owned_by": "1"}]}})
    task = voiceapi.parse_callback(body.encode(), {})
    assert task.voice_id == "9" and task.external_task_id == "e-1"


def test_new_standard_voice_output_is_tolerated() -> None:
    body = json.dumps({"id": "77", "status": "succeeded", "message": "", "external_id": "x",
                       "outputs": [{"type": "voice", "id": "5", "name": "n", "url": "u",
                                    "owned_by": "1", "status": "succeeded"}]})
    task = voiceapi.parse_callback(body.encode(), {})
    assert (task.task_id, task.voice_id, task.external_task_id) == ("77", "5", "x")


@pytest.mark.parametrize("body", [b"", b"nope", b"[]", b'{"task_id":"1","id":"2"}', b"{}",
                                  b'{"task_id":""}', b'{"id":"1","outputs":5}'])
def test_malformed_bodies_are_typed_errors(body: bytes) -> None:
    with pytest.raises(voiceapi.WebhookVerificationError):
        voiceapi.parse_callback(body, {})


async def test_signed_callbacks_end_to_end_with_confirmation() -> None:
    secret = "whsec_" + "c2VjcmV0LWtleS1mb3ItdGVzdHMtMTIzNDU2Nzg5MA=="
    updates: list[voiceapi.VoiceTask] = []
    finished = asyncio.Event()

    async with KlingEmulator(task_seconds=0.1, webhook_secret=secret) as emu:
        async with voiceapi.AsyncVoiceClient(api_key=emu.api_key, base_url=emu.base_url,
                                             retry_policy=FAST_RETRY) as client:
            async with voiceapi.CallbackServer(
                    webhook_secret=secret, confirm=client.custom_voices.get) as cb:
                def listen(task: voiceapi.VoiceTask) -> None:
                    updates.append(task)
                    if task.is_terminal:
                        finished.set()

                cb.subscribe(listen)
                task = await client.custom_voices.create(
                    voice_name="hooked", voice_url=emu.sample_url(), callback_url=cb.url)
                await asyncio.wait_for(finished.wait(), 10)
                # A forged (unsigned) callback is refused.
                async with aiohttp.ClientSession() as http:
                    async with http.post(cb.url, json={"task_id": task.task_id,
                                                       "task_status": "failed"}) as resp:
                        assert resp.status == 400
                assert cb.receiver.rejected == 1
    assert [u.task_id for u in updates] == [task.task_id] * len(updates)
    assert updates[-1].task_status is voiceapi.TaskStatus.SUCCEED
    assert updates[-1].voice is not None and updates[-1].voice.voice_name == "hooked"
    assert [c["record"]["task_status"] for c in emu.callbacks] == ["processing", "succeed"]


async def test_repeated_webhook_ids_are_dropped() -> None:
    seen: list[str] = []
    receiver = voiceapi.CallbackReceiver(lambda t: seen.append(t.task_id))
    from aiohttp.test_utils import make_mocked_request

    body = b'{"task_id":"1","task_status":"processing"}'
    for _ in range(3):
        request = make_mocked_request("POST", "/", headers={"webhook-id": "same"})
        request._read_bytes = body
        response = await receiver.handle(request)
        assert response.status == 200
    assert seen == ["1"]


async def test_create_many_uses_callbacks_to_poll_less() -> None:
    async with KlingEmulator(concurrency=3, task_seconds=0.2) as emu:
        async with voiceapi.AsyncVoiceClient(api_key=emu.api_key, base_url=emu.base_url,
                                             retry_policy=FAST_RETRY) as client:
            async with voiceapi.CallbackServer() as cb:
                items: list[dict[str, Any]] = [
                    {"voice_name": f"cb{i}", "voice_url": emu.sample_url()} for i in range(9)]
                results = await client.custom_voices.create_many(items, callbacks=cb)
                # The batch may have seen the last task end by a poll before its callback.
                await emu.deliver_callbacks()
    assert all(r.ok for r in results)
    assert all(c["url"] == cb.url for c in emu.callbacks)
    assert len(emu.callbacks) == 18  # processing + succeed per task
    assert emu.count("list") + emu.count("get") <= 9 * 3


@pytest.mark.parametrize("threaded", [False, True], ids=["async", "with-thread"])
async def test_deliver_callbacks_sends_what_is_due_without_waiting_for_the_tick(
        threaded: bool) -> None:
    """The emulator's tick sends callbacks within 50 ms; a test asserting on them right after
    its client returned must not depend on having waited that long."""
    emu = KlingEmulator(task_seconds=60)
    if threaded:
        emu.__enter__()
    else:
        await emu.start()
    try:
        async with voiceapi.CallbackServer() as cb, voiceapi.AsyncVoiceClient(
                api_key=emu.api_key, base_url=emu.base_url) as client:
            task = await client.custom_voices.create(
                voice_name="due", voice_url=emu.sample_url(), callback_url=cb.url)
            emu.advance(120)  # ended: two callbacks due (processing, succeed), none sent yet
            await emu.deliver_callbacks()
            assert [(c["record"]["task_id"], c["record"]["task_status"], c["status"])
                    for c in emu.callbacks] == [(task.task_id, "processing", 200),
                                                (task.task_id, "succeed", 200)]
            await emu.deliver_callbacks()  # nothing new is due: nothing is sent twice
            assert len(emu.callbacks) == 2
    finally:
        if threaded:
            emu.__exit__(None, None, None)
        else:
            await emu.stop()
    with pytest.raises(RuntimeError, match="not running"):
        await KlingEmulator().deliver_callbacks()


class _HeldReceiver:
    """A callback receiver that holds every request until released (one that hangs)."""

    def __init__(self) -> None:
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()
        self.received: list[str] = []
        self.answered: list[str] = []

    async def handle(self, request: web.Request) -> web.Response:
        status = (await request.json())["task_status"]
        self.received.append(status)
        self.arrived.set()
        await self.release.wait()
        self.answered.append(status)
        return web.Response(text="ok")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/cb", self.handle)
        return app


async def _start(emu: KlingEmulator, threaded: bool) -> None:
    if threaded:
        emu.__enter__()
    else:
        await emu.start()


async def _stop(emu: KlingEmulator, threaded: bool) -> None:
    if threaded:  # off the test's loop, which serves the receiver meanwhile
        await asyncio.to_thread(emu.__exit__, None, None, None)
    else:
        await emu.stop()


async def _create_with_callback(emu: KlingEmulator, callback_url: str) -> str:
    async with voiceapi.AsyncVoiceClient(api_key=emu.api_key, base_url=emu.base_url) as client:
        task = await client.custom_voices.create(
            voice_name="held", voice_url=emu.sample_url(), callback_url=callback_url)
    return task.task_id


@pytest.mark.parametrize("threaded", [False, True], ids=["async", "with-thread"])
async def test_deliver_callbacks_after_stop_sends_nothing(threaded: bool) -> None:
    """A stopped emulator sends no callback (it used to, from a fresh HTTP session it then
    never closed)."""
    held = _HeldReceiver()
    held.release.set()
    async with serve(held.app()) as url:
        emu = KlingEmulator(task_seconds=60)
        await _start(emu, threaded)
        await _create_with_callback(emu, url + "/cb")
        await _stop(emu, threaded)
        emu.advance(120)  # two callbacks are due now, on an emulator that is not running
        with pytest.raises(RuntimeError, match="not running"):
            await emu.deliver_callbacks()
    assert emu.callbacks == [] and held.received == []


@pytest.mark.parametrize("tick_first", [False, True], ids=["either-sends", "tick-sends"])
@pytest.mark.parametrize("threaded", [False, True], ids=["async", "with-thread"])
async def test_stop_ends_a_delivery_to_a_receiver_that_hangs(threaded: bool,
                                                             tick_first: bool) -> None:
    """deliver_callbacks() waiting on a receiver that never answers: stopping the emulator
    ends it with a clear error (in `with` mode its caller used to wait on a closed loop).
    Whether its own round or the tick's is the one stuck sending, the error is the same (a
    round that was waiting for the tick's said "not running" instead)."""
    held = _HeldReceiver()
    async with serve(held.app()) as url:
        emu = KlingEmulator(task_seconds=60)
        await _start(emu, threaded)
        await _create_with_callback(emu, url + "/cb")
        emu.advance(120)
        if tick_first:  # the tick's round is stuck sending; ours waits for its turn
            await asyncio.wait_for(held.arrived.wait(), 30)
        delivering = asyncio.create_task(emu.deliver_callbacks())
        await asyncio.wait_for(held.arrived.wait(), 30)  # the first callback is in flight
        for _ in range(3000):  # bounded: until our round exists (a task starts when it runs)
            if emu._cb_rounds:
                break
            await asyncio.sleep(0.001)
        assert emu._cb_rounds and not delivering.done()
        await _stop(emu, threaded)
        with pytest.raises(RuntimeError, match="stopped before the callbacks were delivered"):
            await delivering
        held.release.set()
    assert [c["record"]["task_status"] for c in emu.callbacks] == ["processing"]
    assert emu.callbacks[0]["status"] is None  # never answered, and not sent again
    assert held.received == ["processing"]


async def test_deliver_callbacks_waits_for_the_round_the_tick_has_under_way() -> None:
    """The tick took both due callbacks and holds on the first: deliver_callbacks() returns
    only after the tick's round delivered them (it must not see "nothing due" and return)."""
    held = _HeldReceiver()
    async with serve(held.app()) as url:
        async with KlingEmulator(task_seconds=60) as emu:
            await _create_with_callback(emu, url + "/cb")
            emu.advance(120)
            await asyncio.wait_for(held.arrived.wait(), 30)  # the tick's round is sending
            delivering = asyncio.create_task(emu.deliver_callbacks())
            seen_at_return: list[list[str]] = []
            delivering.add_done_callback(lambda _: seen_at_return.append(list(held.answered)))
            # Give a wrong emulator every chance to return early; a right one waits anyway.
            for _ in range(50):
                await asyncio.sleep(0)
            held.release.set()
            await delivering
    assert seen_at_return == [["processing", "succeed"]]
    assert [(c["record"]["task_status"], c["status"]) for c in emu.callbacks] == [
        ("processing", 200), ("succeed", 200)]
