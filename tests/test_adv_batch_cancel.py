"""Adversarial attacks on cancelling create_many while its creates are on the wire, with a
coordinator that outlives the batch (the client's, or one shared by several batches). Each test
here failed before its fix, or records an attack that held.

A cancelled create may or may not have landed at Kling. The coordinator must neither keep its
slot for ever (every later batch then waited for a slot that never freed) nor let a later batch
create its key without looking it up first.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

import voiceapi
from voiceapi.coordination import RedisCoordinator
from voiceapi.testing import KlingEmulator

from ._redis_server import RedisServer, running_redis


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with running_redis() as srv:
        yield srv


def _items(url: str, n: int) -> list[dict[str, Any]]:
    return [{"voice_name": f"v{i}", "voice_url": url} for i in range(n)]


async def _cancel_mid_create(emu: KlingEmulator, client: voiceapi.AsyncVoiceClient,
                             items: list[dict[str, Any]], coord: Any) -> None:
    """Start a batch whose creates are stored at once but answered late; cancel it once they
    are on the wire (bounded wait on the server's state)."""
    emu.inject("create", "slow", delay=2.0, times=2)
    batch = asyncio.ensure_future(client.custom_voices.create_many(
        items, coordinator=coord, poll_interval=0.05))
    for _ in range(500):
        if emu.task_count >= 2:
            break
        await asyncio.sleep(0.01)
    assert emu.task_count >= 2
    batch.cancel()
    with pytest.raises(asyncio.CancelledError):
        await batch
    emu.clear_faults()


@pytest.mark.parametrize("task_seconds", [0.1, 1.5], ids=["ended-first", "still-running"])
async def test_a_cancelled_batch_leaves_a_shared_local_coordinator_usable(
        task_seconds: float) -> None:
    """Its two cancelled creates held their slots for ever (cap 2): the next batch on the same
    coordinator never got one, and every item ended NotSubmittedError at its timeout. Now the
    coordinator looks them up while the next batch polls. That batch sends the items in another
    order (its first item is new, so no rerun is suspected): the cancelled creates landed, and
    must be found, not made again; the cap holds throughout."""
    async with KlingEmulator(concurrency=2, task_seconds=task_seconds,
                             unique_external_ids=False) as emu, \
            voiceapi.AsyncVoiceClient(emu.access_key, emu.secret_key,
                                      base_url=emu.base_url) as client:
        url = emu.sample_url(10)
        coord = voiceapi.LocalCoordinator(2)
        await _cancel_mid_create(emu, client, _items(url, 4), coord)
        assert coord.in_flight == 2  # they may have landed: counted until looked up
        again = list(reversed(_items(url, 4)))
        results = await client.custom_voices.create_many(again, coordinator=coord,
                                                          poll_interval=0.05, timeout=20)
        assert [r.ok for r in results] == [True] * 4, [r.error for r in results]
        assert emu.stats()["tasks_per_external_id"] == {"1": 4}
        assert emu.count("create", code=1303) == 0  # never sent above the cap
        assert coord.in_flight == 0


async def test_a_cancelled_batch_leaves_a_long_lived_redis_coordinator_usable(
        server: RedisServer) -> None:
    """Its cancelled creates' slots were renewed for as long as the coordinator lived, so the
    next batch on it waited for slots nobody would free. Now their leases lapse into orphans,
    which a lookup settles (found: followed; unknown after the grace: freed)."""
    ns = f"t-{uuid.uuid4().hex[:12]}"
    async with KlingEmulator(concurrency=2, task_seconds=0.1,
                             unique_external_ids=False) as emu:
        url = emu.sample_url(10)
        coord = RedisCoordinator(server.url, namespace=ns, max_in_flight=2, lease_seconds=0.3,
                                 orphan_grace=0.5)
        async with coord, voiceapi.AsyncVoiceClient(emu.access_key, emu.secret_key,
                                                    base_url=emu.base_url,
                                                    coordinator=coord) as client:
            await _cancel_mid_create(emu, client, _items(url, 4), coord)
            again = list(reversed(_items(url, 4)))
            results = await client.custom_voices.create_many(again, poll_interval=0.05,
                                                              timeout=20)
            snap = await coord.snapshot()
        assert [r.ok for r in results] == [True] * 4, [r.error for r in results]
        assert emu.stats()["tasks_per_external_id"] == {"1": 4}
        assert snap["slots"] == [] and snap["orphans"] == [], snap


async def test_an_abandoned_create_is_settled_by_lookups_and_counted_until_then() -> None:
    """The coordinator half: an abandoned key keeps its slot and waits alone; a failed lookup
    settles nothing; "not found" frees it only once its create can no longer land; a task
    found running is followed until seen ending."""
    from voiceapi import TaskStatus, VoiceTask
    from voiceapi._constants import BATCH_ORPHAN_AFTER
    from voiceapi._coordinator import Grant

    coord = voiceapi.LocalCoordinator(1)
    running = VoiceTask(task_id="t1", task_status=TaskStatus.PROCESSING, external_task_id="k")
    answers: list[Any] = [voiceapi.APIConnectionError("down"), None, None, running]

    async def lookup(key: str) -> VoiceTask | None:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[no-any-return]

    seen: dict[str, VoiceTask] = {}

    async def poll(ids: Any) -> dict[str, VoiceTask]:
        return {i: seen[i] for i in ids if i in seen}

    assert await coord.acquire("k") is Grant.CREATE
    coord.abandon("k")
    assert coord.in_flight == 1 and coord.in_doubt("k") and coord.key_waits("k")
    assert await coord.acquire("k") is Grant.WAIT and await coord.acquire("j") is Grant.WAIT
    await coord.observe([], poll, lookup)  # the lookup fails: nothing settled
    await coord.observe([], poll, lookup)  # not found, but too young: its create may land
    assert coord.in_flight == 1 and coord.key_waits("k")
    coord._doubt["k"] -= BATCH_ORPHAN_AFTER  # (its create is now old enough)
    await coord.observe([], poll, lookup)  # not found, old: freed, and no longer in doubt
    assert coord.in_flight == 0 and not coord.in_doubt("k")
    assert await coord.acquire("k") is Grant.CREATE
    coord.abandon("k")
    await coord.observe([], poll, lookup)  # found running: adopted, journaled, followed
    assert coord.in_flight == 1 and not coord.key_waits("k")
    assert await coord.acquire("k") is Grant.FOLLOW
    assert (await coord.known(["k"]))["k"].task_id == "t1"
    seen["t1"] = VoiceTask(task_id="t1", task_status=TaskStatus.SUCCEED, external_task_id="k")
    await coord.observe(["t1"], poll, lookup)  # a batch follows it as another's: freed here
    assert coord.in_flight == 0
    assert (await coord.known(["k"]))["k"].status == "succeed"
