"""Transport, retries and resources against mocked HTTP (aioresponses)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any

import aiohttp
import pytest
from aioresponses import CallbackResult, aioresponses

import voiceapi
from tests.conftest import BASE, FAST_RETRY, envelope, task_json

CV = f"{BASE}/v1/general/custom-voices"
ONE = f"{CV}/930801301486305328"
LIST = re.compile(r"^https://kling\.test/v1/general/custom-voices\?.*$")
DELETE = f"{BASE}/v1/general/delete-voices"


def _posted(mocked: aioresponses, url: str) -> list[dict[str, Any]]:
    calls = [c for (method, u), cs in mocked.requests.items() for c in cs
             if method == "POST" and str(u) == url]
    return [json.loads(c.kwargs["data"]) for c in calls]


def _count(mocked: aioresponses, method: str) -> int:
    return sum(len(cs) for (m, _), cs in mocked.requests.items() if m == method)


async def test_get_retries_5000_then_succeeds(mocked: aioresponses,
                                               mock_client: voiceapi.AsyncVoiceClient) -> None:
    mocked.get(ONE, status=500, payload=envelope(code=5000, message="boom"))
    mocked.get(ONE, status=504, payload=envelope(code=5002, message="slow"))
    mocked.get(ONE, payload=envelope(task_json(status="processing")))
    task = await mock_client.custom_voices.get("930801301486305328")
    assert task.task_status is voiceapi.TaskStatus.PROCESSING
    assert _count(mocked, "GET") == 3


async def test_max_retries_counts_retries_after_the_first(mocked: aioresponses) -> None:
    for _ in range(3):
        mocked.get(ONE, status=500, payload=envelope(code=5000, message="boom"))
    async with voiceapi.AsyncVoiceClient(api_key="k", base_url=BASE, max_retries=1,
                                         retry_policy=FAST_RETRY) as client:
        with pytest.raises(voiceapi.ServerError) as info:
            await client.custom_voices.get("930801301486305328")
    assert info.value.code == 5000 and info.value.request_id == "rid-1"
    assert _count(mocked, "GET") == 2


async def test_rate_limit_is_retried_with_retry_after(mocked: aioresponses,
                                                      mock_client: voiceapi.AsyncVoiceClient
                                                      ) -> None:
    mocked.get(LIST, status=429, payload=envelope(code=1302, message="too fast"),
               headers={"Retry-After": "0.01"})
    mocked.get(LIST, payload=envelope([task_json()]))
    assert len(await mock_client.custom_voices.list()) == 1


@pytest.mark.parametrize(("status", "code", "cls"), [
    (400, 1201, voiceapi.InvalidRequestError), (403, 1103, voiceapi.PermissionDeniedError),
    (429, 1102, voiceapi.AccountError), (400, 1301, voiceapi.PolicyError),
    (401, 1002, voiceapi.AuthenticationError),
])
async def test_client_errors_are_never_retried(mocked: aioresponses,
                                               mock_client: voiceapi.AsyncVoiceClient,
                                               status: int, code: int,
                                               cls: type[voiceapi.APIError]) -> None:
    mocked.get(ONE, status=status, payload=envelope(code=code, message="nope"))
    with pytest.raises(cls) as info:
        await mock_client.custom_voices.get("930801301486305328")
    assert info.value.code == code and info.value.http_status == status
    assert _count(mocked, "GET") == 1


async def test_expired_token_is_resigned_and_retried_once(mocked: aioresponses) -> None:
    seen: list[str] = []

    def expired(url: Any, **kw: Any) -> CallbackResult:
        seen.append(kw["headers"]["Authorization"])
        return CallbackResult(status=401, payload=envelope(code=1004, message="expired"))

    mocked.get(ONE, callback=expired, repeat=True)
    ticks = iter(range(1_800_000_000, 1_800_000_100))
    async with voiceapi.AsyncVoiceClient("ak", "sk" * 16, base_url=BASE, max_retries=0,
                                         retry_policy=FAST_RETRY) as client:
        client._config.credentials._clock = lambda: float(next(ticks))  # type: ignore[attr-defined]
        with pytest.raises(voiceapi.AuthenticationError) as info:
            await client.custom_voices.get("930801301486305328")
    assert info.value.code == 1004
    assert len(seen) == 2 and seen[0] != seen[1]  # re-signed, and only once


async def test_proxy_html_502_is_retried_but_plain_500_is_not(
        mocked: aioresponses, mock_client: voiceapi.AsyncVoiceClient) -> None:
    mocked.get(ONE, status=502, body="<html>Bad Gateway</html>", content_type="text/html")
    mocked.get(ONE, payload=envelope(task_json()))
    await mock_client.custom_voices.get("930801301486305328")
    mocked.get(ONE, status=500, body="<html>oops</html>", content_type="text/html")
    with pytest.raises(voiceapi.ServerError) as info:
        await mock_client.custom_voices.get("930801301486305328")
    assert info.value.code is None and info.value.http_status == 500
    assert _count(mocked, "GET") == 3


@pytest.mark.parametrize("body", [b"", b"not json", b"[1,2]", b'{"code":"0"}', b'{"code":true}',
                                  b'{"message":"no code"}', b'\xff\xfe', b'{"code":0,"data":',
                                  b"[" * 100000])
async def test_unreadable_2xx_is_unexpected_response(mocked: aioresponses, body: bytes) -> None:
    mocked.get(ONE, body=body, repeat=True)
    async with voiceapi.AsyncVoiceClient(api_key="k", base_url=BASE, max_retries=1,
                                         retry_policy=FAST_RETRY) as client:
        with pytest.raises(voiceapi.UnexpectedResponseError):
            await client.custom_voices.get("930801301486305328")


async def test_connection_errors_and_timeouts_are_typed(mocked: aioresponses) -> None:
    async with voiceapi.AsyncVoiceClient(api_key="k", base_url=BASE, max_retries=1,
                                         retry_policy=FAST_RETRY) as client:
        mocked.get(ONE, exception=aiohttp.ServerDisconnectedError(), repeat=True)
        with pytest.raises(voiceapi.APIConnectionError) as info:
            await client.custom_voices.get("930801301486305328")
        assert not isinstance(info.value, voiceapi.APITimeoutError)
        mocked.clear()
        mocked.get(ONE, exception=asyncio.TimeoutError(), repeat=True)
        with pytest.raises(voiceapi.APITimeoutError):
            await client.custom_voices.get("930801301486305328")


async def test_ambiguous_create_is_looked_up_before_resending(
        mocked: aioresponses, mock_client: voiceapi.AsyncVoiceClient) -> None:
    mocked.post(CV, status=500, payload=envelope(code=5000, message="boom"))
    mocked.get(re.compile(rf"^{CV}/voiceapi-.*$"), status=400,
               payload=envelope(code=1201, message="Task not found by id/external id: x"))
    # A create's answer echoes the external id it was sent (or leaves it out): never another.
    mocked.post(CV, payload=envelope(task_json(task_info={})))
    task = await mock_client.custom_voices.create(voice_name="n",
                                                  voice_url="https://x/a.wav")
    bodies = _posted(mocked, CV)
    assert len(bodies) == 2
    assert bodies[0]["external_task_id"] == bodies[1]["external_task_id"]  # minted once
    assert task.task_id == "930801301486305328"


async def test_ambiguous_create_that_landed_is_not_resent(
        mocked: aioresponses, mock_client: voiceapi.AsyncVoiceClient) -> None:
    mocked.post(CV, exception=aiohttp.ServerDisconnectedError())
    mocked.get(f"{CV}/mine-1", payload=envelope(task_json(
        status="processing", task_info={"external_task_id": "mine-1"})))
    task = await mock_client.custom_voices.create(voice_name="n", voice_url="https://x/a.wav",
                                                  external_task_id="mine-1")
    assert len(_posted(mocked, CV)) == 1
    assert task.task_status is voiceapi.TaskStatus.PROCESSING


async def test_create_1303_is_resent_without_lookup(mocked: aioresponses,
                                                    mock_client: voiceapi.AsyncVoiceClient
                                                    ) -> None:
    mocked.post(CV, status=429, payload=envelope(code=1303, message="parallel task over"))
    mocked.post(CV, payload=envelope({"task_id": "930801301486305328",
                                      "task_info": {},
                                      "task_status": "submitted",
                                      "created_at": 1, "updated_at": 1}))
    await mock_client.custom_voices.create(voice_name="n", voice_url="https://x/a.wav")
    assert len(_posted(mocked, CV)) == 2 and _count(mocked, "GET") == 0


async def test_create_sends_no_nulls_and_validates_first(
        mocked: aioresponses, mock_client: voiceapi.AsyncVoiceClient) -> None:
    with pytest.raises(voiceapi.ValidationError):
        await mock_client.custom_voices.create(voice_name="x" * 21,
                                               voice_url="https://x/a.wav")
    assert not mocked.requests
    mocked.post(CV, payload=envelope({"task_id": "930801301486305328"}))
    task = await mock_client.custom_voices.create(voice_name="n", video_id="830460928805724256")
    (body,) = _posted(mocked, CV)
    assert set(body) == {"voice_name", "video_id", "external_task_id"}
    # A minimal answer still gives a usable task carrying our external id.
    assert task.task_status is voiceapi.TaskStatus.SUBMITTED
    assert task.external_task_id == body["external_task_id"]


async def test_delete_without_data_is_success(mocked: aioresponses,
                                              mock_client: voiceapi.AsyncVoiceClient) -> None:
    mocked.post(DELETE, payload={"code": 0, "message": "SUCCEED", "request_id": "r"})
    await mock_client.custom_voices.delete("930801338081615883")
    assert _posted(mocked, DELETE) == [{"voice_id": "930801338081615883"}]


async def test_ids_are_path_encoded(mocked: aioresponses,
                                    mock_client: voiceapi.AsyncVoiceClient) -> None:
    mocked.get(f"{CV}/..%2Fx", payload=envelope(task_json(task_info={"external_task_id": "../x"})))
    await mock_client.custom_voices.get(external_task_id="../x")
    ((_, url),) = mocked.requests
    assert url.raw_path == "/v1/general/custom-voices/..%2Fx"


async def test_get_needs_exactly_one_reference(mock_client: voiceapi.AsyncVoiceClient) -> None:
    with pytest.raises(voiceapi.ValidationError):
        await mock_client.custom_voices.get()
    with pytest.raises(voiceapi.ValidationError):
        await mock_client.custom_voices.get("1", external_task_id="2")


async def test_retry_budget_caps_the_whole_call(mocked: aioresponses) -> None:
    mocked.get(ONE, status=429, payload=envelope(code=1302, message="slow"), repeat=True,
               headers={"Retry-After": "5"})
    policy = voiceapi.RetryPolicy(retry_after_max=5.0)
    async with voiceapi.AsyncVoiceClient(api_key="k", base_url=BASE, max_retries=10,
                                         retry_budget=1.0, retry_policy=policy) as client:
        with pytest.raises(voiceapi.RateLimitError) as info:
            await client.custom_voices.get("930801301486305328")
    assert info.value.retry_after == 5.0
    assert _count(mocked, "GET") == 1  # the 5 s wait would break the 1 s budget: give up now


async def test_closed_client_raises_clearly_and_close_is_idempotent() -> None:
    client = voiceapi.AsyncVoiceClient(api_key="k", base_url=BASE)
    await client.aclose()
    await client.aclose()
    with pytest.raises(voiceapi.ClientClosedError, match="closed"):
        await client.custom_voices.list()


async def test_injected_session_is_used_and_left_open(mocked: aioresponses) -> None:
    mocked.get(LIST, payload=envelope([]))
    async with aiohttp.ClientSession() as session:
        async with voiceapi.AsyncVoiceClient(api_key="k", base_url=BASE,
                                             session=session) as client:
            assert await client.custom_voices.list() == []
        assert not session.closed


async def test_user_middleware_sees_every_attempt(mocked: aioresponses) -> None:
    attempts: list[tuple[int, str]] = []

    async def tag(request: voiceapi.Request, call_next: voiceapi.Handler) -> voiceapi.Response:
        request.headers["X-Trace"] = "t-1"
        attempts.append((request.attempt, request.path))
        return await call_next(request)

    mocked.get(ONE, status=503, payload=envelope(code=5001, message="maintenance"))
    mocked.get(ONE, payload=envelope(task_json()))
    async with voiceapi.AsyncVoiceClient(api_key="k", base_url=BASE, middlewares=[tag],
                                         retry_policy=FAST_RETRY) as client:
        await client.custom_voices.get("930801301486305328")
    assert attempts == [(1, "/v1/general/custom-voices/930801301486305328"),
                        (2, "/v1/general/custom-voices/930801301486305328")]
    sent = [c.kwargs["headers"]["X-Trace"] for cs in mocked.requests.values() for c in cs]
    assert sent == ["t-1", "t-1"]


async def test_log_lines_per_attempt_without_secrets(
        mocked: aioresponses, caplog: pytest.LogCaptureFixture) -> None:
    secret = "sk-never-log-me-0123456789abcdefghij"
    mocked.get(ONE, status=500, payload=envelope(code=5000, message="boom", request_id="r-1"))
    mocked.get(ONE, payload=envelope(task_json(), request_id="r-2"))
    caplog.set_level(logging.DEBUG, logger="voiceapi")
    async with voiceapi.AsyncVoiceClient("ak", secret, base_url=BASE,
                                         retry_policy=FAST_RETRY) as client:
        await client.custom_voices.get("930801301486305328")
        token = client._config.credentials.authorization().removeprefix("Bearer ")
    lines = [r.getMessage() for r in caplog.records if r.name == "voiceapi"]
    assert len(lines) == 2
    assert "code=5000" in lines[0] and "request_id=r-1" in lines[0] and "attempt=1" in lines[0]
    assert "code=0" in lines[1] and "request_id=r-2" in lines[1] and "attempt=2" in lines[1]
    for text in [*lines, caplog.text]:
        assert secret not in text and token not in text and "Bearer" not in text


@pytest.mark.parametrize("old_name", [False, True])
async def test_max_concurrent_requests_caps_concurrent_requests(mocked: aioresponses,
                                                                old_name: bool) -> None:
    gate = asyncio.Event()
    live = peak = 0

    async def held(url: Any, **kw: Any) -> CallbackResult:
        nonlocal live, peak
        live += 1
        peak = max(peak, live)
        await gate.wait()
        live -= 1
        return CallbackResult(payload=envelope([]))

    mocked.get(LIST, callback=held, repeat=True)
    if old_name:  # the deprecated alias still works, and says so
        with pytest.warns(DeprecationWarning, match="max_concurrent_requests"):
            client = voiceapi.AsyncVoiceClient(api_key="k", base_url=BASE, max_in_flight=2)
    else:
        client = voiceapi.AsyncVoiceClient(api_key="k", base_url=BASE, max_concurrent_requests=2)
    async with client:
        calls = [asyncio.ensure_future(client.custom_voices.list()) for _ in range(6)]
        for _ in range(50):  # let every call reach the limiter or the server
            await asyncio.sleep(0)
        assert live == 2
        gate.set()
        await asyncio.gather(*calls)
    assert peak == 2


async def test_wrong_event_loop_is_a_clear_error(mocked: aioresponses) -> None:
    mocked.get(LIST, payload=envelope([]), repeat=True)
    client = voiceapi.AsyncVoiceClient(api_key="k", base_url=BASE)
    await client.custom_voices.list()

    def other_loop() -> None:
        async def use() -> None:
            await client.custom_voices.list()
        asyncio.run(use())

    with pytest.raises(voiceapi.EventLoopError, match="another event loop"):
        await asyncio.to_thread(other_loop)
    await client.aclose()


async def test_oversized_answer_is_refused_unread(mocked: aioresponses) -> None:
    mocked.get(ONE, body=b"{}", headers={"Content-Length": str(200 * 1024 * 1024)},
               repeat=True)
    async with voiceapi.AsyncVoiceClient(api_key="k", base_url=BASE, max_retries=0) as client:
        with pytest.raises(voiceapi.UnexpectedResponseError, match="too large"):
            await client.custom_voices.get("930801301486305328")


async def test_get_by_external_id_refuses_an_answer_about_another_task(
        mocked: aioresponses, mock_client: voiceapi.AsyncVoiceClient) -> None:
    mocked.get(f"{CV}/mine", payload=envelope(task_json(
        task_id="5", task_info={"external_task_id": "theirs"})))
    with pytest.raises(voiceapi.UnexpectedResponseError, match="about another one"):
        await mock_client.custom_voices.get(external_task_id="mine")


async def test_get_by_an_external_id_in_the_task_id_slot_is_still_answered(
        mocked: aioresponses, mock_client: voiceapi.AsyncVoiceClient) -> None:
    # The path takes either kind of id: an answer whose external id is the ref is about it.
    mocked.get(f"{CV}/mine", payload=envelope(task_json(
        task_id="5", task_info={"external_task_id": "mine"})))
    assert (await mock_client.custom_voices.get("mine")).task_id == "5"
