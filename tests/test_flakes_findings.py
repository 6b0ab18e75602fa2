"""Product races found by making the suite flake-proof (helper "flakes"), each pinned by a
deterministic reproduction. Product code belongs to another helper: these are strict xfails
until it is fixed there."""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping, Sequence
from typing import Any

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


async def test_a_probe_that_finds_a_create_not_yet_journaled_is_not_a_rerun() -> None:
    import uuid

    from tests._redis_server import running_redis
    from voiceapi._coordinator import Grant
    from voiceapi.coordination import RedisCoordinator

    ns = f"t-{uuid.uuid4().hex[:8]}"
    with running_redis() as srv:
        async with KlingEmulator(concurrency=10, task_seconds=0.2) as emu, \
                RedisCoordinator(srv.url, namespace=ns) as other, \
                RedisCoordinator(srv.url, namespace=ns) as mine, \
                voiceapi.AsyncVoiceClient(api_key=emu.api_key, base_url=emu.base_url,
                                          retry_policy=FAST_RETRY) as client:
            url = emu.sample_url(10)
            items = [{"voice_name": f"v{i}", "voice_url": url, "external_task_id": f"{ns}-{i}"}
                     for i in range(8)]
            # The other worker holds item 0's slot and its create has landed at Kling; the
            # answer is still on its way (so nothing is journaled yet).
            assert await other.acquire(items[0]["external_task_id"]) is Grant.CREATE
            landed = await client.custom_voices.create(**items[0])
            asked = asyncio.Event()
            known = mine.known

            async def known_then_signal(keys: Sequence[str]) -> Mapping[str, Any]:
                try:
                    return await known(keys)
                finally:
                    if list(keys) == [items[0]["external_task_id"]]:
                        asked.set()

            # This worker's probe asks its journal about item 0 alone, after finding it at
            # Kling (the re-attach before it asks about every item at once).
            mine.known = known_then_signal  # type: ignore[method-assign]
            batch = asyncio.ensure_future(client.custom_voices.create_many(
                items, coordinator=mine, poll_interval=0.05, timeout=30))
            await asyncio.wait_for(asked.wait(), 30)
            # Now the other worker's answer arrives: journaled, followed to its end.
            await other.accepted(items[0]["external_task_id"], landed.task_id,
                                 landed.task_status.value)
            results = await asyncio.wait_for(batch, 60)
            done = await client.custom_voices.wait(landed.task_id, timeout=30,
                                                   poll_interval=0.05)
            await other.finished(items[0]["external_task_id"], done.task_id,
                                 done.task_status.value)
    assert [r.ok for r in results] == [True] * 8, [repr(r.error) for r in results]
    assert emu.stats()["tasks_per_external_id"] == {"1": 8}
    # The probe's answer named a task of a worker sharing the coordinator: items 1-7 are
    # created without a lookup each (each such lookup answers 1201 "not found").
    assert emu.count("get", code=1201) == 0, emu.count("get", code=1201)


async def test_every_worker_learns_that_redis_lost_the_shared_state() -> None:
    import uuid

    import redis.asyncio as aioredis

    from tests._redis_server import running_redis
    from voiceapi._coordinator import Grant
    from voiceapi.coordination import RedisCoordinator

    ns = f"t-{uuid.uuid4().hex[:8]}"
    with running_redis() as srv:
        async with RedisCoordinator(srv.url, namespace=ns) as first, \
                RedisCoordinator(srv.url, namespace=ns) as second:
            assert await first.acquire("k0") is Grant.CREATE
            assert await second.acquire("k1") is Grant.CREATE
            assert not first.state_lost and not second.state_lost
            raw = aioredis.Redis.from_url(srv.url)
            await raw.flushall()  # what a restart without persistence leaves
            await raw.aclose()
            assert await first.acquire("k2") is Grant.CREATE
            assert first.state_lost and not first.vouches_for_creates
            assert await second.acquire("k3") is Grant.CREATE
            # The journal the second worker relied on is gone for it too.
            assert second.state_lost and not second.vouches_for_creates
