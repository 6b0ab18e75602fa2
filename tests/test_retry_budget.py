"""retry_budget is a hard cap on a whole call, including the time it spends queued for a
turn (max_concurrent_requests, max_requests_per_second, a coordinator's shared rate)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

import voiceapi
from tests.conftest import FAST_RETRY, task_json
from voiceapi._middlewares import Limits


@contextlib.asynccontextmanager
async def task_server() -> AsyncIterator[tuple[str, list[str]]]:
    """Answers every GET with a task; yields the base URL and the paths it received."""
    seen: list[str] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append(request.path)
        body = {"code": 0, "message": "SUCCEED", "request_id": "r", "data": task_json()}
        return web.json_response(body, dumps=json.dumps)

    app = web.Application()
    app.router.add_get("/{tail:.*}", answer)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()


async def test_a_call_queued_for_a_slot_ends_within_its_budget() -> None:
    async with task_server() as (base, seen), voiceapi.AsyncVoiceClient(
            api_key="k", base_url=base, timeout=30, retry_budget=0.3, max_concurrent_requests=1,
            retry_policy=FAST_RETRY) as client:
        limits = client.transport._limits
        await limits.enter()  # the only slot, held as by a long call of another task
        with pytest.raises(voiceapi.APITimeoutError, match="waiting for a request slot") as info:
            await client.custom_voices.get("2")
        assert info.value.maybe_sent is False and seen == []  # it never reached the server
        limits.leave()
        assert limits.active == 0  # the queued call took nothing with it
        assert (await client.custom_voices.get("1")).task_id


async def test_a_call_paced_past_its_budget_gives_up_instead_of_waiting() -> None:
    async with task_server() as (base, seen), voiceapi.AsyncVoiceClient(
            api_key="k", base_url=base, retry_budget=0.3, max_requests_per_second=0.1,
            retry_policy=FAST_RETRY) as client:
        await client.custom_voices.get("1")  # the next free instant is now 10 s away
        with pytest.raises(voiceapi.APITimeoutError, match="retry_budget used up"):
            await client.custom_voices.get("2")
        assert seen == ["/v1/general/custom-voices/1"]
        assert client.transport._limits.active == 0  # the slot was given back


class StalledCoordinator:
    """A coordinator whose shared rate never grants a turn (another worker hogs it)."""

    def __init__(self) -> None:
        self.cancelled = 0

    async def before_request(self, *, create: bool) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise

    async def rate_limited(self, code: int | None, retry_after: float | None) -> None:
        raise AssertionError("no request was answered")


async def test_a_call_waiting_for_a_coordinator_ends_within_its_budget() -> None:
    coordinator = StalledCoordinator()
    async with task_server() as (base, seen), voiceapi.AsyncVoiceClient(
            api_key="k", base_url=base, retry_budget=0.3, retry_policy=FAST_RETRY,
            coordinator=coordinator) as client:  # type: ignore[arg-type]
        with pytest.raises(voiceapi.APITimeoutError, match="coordinator"):
            await client.custom_voices.get("1")
    assert seen == [] and coordinator.cancelled == 1


async def test_a_waiter_cancelled_as_its_slot_is_handed_over_passes_the_slot_on() -> None:
    limits = Limits(max_concurrent=1, per_second=None)
    await limits.enter()
    first = asyncio.create_task(limits.enter())
    second = asyncio.create_task(limits.enter())
    await asyncio.sleep(0)
    first.cancel()
    limits.leave()  # same tick: the cancelled waiter is skipped, the next one gets the slot
    outcomes = await asyncio.gather(first, second, return_exceptions=True)
    assert isinstance(outcomes[0], asyncio.CancelledError) and outcomes[1] is None
    assert limits.active == 1
