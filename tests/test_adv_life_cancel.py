"""Adversarial tests (session 5, advlife): cancelling a call at every await it makes."""

from __future__ import annotations

import asyncio

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
