"""Adversarial review (helper "stamps") of two changes: VoiceTask timestamps built on first
read (``_models._RawStamps``), and the batch start-up probe asking the coordinator which keys
a worker holds (``_Run._shared_create``, ``RedisCoordinator.held``)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import pytest

import voiceapi
from tests.conftest import FAST_RETRY
from voiceapi._decode import parse_task
from voiceapi.coordination._codec import dump_task, load_task
from voiceapi.testing import KlingEmulator


def _record(created: Any = 1700000000123, updated: Any = 1700000061456) -> dict[str, Any]:
    """A task record in exactly the types the API documents: the parser's fast path, which
    leaves both stamps pending."""
    return {"task_id": "t-1", "task_status": "succeed", "task_status_msg": "",
            "task_info": {"external_task_id": "e-1"}, "task_result": {"voices": []},
            "created_at": created, "updated_at": updated}


# --- lazy timestamps ----------------------------------------------------------------------


def test_a_stamp_set_by_hand_stays_when_the_other_one_is_read_first() -> None:
    """``object.__setattr__`` is attrs' documented way to set a field of a frozen instance.
    On a task whose stamps were still pending, setting one and then reading the OTHER built
    both from the API's milliseconds and overwrote the one set by hand (an eagerly parsed
    task keeps it)."""
    mine = datetime(2020, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    task = parse_task(_record())
    object.__setattr__(task, "created_at", mine)
    assert task.updated_at == datetime.fromtimestamp(1700000061.456, timezone.utc)
    assert task.created_at is mine

    task = parse_task(_record())
    object.__setattr__(task, "updated_at", mine)
    assert task.created_at == datetime.fromtimestamp(1700000000.123, timezone.utc)
    assert task.updated_at is mine


def _eager(ms: int) -> datetime | None:
    """What the parser built before stamps were lazy (the same call, caught the same way)."""
    try:
        return datetime.fromtimestamp(ms / 1000, timezone.utc)
    except (OverflowError, OSError, ValueError):
        return None


_EDGES = [0, -1, 1, -86_400_000, 1700000000123, 253402300799999, 253402300800000,
          -62135596800000, -62135596800001, 2**63, -(2**63), 10**400]


@pytest.mark.parametrize("created", _EDGES)
@pytest.mark.parametrize("updated", [0, 1700000000123, 253402300800000, 10**400, None])
def test_pending_stamps_are_the_eager_values_at_the_edges(created: int,
                                                          updated: int | None) -> None:
    """Zero, negative, the first and last representable millisecond and one past each, and
    integers no float holds; equal stamps, and stamps of which only one overflows. The lazy
    task equals the field-by-field parse of the same record (both ways), and the Redis
    codec's copy of it, and holds the eager values."""
    updated = created if updated is None else updated
    task = parse_task(_record(created, updated))
    lenient = parse_task({**_record(created, updated), "task_status_msg": None})
    assert task == lenient and lenient == task
    assert load_task(dump_task(task)) == task
    assert (task.created_at, task.updated_at) == (_eager(created), _eager(updated))


# --- the batch's start-up probe -----------------------------------------------------------


async def test_a_rerun_joined_while_another_worker_holds_its_first_item_creates_nothing_twice(
) -> None:
    """A rerun of a batch whose earlier run was not journaled by this coordinator (run without
    it, under another namespace, or its shared state expired) on a server that accepts a
    repeated ``external_task_id``. Another worker of the rerun holds the slot of the first
    item while it looks that item up (a look-first worker does: acquire, then lookup, then
    ``accepted``). The probe of this worker finds the item at Kling, not journaled, and
    held: that slot is no proof of a create of this coordinator's (the task is an hour old,
    an answer on its way is not), so the batch is a rerun and every item is looked up before
    it is created. Taking the held slot as proof created items 1-7 a second time."""
    from tests._redis_server import running_redis
    from voiceapi._coordinator import Grant
    from voiceapi.coordination import RedisCoordinator

    ns = f"t-{uuid.uuid4().hex[:8]}"
    with running_redis() as srv:
        async with KlingEmulator(concurrency=10, task_seconds=0.2,
                                 unique_external_ids=False) as emu, \
                RedisCoordinator(srv.url, namespace=ns) as other, \
                RedisCoordinator(srv.url, namespace=ns) as mine, \
                voiceapi.AsyncVoiceClient(api_key=emu.api_key, base_url=emu.base_url,
                                          retry_policy=FAST_RETRY) as client:
            url = emu.sample_url(10)
            items = [{"voice_name": f"v{i}", "voice_url": url, "external_task_id": f"{ns}-{i}"}
                     for i in range(8)]
            first = items[0]["external_task_id"]
            emu.advance(-3600)  # the earlier run, an hour ago: every item created, and ended
            earlier = [await client.custom_voices.create(**item) for item in items]
            emu.advance(3600)
            # The other worker of the rerun: item 0's slot, its lookup on the way.
            assert await other.acquire(first) is Grant.CREATE
            old = await client.custom_voices.get(earlier[0].task_id)
            assert old.is_terminal
            asked = asyncio.Event()
            known = mine.known

            async def known_then_signal(keys: Sequence[str]) -> Any:
                try:
                    return await known(keys)
                finally:
                    if list(keys) == [first]:
                        asked.set()

            mine.known = known_then_signal  # type: ignore[method-assign]
            batch = asyncio.ensure_future(client.custom_voices.create_many(
                items, coordinator=mine, poll_interval=0.05, timeout=30))
            await asyncio.wait_for(asked.wait(), 30)
            # The other worker's lookup answers: the old task is journaled and has ended.
            await other.accepted(first, old.task_id, old.task_status.value)
            await other.finished(first, old.task_id, old.task_status.value)
            results = await asyncio.wait_for(batch, 60)
    assert [r.ok for r in results] == [True] * 8, [repr(r.error) for r in results]
    assert emu.stats()["tasks_per_external_id"] == {"1": 8}
    assert emu.internal_errors == []  # its clock went back and forth: nothing broke in it


async def test_redis_gone_when_the_probe_asks_held_stops_the_batch_with_a_typed_error() -> None:
    """Redis dies between the probe's two questions (journal, then held slots): the batch
    stops with the coordinator's typed error before it creates anything, as for any other
    coordinator call; never a bare redis-py error, never a batch carrying on uncoordinated."""
    from tests._redis_server import running_redis
    from voiceapi._coordinator import CoordinatorError
    from voiceapi.coordination import RedisCoordinator

    ns = f"t-{uuid.uuid4().hex[:8]}"
    with running_redis() as srv:
        async with KlingEmulator(concurrency=10, task_seconds=0.2) as emu, \
                RedisCoordinator(srv.url, namespace=ns) as mine, \
                voiceapi.AsyncVoiceClient(api_key=emu.api_key, base_url=emu.base_url,
                                          retry_policy=FAST_RETRY) as client:
            url = emu.sample_url(10)
            items = [{"voice_name": f"v{i}", "voice_url": url, "external_task_id": f"{ns}-{i}"}
                     for i in range(3)]
            await client.custom_voices.create(**items[0])  # found by the probe
            held = mine.held

            async def held_after_a_crash(keys: Sequence[str]) -> set[str]:
                srv.stop()
                return await held(keys)

            mine.held = held_after_a_crash  # type: ignore[method-assign]
            with pytest.raises(CoordinatorError, match="unreachable"):
                await asyncio.wait_for(client.custom_voices.create_many(
                    items, coordinator=mine, poll_interval=0.05, timeout=30), 60)
            assert emu.task_count == 1
        assert emu.internal_errors == []


async def test_a_rerun_restarted_after_a_worker_died_mid_lookup_creates_nothing_twice() -> None:
    """The same rerun (an earlier run this coordinator never journaled, a server that accepts
    a repeated ``external_task_id``), but the worker that held item 0's slot for its lookup
    died: the slot is an orphan. Its worker died looking the item up, not creating it, and
    the task found is an hour old: the batch is still a rerun."""
    from tests._redis_server import running_redis
    from voiceapi._coordinator import Grant
    from voiceapi.coordination import RedisCoordinator

    ns = f"t-{uuid.uuid4().hex[:8]}"
    with running_redis() as srv:
        async with KlingEmulator(concurrency=10, task_seconds=0.2,
                                 unique_external_ids=False) as emu, \
                RedisCoordinator(srv.url, namespace=ns, lease_seconds=0.3) as mine, \
                voiceapi.AsyncVoiceClient(api_key=emu.api_key, base_url=emu.base_url,
                                          retry_policy=FAST_RETRY) as client:
            url = emu.sample_url(10)
            items = [{"voice_name": f"v{i}", "voice_url": url, "external_task_id": f"{ns}-{i}"}
                     for i in range(8)]
            emu.advance(-3600)  # the earlier run, an hour ago: every item created, and ended
            for item in items:
                await client.custom_voices.create(**item)
            emu.advance(3600)
            dead = RedisCoordinator(srv.url, namespace=ns, lease_seconds=0.3)
            assert await dead.acquire(items[0]["external_task_id"]) is Grant.CREATE
            await dead.aclose()  # died during its lookup: the slot is never freed
            results = await asyncio.wait_for(client.custom_voices.create_many(
                items, coordinator=mine, poll_interval=0.05, timeout=30), 60)
    assert [r.ok for r in results] == [True] * 8, [repr(r.error) for r in results]
    assert emu.stats()["tasks_per_external_id"] == {"1": 8}
    assert emu.internal_errors == []  # its clock went back and forth: nothing broke in it
