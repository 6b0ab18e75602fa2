"""Adversarial tests (session 5, advlife): the sync facade's loop shutting down."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncGenerator

import pytest

from voiceapi._sync_runner import LoopThread


def test_an_async_generator_dropped_while_closing_is_closed_before_the_loop_stops(
        caplog: pytest.LogCaptureFixture) -> None:
    # A generator finalized during close() has its aclose() scheduled by asyncio as a task
    # of its own; the loop used to stop first ("coroutine method 'aclose' ... was never
    # awaited", "Task was destroyed but it is pending!"), and its clean-up never ran.
    caplog.set_level(logging.WARNING, logger="asyncio")
    cleaned: list[str] = []
    holder: list[AsyncGenerator[int, None]] = []

    async def walker() -> AsyncGenerator[int, None]:
        try:
            yield 1
        finally:
            await asyncio.sleep(0)  # an asynchronous clean-up, like a page walker's
            cleaned.append("cleaned")

    async def start() -> None:
        gen = walker()
        await gen.__anext__()
        holder.append(gen)

    async def final() -> None:
        holder.clear()  # the last reference goes while the client closes

    runner = LoopThread()
    runner.run(start())
    runner.shutdown(final())
    gc.collect()  # under -W error a never-awaited aclose() would fail the test here
    assert cleaned == ["cleaned"]
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []
