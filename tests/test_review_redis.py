"""Adversarial review of the coordination code added in session 5 (real Redis from
tests/_redis_server.py). Each test failed before its fix, or records an attack that held."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis

import voiceapi
from voiceapi._coordinator import Grant
from voiceapi._errors import ValidationError
from voiceapi.coordination import RedisCoordinator
from voiceapi.testing import KlingEmulator

from ._redis_server import RedisServer, running_redis


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with running_redis() as srv:
        yield srv


async def _flush(url: str) -> None:
    r = aioredis.Redis.from_url(url)
    try:
        await r.flushdb()
    finally:
        await r.aclose()


async def test_every_old_worker_notices_the_lost_state_not_only_the_first(
        server: RedisServer) -> None:
    """Two workers joined the same state; Redis then lost it and no new worker joined. The
    first old worker to acquire noticed the loss, but wrote ITS token (the old epoch) back:
    the second old worker then found its own token in place and went on vouching for keys
    whose journal entries were gone (a second create of an earlier job's voice)."""
    ns = f"t-{uuid.uuid4().hex[:12]}"
    a = RedisCoordinator(server.url, namespace=ns, max_in_flight=4)
    b = RedisCoordinator(server.url, namespace=ns, max_in_flight=4)
    async with a, b:
        assert await a.acquire("k1") is Grant.CREATE
        await a.accepted("k1", "t1", "submitted")
        await _flush(server.url)
        assert await a.acquire("k2") is Grant.CREATE
        assert a.state_lost
        assert await b.acquire("k1") is Grant.CREATE  # its journal entry is gone
        assert b.state_lost and not b.vouches_for_creates


async def test_a_second_loss_is_noticed_by_a_worker_that_joined_after_the_first(
        server: RedisServer) -> None:
    """Redis loses the state twice. A worker that joined between the two losses holds the
    epoch written after the first one; after the second it must notice too."""
    ns = f"t-{uuid.uuid4().hex[:12]}"
    old = RedisCoordinator(server.url, namespace=ns, max_in_flight=4)
    async with old:
        assert await old.acquire("k1") is Grant.CREATE
        await _flush(server.url)
        assert await old.acquire("k2") is Grant.CREATE and old.state_lost
        async with RedisCoordinator(server.url, namespace=ns, max_in_flight=4) as mid:
            assert await mid.acquire("k3") is Grant.CREATE
            assert not mid.state_lost
            await _flush(server.url)
            assert await old.acquire("k4") is Grant.CREATE  # old re-writes an epoch first
            assert await mid.acquire("k3") is Grant.CREATE
            assert mid.state_lost


async def test_two_batches_of_one_worker_never_create_the_same_item_twice(
        server: RedisServer) -> None:
    """One coordinator (a worker process serving requests) runs two batches at once that
    share items. The second batch's acquire of a key the first is creating right now found
    the slot owned by its own worker and was granted CREATE too: a server that accepts a
    repeated external id created (and billed) the voice twice. A LocalCoordinator answers
    FOLLOW there; so must Redis."""
    ns = f"t-{uuid.uuid4().hex[:12]}"
    async with KlingEmulator(concurrency=8, task_seconds=0.2, unique_external_ids=False) as emu:
        emu.inject("create", "slow", times=10, delay=0.3)  # both batches ask while in flight
        url = emu.sample_url(10)
        items = [{"voice_name": f"v{i}", "voice_url": url} for i in range(3)]
        async with RedisCoordinator(server.url, namespace=ns, max_in_flight=8) as coord, \
                voiceapi.AsyncVoiceClient(emu.access_key, emu.secret_key,
                                          base_url=emu.base_url, coordinator=coord) as client:
            first, second = await asyncio.gather(*(
                client.custom_voices.create_many(items, poll_interval=0.05, timeout=30)
                for _ in range(2)))
        assert [r.ok for r in first + second] == [True] * 6, [r.error for r in first + second]
        assert [r.task.task_id for r in first] == [r.task.task_id for r in second]  # type: ignore[union-attr]
        assert emu.stats()["tasks_per_external_id"] == {"1": 3}


@pytest.mark.parametrize("url", ["redis://user:s3cret-pw@[::1/0", "redis://:s3cret-pw@[::1:6379/0"])
def test_a_redis_url_urllib_cannot_split_is_a_validation_error_without_its_password(
        url: str) -> None:
    """A bad IPv6 host: masking the password in redis-py's message split the URL again, and
    urllib's own ValueError escaped bare from the handler meant to turn it into a
    ValidationError."""
    with pytest.raises(ValidationError, match="the Redis URL is not valid") as refused:
        RedisCoordinator(url, namespace="x")
    assert "s3cret-pw" not in str(refused.value)
    assert refused.value.__context__ is None or "s3cret-pw" not in str(refused.value.__context__)


async def test_an_idle_worker_frees_the_slots_of_tasks_it_left_running_when_they_end(
        server: RedisServer) -> None:
    """Worker A runs ``create_many(wait=False)`` and then has nothing more to do (a web
    worker between requests). Its tasks end at Kling a moment later, but A renews their
    leases for as long as it lives: only a later batch of A's own followed them. Worker B,
    sharing the account's cap, then never gets a slot."""
    ns = f"t-{uuid.uuid4().hex[:12]}"
    async with KlingEmulator(concurrency=3, task_seconds=0.2) as emu:
        url = emu.sample_url(10)
        a = RedisCoordinator(server.url, namespace=ns, max_in_flight=3, lease_seconds=0.5)
        b = RedisCoordinator(server.url, namespace=ns, max_in_flight=3, lease_seconds=0.5)
        async with a, b, \
                voiceapi.AsyncVoiceClient(emu.access_key, emu.secret_key,
                                          base_url=emu.base_url, coordinator=a) as ca, \
                voiceapi.AsyncVoiceClient(emu.access_key, emu.secret_key,
                                          base_url=emu.base_url, coordinator=b) as cb:
            first = await ca.custom_voices.create_many(
                [{"voice_name": f"a{i}", "voice_url": url} for i in range(3)], wait=False)
            assert all(r.task is not None for r in first)
            second = await cb.custom_voices.create_many(
                [{"voice_name": f"b{i}", "voice_url": url} for i in range(3)],
                poll_interval=0.05, timeout=10)
        assert [r.ok for r in second] == [True] * 3, [r.error for r in second]
        assert emu.peak_in_progress <= 3
