"""Adversarial review of the coordination code added in session 5 (real Redis from
tests/_redis_server.py). Each test failed before its fix, or records an attack that held."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis

from voiceapi._coordinator import Grant
from voiceapi.coordination import RedisCoordinator

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
