"""Hardening: fuzzed server answers, secrets never shown, no leaks, hostile inputs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import traceback
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aioresponses import aioresponses
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import voiceapi
from tests.conftest import BASE, FAST_RETRY, envelope, scaled_examples, serve, task_json
from voiceapi._decode import decode_envelope, parse_task, parse_task_list, parse_voices
from voiceapi.testing import KlingEmulator

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["code", "message", "request_id", "data", "task_id", "task_status",
                         "task_info", "task_result", "voices", "voice_id", "created_at",
                         "updated_at", "external_task_id", "task_status_msg", "x"]),
        children, max_size=6),
    max_leaves=20)

TASKISH = st.fixed_dictionaries(
    {"task_id": st.one_of(st.text(max_size=5), st.integers(), st.none(), JSON),
     "task_status": st.one_of(st.sampled_from(["submitted", "processing", "succeed",
                                               "failed", "succeeded", "??"]), JSON)},
    optional={"task_result": JSON, "task_info": JSON, "created_at": JSON,
              "updated_at": JSON, "task_status_msg": JSON,
              "final_balance_deduction": JSON})


def _body(draw_json: Any) -> bytes:
    return json.dumps(draw_json, allow_nan=True).encode()


@settings(deadline=None)  # examples: the hypothesis profile (tests/conftest.py)
@given(status=st.sampled_from([200, 201, 204, 400, 401, 403, 404, 429, 500, 502, 503, 504]),
       body=st.one_of(JSON.map(_body), st.binary(max_size=60),
                      st.builds(lambda d, n: _body(d)[:n], JSON, st.integers(0, 40))),
       headers=st.dictionaries(st.sampled_from(["Retry-After", "retry-after-ms",
                                                "Content-Type"]), st.text(max_size=30)))
def test_decoder_only_raises_sdk_errors(status: int, body: bytes, headers: dict[str, str]) -> None:
    try:
        data, _ = decode_envelope(status, headers, body)
    except voiceapi.VoiceAPIError:
        return
    for parse in (parse_task, parse_task_list, parse_voices):
        with contextlib.suppress(voiceapi.VoiceAPIError):
            parse(data)


@settings(deadline=None)  # examples: the hypothesis profile (tests/conftest.py)
@given(raw=st.one_of(TASKISH, JSON))
def test_task_parser_only_raises_sdk_errors(raw: Any) -> None:
    try:
        task = parse_task(raw)
    except voiceapi.UnexpectedResponseError:
        return
    assert isinstance(task.task_id, str) and isinstance(task.task_status, voiceapi.TaskStatus)


ONE = f"{BASE}/v1/general/custom-voices/1"
LIST = re.compile(r"^https://kling\.test/v1/general/custom-voices\?.*$")


@settings(max_examples=scaled_examples(150), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(status=st.sampled_from([200, 400, 429, 500, 502]), payload=JSON,
       content_type=st.sampled_from(["application/json", "text/html", "text/plain", ""]),
       truncate=st.integers(0, 30))
def test_transport_only_raises_sdk_errors(status: int, payload: Any, content_type: str,
                                          truncate: int) -> None:
    body = _body(payload)
    body = body[:truncate] if truncate else body

    async def scenario() -> None:
        with aioresponses() as mocked:
            mocked.get(ONE, status=status, body=body, content_type=content_type, repeat=True)
            mocked.get(LIST, status=status, body=body, content_type=content_type, repeat=True)
            async with voiceapi.AsyncVoiceClient(api_key="k", base_url=BASE, max_retries=1,
                                                 retry_policy=FAST_RETRY) as client:
                for call in (client.custom_voices.get("1"), client.custom_voices.list()):
                    with contextlib.suppress(voiceapi.VoiceAPIError):
                        await call

    asyncio.run(scenario())


SECRET = "sk-SECRET-do-not-leak-0123456789abcdef"
SDK_DIR = Path(voiceapi.__file__).parent
API_KEY = "ak-APIKEY-do-not-leak-0123456789abcdef"


def _our_frames_text(exc: BaseException) -> str:
    """The SDK's frames of the traceback, with their locals (the test's own frames hold the
    secret on purpose)."""
    te = traceback.TracebackException.from_exception(exc, capture_locals=True)
    # By package directory, not by a path substring: the checkout itself may be named voiceapi.
    ours = [f for f in te.stack if Path(f.filename).is_relative_to(SDK_DIR)]
    assert ours, "expected SDK frames in the traceback"
    return "\n".join(f"{f.filename}:{f.lineno} {f.locals!r}" for f in ours)


async def test_secrets_never_appear_anywhere(mocked: aioresponses,
                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="voiceapi")
    mocked.get(ONE, status=500, payload=envelope(code=5000, message="boom"))
    mocked.get(ONE, status=400, payload=envelope(code=1201, message="nope"))
    texts: list[str] = []
    for client in (voiceapi.AsyncVoiceClient("ak", SECRET, base_url=BASE,
                                             retry_policy=FAST_RETRY),
                   voiceapi.AsyncVoiceClient(api_key=API_KEY, base_url=BASE,
                                             retry_policy=FAST_RETRY)):
        token = client._config.credentials.authorization()
        texts += [repr(client), str(client), repr(client._config),
                  repr(client._config.credentials), repr(client._transport._handler)]
        mocked.get(ONE, status=500, payload=envelope(code=5000, message="boom"))
        mocked.get(ONE, status=401, payload=envelope(code=1002, message="bad auth"))
        with pytest.raises(voiceapi.APIError) as info:
            await client.custom_voices.get("1")
        texts += [str(info.value), repr(info.value), _our_frames_text(info.value)]
        texts.append(caplog.text)
        await client.aclose()
        for text in texts:
            for secret in (SECRET, API_KEY, token.removeprefix("Bearer ")):
                assert secret not in text
    sync = voiceapi.VoiceClient("ak", SECRET, base_url=BASE)
    assert SECRET not in repr(sync)
    sync.close()


async def test_connections_return_to_the_pool_after_faults() -> None:
    async with KlingEmulator(task_seconds=0.05) as emu:
        async with voiceapi.AsyncVoiceClient(api_key=emu.api_key, base_url=emu.base_url,
                                             timeout=0.2, retry_policy=FAST_RETRY) as client:
            emu.inject("presets", "slow", times=2, delay=0.5)
            emu.inject("presets", "5000", times=2)
            emu.inject("presets", "reset")
            emu.inject("presets", "garbage")
            results = await asyncio.gather(
                *(client.preset_voices.list() for _ in range(8)), return_exceptions=True)
            assert all(isinstance(r, (list, voiceapi.VoiceAPIError)) for r in results)
            connector = client._transport._session.connector  # type: ignore[union-attr]
            assert connector is not None
            assert len(connector._acquired) == 0  # every connection was released
        assert client.closed
    leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert leftover == []


@pytest.mark.parametrize("ext", ["a/b", "../x", "a b?c#d", "ü-声音-🎙", "x" * 128, "%2F.."])
async def test_hostile_ids_stay_one_path_segment(client: voiceapi.AsyncVoiceClient,
                                                 emu: KlingEmulator, ext: str) -> None:
    task = await client.custom_voices.create(voice_name="n", voice_url=emu.sample_url(),
                                             external_task_id=ext)
    got = await client.custom_voices.get(external_task_id=ext)
    assert got.task_id == task.task_id and got.external_task_id == ext
    assert emu.requests[-1].route == "get"


@pytest.mark.parametrize("bad", ["a\x00b", "line\nbreak", "x" * 129, "", "  ", ".", ".."])
async def test_unusable_ids_are_rejected_before_sending(client: voiceapi.AsyncVoiceClient,
                                                        emu: KlingEmulator, bad: str) -> None:
    with pytest.raises(voiceapi.ValidationError):
        await client.custom_voices.get(external_task_id=bad)
    assert emu.count() == 0


async def test_tls_verification_is_on_by_default() -> None:
    async with voiceapi.AsyncVoiceClient(api_key="k") as client:
        session = client._transport._get_session()
        connector = session.connector
        assert isinstance(connector, aiohttp.TCPConnector) and connector._ssl is True


async def test_task_json_helper_shape_is_accepted() -> None:
    # The conftest fixture mirrors the documented example; it must stay parseable.
    assert parse_task(task_json()).task_status is voiceapi.TaskStatus.SUBMITTED


async def test_streamed_answers_are_capped_too(monkeypatch: pytest.MonkeyPatch) -> None:
    from aiohttp import web

    async def endless(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()  # chunked: no Content-Length to refuse up front
        await resp.prepare(request)
        for _ in range(64):
            await resp.write(b"x" * 1024)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/v1/general/presets-voices", endless)
    monkeypatch.setattr("voiceapi._constants.MAX_RESPONSE_BYTES", 16 * 1024)
    async with serve(app) as base:
        async with voiceapi.AsyncVoiceClient(api_key="k", base_url=base,
                                             max_retries=0) as client:
            with pytest.raises(voiceapi.UnexpectedResponseError, match="larger than"):
                await client.preset_voices.list()
