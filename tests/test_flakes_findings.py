"""Product races found by making the suite flake-proof (helper "flakes"), each pinned by a
deterministic reproduction. Product code belongs to another helper: these are strict xfails
until it is fixed there."""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping

import pytest

import voiceapi
from tests.conftest import FAST_RETRY
from voiceapi._coordinator import CoordinatorError, LookupFunction, PollFunction
from voiceapi._local_coordinator import LocalCoordinator
from voiceapi._models import VoiceTask
from voiceapi.testing import KlingEmulator


class _OutageDuringAPoll(LocalCoordinator):
    """The store goes away while the batch polls: the accept of item 1's create (sent, task
    created at Kling) fails while a poll is in progress, and that poll then fails too. This is
    what a Redis outage does to a RedisCoordinator; ordered by events, not by time."""

    def __init__(self) -> None:
        super().__init__(2)
        self.polling = asyncio.Event()
        self.accept_failed = asyncio.Event()

    async def accepted(self, key: str, task_id: str, status: str) -> None:
        if self.accept_failed.is_set() or not self._created:  # the first accept succeeds
            await super().accepted(key, task_id, status)
            return
        await asyncio.wait_for(self.polling.wait(), 30)
        self.accept_failed.set()
        raise CoordinatorError("the store is unreachable (accepted)")

    async def observe(self, mine: Collection[str], poll: PollFunction,
                      lookup: LookupFunction) -> Mapping[str, VoiceTask]:
        self.polling.set()
        await asyncio.wait_for(self.accept_failed.wait(), 30)
        await asyncio.sleep(0)  # the failed send's done-callback runs: the batch has seen it
        raise CoordinatorError("the store is unreachable (observe)")


@pytest.mark.xfail(strict=True, reason=(
    "product race (voiceapi/_submitter.py + _batch.py, not this helper's files): a create whose "
    "coordinator.accepted() fails is dropped from Submitter.sending by its done-callback and "
    "only recorded as Submitter.failure; when a poll fails fatally in the same loop turn, "
    "_end_early() runs (cancel/follower.end/give_up) and never looks at that failure, so the "
    "item is returned with task=None and error=None although its task exists at Kling. Seen "
    "as test_redis_gone_mid_batch_stops_create_many_clearly flaking under load"))
async def test_an_item_whose_accept_fails_during_a_fatal_poll_keeps_an_outcome() -> None:
    async with KlingEmulator(concurrency=5, task_seconds=30) as emu:
        url = emu.sample_url(10)
        items = [{"voice_name": f"v{i}", "voice_url": url} for i in range(2)]
        coord = _OutageDuringAPoll()
        async with voiceapi.AsyncVoiceClient(api_key=emu.api_key, base_url=emu.base_url,
                                             retry_policy=FAST_RETRY) as client:
            try:
                results = await asyncio.wait_for(client.custom_voices.create_many(
                    items, coordinator=coord, poll_interval=0.02, timeout=60), 60)
            except CoordinatorError:
                return  # raising the outage is a clear outcome for every item
        assert emu.task_count == 2  # both creates reached Kling
    # Every item says what happened to it: a task, or an error (here: the outage).
    assert all(r.task is not None or r.error is not None for r in results), results
