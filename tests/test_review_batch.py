"""Adversarial review of the batch code added in session 5 (create_many with a coordinator, on
the emulator). Each test failed before its fix (on the Python named), or records an attack
that held."""

from __future__ import annotations

import asyncio

import pytest

import voiceapi
from voiceapi._coordinator import Grant
from voiceapi._local_coordinator import LocalCoordinator
from voiceapi.testing import KlingEmulator


class _CancelsOnGrant(LocalCoordinator):
    """Cancels ``victim`` (the batch) inside the acquire that grants a slot, just before the
    grant is returned: the cancel lands while the answer is on its way to the batch."""

    victim: asyncio.Task[object] | None = None

    async def acquire(self, key: str) -> Grant:
        grant = await super().acquire(key)
        if grant is Grant.CREATE and self.victim is not None:
            self.victim.cancel()
            self.victim = None
        return grant


async def test_a_slot_granted_as_the_batch_is_cancelled_is_never_held_for_ever(
        emu: KlingEmulator) -> None:
    """``create_many(timeout=...)`` asks for slots through ``within`` (the batch deadline). On
    Python 3.10 that runs acquire() as a task of its own: a grant that arrived as the batch
    was cancelled was dropped, and the slot stayed held by nobody, for the coordinator's
    lifetime (no create, no doubt for a lookup to settle). Every held slot must be one that
    something will settle."""
    coord = _CancelsOnGrant(max_in_flight=2)
    url = emu.sample_url(10)
    async with voiceapi.AsyncVoiceClient(emu.access_key, emu.secret_key,
                                         base_url=emu.base_url,
                                         coordinator=coord) as client:
        batch = asyncio.ensure_future(client.custom_voices.create_many(
            [{"voice_name": f"v{i}", "voice_url": url} for i in range(3)],
            timeout=30, poll_interval=0.05))
        coord.victim = batch
        with pytest.raises(asyncio.CancelledError):
            await batch
        for _ in range(20):  # a give-back may run as a task of its own: let it run
            await asyncio.sleep(0)
        stranded = [k for k in coord._held if not coord.in_doubt(k)]
        assert stranded == []
