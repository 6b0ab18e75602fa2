"""Adversarial tests (session 5, advlife): cancelling a call at every await it makes."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from typing import Any

import pytest

import voiceapi
from voiceapi.testing import KlingEmulator

from .conftest import FAST_RETRY


@pytest.mark.parametrize("steps", range(6))
async def test_a_call_cancelled_as_it_is_handed_a_slot_gives_the_slot_back(
        emu: KlingEmulator, steps: int) -> None:
    # One slot, held by "another request"; the call queues for it, is handed it, and is
    # cancelled `steps` loop iterations later. On 3.10 the wait for the slot ran as a task of
    # its own, and a cancel landing after that task took the slot leaked it for good: with
    # max_concurrent_requests=1 every later call then waited out its whole retry budget.
    async with voiceapi.AsyncVoiceClient(emu.access_key, emu.secret_key, base_url=emu.base_url,
                                         retry_policy=FAST_RETRY, timeout=5,
                                         max_concurrent_requests=1) as client:
        limits = client.transport._limits
        await limits.enter()  # the other request
        call = asyncio.ensure_future(client.preset_voices.list(page_size=1))
        for _ in range(3):
            await asyncio.sleep(0)
        assert not call.done()  # queued behind the other request
        limits.leave()  # the other request ends: its slot is handed to the queued call
        for _ in range(steps):
            await asyncio.sleep(0)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert limits.active == 0
        # The slot is free: the next call runs at once instead of queueing for ever.
        voices = await asyncio.wait_for(client.preset_voices.list(page_size=1), 5)
        assert len(voices) == 1


@pytest.fixture
async def roomy_emu(
        _emulator_bugs_fail_the_test: set[int]) -> AsyncIterator[KlingEmulator]:
    """Room for every task the sweep creates (the per-account limit is not under test)."""
    async with KlingEmulator(concurrency=10_000, task_seconds=0.05) as e:
        yield e


def _our_pending(before: set[asyncio.Task[object]]) -> list[str]:
    """Tasks the call left behind (the emulator's own server tasks are not the client's)."""
    return [repr(t) for t in asyncio.all_tasks() - before
            if not t.done() and "web_protocol" not in repr(t) and "testing" not in repr(t)]


@pytest.mark.parametrize("kind", ["create", "create-lost", "get", "get-5000", "list",
                                  "iter_all", "wait", "delete"])
async def test_a_call_cancelled_at_any_step_leaves_nothing_behind(
        roomy_emu: KlingEmulator, kind: str) -> None:
    # Cancel the call after 0, 1, 2, ... loop iterations until one runs to its end: no slot,
    # connection or task may outlive it, asyncio reports nothing, and no external id ever
    # names two tasks.
    emu = roomy_emu
    reports: list[str] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: reports.append(str(context.get("message"))))
    try:
        async with voiceapi.AsyncVoiceClient(
                emu.access_key, emu.secret_key, base_url=emu.base_url, retry_policy=FAST_RETRY,
                timeout=5, max_concurrent_requests=2) as client:
            cv = client.custom_voices
            done = await cv.wait(await cv.create(voice_name="s", voice_url=emu.sample_url()),
                                 poll_interval=0.01)
            assert done.voice_id is not None
            faults: dict[str, tuple[str, str | int]] = {
                "create-lost": ("create", "commit_then_drop"), "get-5000": ("get", 5000),
                "delete": ("delete", "commit_then_5000")}
            fault = faults.get(kind)

            def call() -> Awaitable[object]:
                if kind.startswith("create"):
                    return cv.create(voice_name="n", voice_url=emu.sample_url())
                if kind.startswith("get"):
                    return cv.get(done.task_id)
                if kind == "list":
                    return cv.list()
                if kind == "iter_all":
                    return _collect(cv.iter_all(page_size=1))
                if kind == "wait":
                    return cv.wait(done.task_id)
                return cv.delete(done.voice_id or "")

            finished = False
            # Bounded: most calls end within far fewer steps; one that sleeps (a retry's
            # backoff) may take more loop steps than this, depending on the clock.
            for steps in range(150):
                if fault is not None:
                    emu.inject(fault[0], fault[1])
                before = asyncio.all_tasks()
                task = asyncio.ensure_future(call())
                for _ in range(steps):
                    await asyncio.sleep(0)
                finished = task.done()
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
                except voiceapi.InvalidRequestError:
                    assert kind == "delete"  # deleted by an earlier, uncancelled round
                for _ in range(3):
                    await asyncio.sleep(0)  # let aiohttp's callbacks settle
                assert _our_pending(before) == [], steps
                assert client.transport._limits.active == 0, steps
                session = client.transport._session
                assert session is None or not session.connector._acquired, steps  # type: ignore[union-attr]
                emu.clear_faults()
                if finished:
                    break
            if not finished:  # the client still works after all those cancels
                if fault is not None:
                    emu.inject(fault[0], fault[1])
                try:
                    await asyncio.wait_for(call(), 30)
                except voiceapi.InvalidRequestError:
                    assert kind == "delete"
        assert emu.stats()["tasks_per_external_id"].keys() <= {"1"}
    finally:
        loop.set_exception_handler(None)
    gc.collect()
    assert reports == []


async def _collect(tasks: AsyncIterator[object]) -> list[object]:
    return [t async for t in tasks]


@pytest.mark.parametrize("resource", ["custom_voices", "preset_voices"])
async def test_closing_an_iteration_closes_its_page_walker_on_the_spot(
        client: voiceapi.AsyncVoiceClient, emu: KlingEmulator,
        monkeypatch: pytest.MonkeyPatch, resource: str) -> None:
    # Before, iter_all left its page walker to the garbage collector, whose close asyncio
    # schedules as a task of its own: a VoiceClient.close() from another thread stopped the
    # loop under it ("Task was destroyed but it is pending!", "coroutine method 'aclose' of
    # 'walk_pages' was never awaited", seen on 3.13).
    import voiceapi._custom_voices as cv_module
    import voiceapi._preset_voices as pv_module

    for _ in range(3):
        await client.custom_voices.create(voice_name="n", voice_url=emu.sample_url())
    closed: list[str] = []
    module = cv_module if resource == "custom_voices" else pv_module
    real = module.walk_pages

    async def watched(*args: Any, **kw: Any) -> AsyncGenerator[list[Any], None]:
        try:
            async for page in real(*args, **kw):
                yield page
        finally:
            closed.append("walker")

    monkeypatch.setattr(module, "walk_pages", watched)
    iteration = getattr(client, resource).iter_all(page_size=1)
    await iteration.__anext__()
    await iteration.aclose()
    assert closed == ["walker"]  # closed by the aclose itself, not later by a loop callback
