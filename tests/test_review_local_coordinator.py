"""Adversarial review of LocalCoordinator's abandoned-create settling (session 5)."""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping

from voiceapi import _constants as C
from voiceapi._coordinator import Grant
from voiceapi._local_coordinator import LocalCoordinator
from voiceapi._models import VoiceTask


async def _poll(ids: Collection[str]) -> Mapping[str, VoiceTask]:
    return {}


async def test_an_abandoned_create_is_not_looked_up_at_every_poll() -> None:
    """A create cancelled unanswered stays in doubt until a lookup finds it, or for
    BATCH_ORPHAN_AFTER (10 s) if Kling never heard of it. The next batch polls every
    ``poll_interval``, and each poll looked every doubtful key up again: with
    ``poll_interval=0.05`` and a few cancelled creates, tens of GETs a second for ten seconds
    (rate limits for the whole account). After "not found", the key is asked again
    BATCH_DOUBT_LOOKUP_GAP later (or once it is old enough to be freed)."""
    coord = LocalCoordinator(max_in_flight=4)
    lookups: list[str] = []

    async def lookup(key: str) -> VoiceTask | None:
        lookups.append(key)
        return None  # not at Kling (yet)

    assert await coord.acquire("k") is Grant.CREATE
    coord.abandon("k")
    started = time.monotonic()
    for _ in range(50):  # a batch polling every few milliseconds
        await coord.observe([], _poll, lookup)
    elapsed = time.monotonic() - started
    assert coord.in_doubt("k")
    assert len(lookups) <= 1 + elapsed / C.BATCH_DOUBT_LOOKUP_GAP, (len(lookups), elapsed)
