"""Adversarial tests (session 5, advlife): deletes and transports whose answers go missing."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import traceback
from typing import Any

import pytest

import voiceapi
from tests._raw_server import raw_server
from tests.conftest import FAST_RETRY
from voiceapi._decode import is_already_deleted
from voiceapi._retry import RetryPolicy, backoff_delay, decide
from voiceapi.testing import KlingEmulator


async def _ready_voice(client: voiceapi.AsyncVoiceClient, emu: KlingEmulator) -> str:
    task = await client.custom_voices.create(voice_name="v", voice_url=emu.sample_url())
    task = await client.custom_voices.wait(task, timeout=10, poll_interval=0.01)
    assert task.voice_id is not None
    return task.voice_id


@pytest.mark.parametrize("fault", ["commit_then_drop", "commit_then_5000", "truncated"])
async def test_a_delete_whose_answer_was_lost_is_not_reported_as_already_deleted(
        client: voiceapi.AsyncVoiceClient, emu: KlingEmulator, fault: str) -> None:
    # The first attempt deletes the voice, but its answer is lost; the resend is refused with
    # "Voice already be deleted": that is the first attempt's success, not the caller's error.
    voice_id = await _ready_voice(client, emu)
    emu.inject("delete", fault)
    await client.custom_voices.delete(voice_id)
    assert emu.count("delete") == 2
    (task,) = [t async for t in client.custom_voices.iter_all()]
    assert task.voice is not None and task.voice.is_deleted


async def test_deleting_a_voice_deleted_before_the_call_still_raises(
        client: voiceapi.AsyncVoiceClient, emu: KlingEmulator) -> None:
    voice_id = await _ready_voice(client, emu)
    await client.custom_voices.delete(voice_id)
    with pytest.raises(voiceapi.InvalidRequestError, match="already be deleted") as info:
        await client.custom_voices.delete(voice_id)
    assert is_already_deleted(info.value)
    # A rate-limited first attempt was refused before anything happened: its resend's
    # "already deleted" is the caller's to hear, too.
    emu.inject("delete", 1303)
    with pytest.raises(voiceapi.InvalidRequestError, match="already be deleted"):
        await client.custom_voices.delete(voice_id)


def test_already_deleted_is_recognised_narrowly() -> None:
    def refused(message: str, code: int = 1201) -> voiceapi.InvalidRequestError:
        return voiceapi.InvalidRequestError(message, code=code, http_status=400)

    assert is_already_deleted(refused("Voice already be deleted for id: 93"))
    assert is_already_deleted(refused("voice 93 has already been deleted"))
    assert not is_already_deleted(refused("Voice not found for id: 93"))
    assert not is_already_deleted(refused("Voice already be deleted", code=1303))
    assert not is_already_deleted(voiceapi.ServerError("already deleted", code=5000,
                                                       http_status=500))


def test_an_idempotent_call_with_a_hook_hears_of_a_resend_after_an_ambiguous_attempt() -> None:
    def step(exc: BaseException, *, idempotent: bool, can_reconcile: bool) -> tuple[bool, bool]:
        s = decide(exc, idempotent=idempotent, can_reconcile=can_reconcile,
                   retry_rate_limits=True, retries_used=0, max_retries=3, resigned=False,
                   time_left=100.0, policy=RetryPolicy())
        return s.retry, s.reconcile

    lost = voiceapi.ServerError("x", code=5000, http_status=500)
    limited = voiceapi.RateLimitError("x", code=1302, http_status=429)
    assert step(lost, idempotent=True, can_reconcile=True) == (True, True)
    assert step(lost, idempotent=True, can_reconcile=False) == (True, False)
    assert step(limited, idempotent=True, can_reconcile=True) == (True, False)
    assert step(lost, idempotent=False, can_reconcile=False) == (False, False)


# --- a broken proxy that reflects our Authorization header into bytes aiohttp cannot parse ---

SECRET = "sk-SECRET-reflected-0123456789abcdef"

#: Answers that quote the request's Authorization value where aiohttp's parser (or our own
#: error text) repeats it: aiohttp puts the offending bytes in its error message.
REFLECTIONS = {
    "status code": b"HTTP/1.1 20x %s\r\nContent-Length: 2\r\n\r\n{}",
    "status line": b"HTTP/1.1 %s\r\n\r\n",
    "header token": b"HTTP/1.1 200 OK\r\nX-Echo %s\r\nContent-Length: 2\r\n\r\n{}",
    "content-length": b"HTTP/1.1 200 OK\r\nContent-Length: %s\r\n\r\n{}",
    "chunk size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%s\r\n",
    "long header": b"HTTP/1.1 200 OK\r\nX-Echo: %s" + b"A" * 9000 + b"\r\n\r\n",
    "content-type": b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; %s\r\n"
                    b"Content-Length: 2\r\n\r\nxx",
}


def _texts(exc: BaseException, depth: int = 0) -> list[str]:
    """What an error shows: str, repr, args, the formatted chain, notes and attributes."""
    out = [str(exc), repr(exc), *map(repr, exc.args), *traceback.format_exception(exc),
           *map(str, getattr(exc, "__notes__", ())), *map(repr, vars(exc).values())]
    for linked in (exc.__cause__, exc.__context__):
        if linked is not None and depth < 5:
            out += _texts(linked, depth + 1)
    return out


@pytest.mark.parametrize("credential", ["jwt", "api_key"])
@pytest.mark.parametrize("reflection", sorted(REFLECTIONS))
async def test_a_reflected_credential_never_reaches_error_texts_or_logs(
        reflection: str, credential: str, caplog: pytest.LogCaptureFixture) -> None:
    async def reflect(method: str, target: str, writer: asyncio.StreamWriter) -> bool:
        writer.write(REFLECTIONS[reflection] % seen.auth[-1].encode())
        return False

    keys = ({"access_key": "ak-reflected", "secret_key": SECRET} if credential == "jwt"
            else {"api_key": SECRET})
    caplog.set_level(logging.DEBUG)
    async with raw_server(reflect) as (base, seen), voiceapi.AsyncVoiceClient(
            base_url=base, timeout=2, max_retries=0, retry_policy=FAST_RETRY,
            **keys) as client:  # type: ignore[arg-type]
        errors = []
        for call in (client.preset_voices.list(),
                     client.custom_voices.create(voice_name="n", voice_url="https://x/a.wav")):
            with pytest.raises(voiceapi.VoiceAPIError) as info:
                await call
            errors.append(info.value)
    token = seen.auth[-1].removeprefix("Bearer ")
    assert len(token) > 20 and seen.auth[-1].startswith("Bearer ")
    shown = "\n".join([text for error in errors for text in _texts(error)] + [caplog.text])
    assert SECRET not in shown and token not in shown
    # On Python 3.10 aiohttp's own exception used to come along as __context__.
    assert all(isinstance(link, voiceapi.VoiceAPIError) for error in errors
               for link in _links(error))


def _links(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    for linked in (exc.__cause__, exc.__context__):
        if linked is not None and linked not in out:
            out += [linked, *_links(linked)]
    return out


# --- a keep-alive connection the server closes as the next request arrives ------------------

def _answer(status: int, payload: dict[str, Any]) -> bytes:
    body = json.dumps(payload).encode()
    return (f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def _task(task_id: str, ext: str) -> dict[str, Any]:
    return {"task_id": task_id, "task_status": "submitted",
            "task_info": {"external_task_id": ext}}


class _StaleFirstConnection:
    """Answers like Kling, except that the first connection, pooled after its first answer,
    is closed unanswered when the next request comes on it: the server's keep-alive timeout
    met the client's reuse. That request was read, never acted on."""

    def __init__(self) -> None:
        self.first: asyncio.StreamWriter | None = None
        self.served: dict[int, int] = {}
        self.created: list[str] = []
        self.deleted: list[str] = []
        self.lines: list[str] = []

    async def __call__(self, method: str, target: str, writer: asyncio.StreamWriter) -> bool:
        self.first = self.first or writer
        n = self.served[id(writer)] = self.served.get(id(writer), 0) + 1
        self.lines.append(f"{method} {target.split('?')[0]}")
        if writer is self.first and n == 2:
            writer.transport.abort()
            return False
        writer.write(self.answer(method, target))
        return True

    def answer(self, method: str, target: str) -> bytes:
        path = target.split("?")[0]
        if method == "GET" and path == "/v1/general/presets-voices":
            return _answer(200, {"code": 0, "message": "SUCCEED", "request_id": "r", "data": []})
        if method == "GET":
            ext = path.rsplit("/", 1)[1]
            if ext in self.created:
                return _answer(200, {"code": 0, "message": "SUCCEED", "request_id": "r",
                                     "data": _task("t-1", ext)})
            return _answer(400, {"code": 1201, "request_id": "r",
                                 "message": f"Task not found by id/external id: {ext}"})
        if path.endswith("/delete-voices"):
            self.deleted.append("v")
            return _answer(200, {"code": 0, "message": "SUCCEED", "request_id": "r"})
        self.created.append(self.pending_ext)
        return _answer(200, {"code": 0, "message": "SUCCEED", "request_id": "r",
                             "data": _task("t-1", self.pending_ext)})

    pending_ext = "ext-stale"


async def test_a_create_on_a_connection_closed_under_it_is_looked_up_then_sent_once() -> None:
    server = _StaleFirstConnection()
    async with raw_server(server) as (base, _), voiceapi.AsyncVoiceClient(
            api_key="k" * 24, base_url=base, timeout=5, retry_policy=FAST_RETRY) as client:
        await client.preset_voices.list()  # pools the first connection
        task = await client.custom_voices.create(voice_name="n", voice_url="https://x/a.wav",
                                                 external_task_id="ext-stale")
    assert task.external_task_id == "ext-stale" and server.created == ["ext-stale"]
    # Never resent blind: the lost create is looked up (answered "not found") first.
    assert server.lines == ["GET /v1/general/presets-voices", "POST /v1/general/custom-voices",
                            "GET /v1/general/custom-voices/ext-stale",
                            "POST /v1/general/custom-voices"]


async def test_a_delete_on_a_connection_closed_under_it_is_resent_and_succeeds() -> None:
    server = _StaleFirstConnection()
    async with raw_server(server) as (base, _), voiceapi.AsyncVoiceClient(
            api_key="k" * 24, base_url=base, timeout=5, retry_policy=FAST_RETRY) as client:
        await client.preset_voices.list()
        await client.custom_voices.delete("v")
    assert server.deleted == ["v"]
    assert server.lines[1:] == ["POST /v1/general/delete-voices"] * 2


# --- retry settings an adversary would pass ---------------------------------------------------

@pytest.mark.parametrize("kw", [
    {"initial_delay": "0.5"}, {"initial_delay": float("nan")}, {"initial_delay": -1.0},
    {"initial_delay": math.inf}, {"max_delay": None}, {"max_delay": float("nan")},
    {"rate_limit_min_delay": True}, {"rate_limit_min_delay": -0.1},
    {"retry_after_max": "60"}, {"retry_after_max": -5}], ids=str)
def test_unusable_retry_policy_settings_are_validation_errors(kw: dict[str, Any]) -> None:
    # Used only once a call fails: before, a "0.5" surfaced as a bare TypeError in the middle
    # of an outage, and a NaN silently meant no retries at all.
    with pytest.raises(voiceapi.ValidationError, match="RetryPolicy"):
        RetryPolicy(**kw)


def test_retry_policy_takes_zero_and_an_uncapped_maximum() -> None:
    policy = RetryPolicy(initial_delay=0, max_delay=math.inf, rate_limit_min_delay=0,
                         retry_after_max=math.inf)
    assert policy.max_delay == math.inf
    with pytest.raises(voiceapi.ValidationError, match="retry_policy"):
        voiceapi.AsyncVoiceClient(api_key="k", retry_policy={"initial_delay": 1})  # type: ignore[arg-type]


def test_a_thousand_retries_do_not_overflow_the_backoff() -> None:
    # max_retries may be large: 2**1024 no longer converts to a float (a bare OverflowError).
    policy = RetryPolicy(initial_delay=0.001, max_delay=0.01)
    assert backoff_delay(1100, policy, rng=lambda a, b: b) == 0.01
    lost = voiceapi.ServerError("x", code=5000, http_status=500)
    step = decide(lost, idempotent=True, can_reconcile=False, retry_rate_limits=True,
                  retries_used=5000, max_retries=10_000, resigned=False, time_left=100.0,
                  policy=policy)
    assert step.retry and 0 <= step.delay <= 0.01


class _NotACoordinator:
    async def before_request(self, *, create: bool) -> None:
        return None


@pytest.mark.parametrize("kw", [
    {"middlewares": [None]}, {"middlewares": "abc"}, {"middlewares": 5}, {"session": "s"},
    {"coordinator": object()}, {"coordinator": _NotACoordinator()}],
    ids=["middleware-none", "middlewares-str", "middlewares-int", "session-str",
         "coordinator-object", "coordinator-half"])
def test_unusable_pluggable_parts_are_validation_errors(kw: dict[str, Any]) -> None:
    # Before, each failed every call as a bare TypeError or AttributeError deep in the chain.
    for client in (voiceapi.AsyncVoiceClient, voiceapi.VoiceClient):
        with pytest.raises(voiceapi.ValidationError):
            client(api_key="k", **kw)


async def test_middlewares_none_means_no_middlewares(emu: KlingEmulator) -> None:
    async with voiceapi.AsyncVoiceClient(api_key=emu.api_key, base_url=emu.base_url,
                                         middlewares=None) as client:  # type: ignore[arg-type]
        assert len(await client.preset_voices.list(page_size=1)) == 1


async def test_a_credential_that_cannot_sign_leaves_a_failed_task_error_intact(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """wait() masks the client's credential in a TaskFailedError; a credential that fails to
    sign at that moment must not replace the error being built."""
    from voiceapi._auth import JWTCredentials

    async with KlingEmulator(task_seconds=0.05) as emu, voiceapi.AsyncVoiceClient(
            emu.access_key, emu.secret_key, base_url=emu.base_url,
            retry_policy=FAST_RETRY) as client:
        task = await client.custom_voices.create(
            voice_name="x", voice_url=f"{emu.sample_url()}?kling_fail=bad-sample")
        with pytest.raises(voiceapi.TaskFailedError):  # the task has failed by now
            await client.custom_voices.wait(task, timeout=30, poll_interval=0.05)
        real = JWTCredentials.authorization
        calls: list[int] = []

        def flaky(self: JWTCredentials) -> str:
            calls.append(1)
            if len(calls) > 1:  # the one poll signs; the mask right after it cannot
                raise RuntimeError("signing is broken now")
            return real(self)

        monkeypatch.setattr(JWTCredentials, "authorization", flaky)
        with pytest.raises(voiceapi.TaskFailedError, match="bad-sample"):
            await client.custom_voices.wait(task, timeout=30, poll_interval=0.05)
        assert len(calls) == 2
