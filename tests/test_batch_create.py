"""One answer to "did this create land?", for create() and the batch (issue 10.2, 11.10)."""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import pytest
from aiohttp import web

import voiceapi
from tests.conftest import FAST_RETRY, envelope, serve, task_json
from voiceapi.testing import KlingEmulator


def client_for(base_url: str, api_key: str = "k", **kw: Any) -> voiceapi.AsyncVoiceClient:
    kw.setdefault("retry_policy", FAST_RETRY)
    kw.setdefault("timeout", 5)
    return voiceapi.AsyncVoiceClient(api_key=api_key, base_url=base_url, **kw)


def per_ext(emu: KlingEmulator) -> collections.Counter[str | None]:
    return collections.Counter(t["task_info"].get("external_task_id") for t in emu.tasks())


async def test_late_commit_with_a_slow_lookup_returns_the_one_task() -> None:
    """The first POST lands but its answer never comes; the reconciling lookups are slow: each
    create() returns the task it made, and no voice is made twice (issue 10.2)."""
    async with KlingEmulator(concurrency=50, task_seconds=5) as emu:
        emu.inject("create", "commit_then_drop", times=10)
        emu.inject("get", "slow", delay=0.4, times=20)
        async with client_for(emu.base_url, emu.api_key, timeout=0.25) as client:
            tasks = await asyncio.gather(*(client.custom_voices.create(
                voice_name=f"v{i}", voice_url=emu.sample_url()) for i in range(10)))
    assert emu.task_count == 10 and set(per_ext(emu).values()) == {1}
    assert {t.task_id for t in tasks} == {t["task_id"] for t in emu.tasks()}


async def test_resend_refused_as_duplicate_returns_the_task() -> None:
    """A lookup answers "not found" (the first POST landed late), the resend is refused with
    "External_task_id … already exists": the SDK's own id → the task is returned, not raised."""
    state: dict[str, Any] = {"posts": 0, "gets": 0, "ext": None}

    async def create(request: web.Request) -> web.Response:
        body = await request.json()
        state["posts"] += 1
        if state["posts"] == 1:
            state["ext"] = body["external_task_id"]
            return web.json_response(envelope(code=5000, message="Internal error"), status=500)
        return web.json_response(envelope(
            code=1201, message=f"External_task_id {body['external_task_id']} already exists"),
            status=400)

    async def get(request: web.Request) -> web.Response:
        state["gets"] += 1
        ext = request.match_info["ref"]
        if state["gets"] == 1:  # the late commit is not visible yet
            return web.json_response(envelope(
                code=1201, message=f"Task not found by id/external id: {ext}"), status=400)
        return web.json_response(envelope(task_json("777", task_info={"external_task_id": ext})))

    app = web.Application()
    app.router.add_post("/v1/general/custom-voices", create)
    app.router.add_get("/v1/general/custom-voices/{ref}", get)
    async with serve(app) as base, client_for(base) as client:
        task = await client.custom_voices.create(voice_name="late", voice_url="https://x/a.wav")
    assert task.task_id == "777" and task.external_task_id == state["ext"]
    assert state["posts"] == 2  # one resend, after a lookup that answered not-found


async def test_caller_id_already_used_is_a_conflict(client: voiceapi.AsyncVoiceClient,
                                                    emu: KlingEmulator) -> None:
    first = await client.custom_voices.create(voice_name="a", voice_url=emu.sample_url(),
                                              external_task_id="mine-1")
    with pytest.raises(voiceapi.ConflictError) as info:
        await client.custom_voices.create(voice_name="b", voice_url=emu.sample_url(),
                                          external_task_id="mine-1")
    assert info.value.existing_task_id == first.task_id
    assert isinstance(info.value, voiceapi.InvalidRequestError)
    assert emu.task_count == 1


async def test_failed_lookup_is_never_read_as_not_found() -> None:
    """The create's answer is lost and every lookup fails with a 1201 that is not "not found":
    the SDK gives up with the create's error and never resends, even on a server that would
    accept the repeated id (issue 10.1, 11.10)."""
    async with KlingEmulator(unique_external_ids=False) as emu:
        emu.inject("create", "commit_then_5000", times=10)
        emu.inject("get", 1201, times=100)
        async with client_for(emu.base_url, emu.api_key) as client:
            with pytest.raises(voiceapi.APIConnectionError, match="may exist"):
                await client.custom_voices.create(voice_name="v", voice_url=emu.sample_url())
    assert emu.count("create") == 1 and emu.task_count == 1


async def test_lookup_errors_are_retried_then_the_task_is_found() -> None:
    async with KlingEmulator(unique_external_ids=False) as emu:
        emu.inject("create", "commit_then_drop")
        emu.inject("get", 5000, times=6)  # beyond the transport's own retries
        async with client_for(emu.base_url, emu.api_key, max_retries=1) as client:
            task = await client.custom_voices.create(voice_name="v", voice_url=emu.sample_url())
    assert emu.count("create") == 1 and emu.task_count == 1
    assert task.task_id == emu.tasks()[0]["task_id"]


async def test_resend_only_after_an_answered_not_found() -> None:
    """Nothing landed (connection reset before any work): the lookup answers not-found, so the
    create is sent again, once."""
    async with KlingEmulator(unique_external_ids=False) as emu:
        emu.inject("create", "reset", times=1)
        async with client_for(emu.base_url, emu.api_key) as client:
            task = await client.custom_voices.create(voice_name="v", voice_url=emu.sample_url())
    assert emu.task_count == 1 and task.task_id == emu.tasks()[0]["task_id"]
    assert emu.count("create") == 2


async def test_give_up_after_resends_that_never_land() -> None:
    """Every create is dropped before any work and every lookup answers not-found: the SDK
    resends a bounded number of times, then raises."""
    async with KlingEmulator() as emu:
        emu.inject("create", "reset", times=1000)
        async with client_for(emu.base_url, emu.api_key, max_retries=1) as client:
            with pytest.raises(voiceapi.APIConnectionError):
                await client.custom_voices.create(voice_name="v", voice_url=emu.sample_url())
    assert emu.task_count == 0
    assert emu.count("create") <= 2 * (voiceapi._constants.CREATE_MAX_RESENDS + 1)


async def test_batch_over_late_commits_creates_each_voice_once() -> None:
    async with KlingEmulator(concurrency=4, task_seconds=0.05, unique_external_ids=False) as emu:
        emu.inject("create", "commit_then_drop", times=5)
        emu.inject("get", "slow", delay=0.4, times=3)
        emu.inject("get", 1201, times=3)
        items = [{"voice_name": f"v{i}", "voice_url": emu.sample_url()} for i in range(20)]
        async with client_for(emu.base_url, emu.api_key, timeout=0.3) as client:
            results = await client.custom_voices.create_many(items, poll_interval=0.05)
    assert all(r.ok for r in results), [str(r.error) for r in results if not r.ok]
    assert emu.task_count == 20 and set(per_ext(emu).values()) == {1}


async def test_sync_create_returns_a_late_committed_task() -> None:
    with KlingEmulator() as emu:
        emu.inject("create", "commit_then_drop")
        with voiceapi.VoiceClient(api_key=emu.api_key, base_url=emu.base_url,
                                  retry_policy=FAST_RETRY, timeout=5) as client:
            task = await asyncio.to_thread(client.custom_voices.create, voice_name="s",
                                           voice_url=emu.sample_url())
        assert emu.task_count == 1 and task.task_id == emu.tasks()[0]["task_id"]
