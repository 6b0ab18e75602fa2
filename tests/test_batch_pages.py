"""One page walker (issue 13.2), page sizes the server refuses (10.4), and tracking that does
not depend on the list order (10.5) and parses only what it tracks (16.3)."""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import pytest

import voiceapi
from tests.conftest import FAST_RETRY
from voiceapi._decode import parse_task
from voiceapi._errors import InvalidRequestError
from voiceapi._models import VoiceTask
from voiceapi._pages import PageLimit, is_page_size_refusal, smaller_page_size, walk_pages
from voiceapi._tracker import ListTracker, list_order
from voiceapi.testing import KlingEmulator


def client_for(emu: KlingEmulator, **kw: Any) -> voiceapi.AsyncVoiceClient:
    kw.setdefault("retry_policy", FAST_RETRY)
    return voiceapi.AsyncVoiceClient(api_key=emu.api_key, base_url=emu.base_url, timeout=5,
                                     **kw)


async def fill(emu: KlingEmulator, client: voiceapi.AsyncVoiceClient, n: int,
               prefix: str = "old") -> None:
    """``n`` finished tasks on the account (someone's earlier work)."""
    concurrency, emu.concurrency = emu.concurrency, 10_000
    sem = asyncio.Semaphore(50)

    async def one(i: int) -> None:
        async with sem:
            await client.custom_voices.create(voice_name=f"{prefix}{i}",
                                              voice_url=emu.sample_url())

    await asyncio.gather(*(one(i) for i in range(n)))
    emu.advance(3600)  # they are all done
    emu.concurrency = concurrency


# --- the walker and page sizes ----------------------------------------------------------------

def test_page_size_steps() -> None:
    assert [smaller_page_size(s) for s in (1000, 700, 500, 100, 50)] == [500, 500, 100, None,
                                                                         None]
    refused = InvalidRequestError("pageSize must be between 1 and 500", code=1201,
                                  http_status=400)
    not_found = InvalidRequestError("Task not found by id/external id: pageSize", code=1201)
    other = InvalidRequestError("Invalid parameter", code=1201)
    assert is_page_size_refusal(refused)
    assert not is_page_size_refusal(not_found) and not is_page_size_refusal(other)


async def test_walker_steps_down_without_skipping_records() -> None:
    records = [{"task_id": str(i)} for i in range(1234)]
    sizes: list[int] = []

    async def fetch(page_num: int, size: int) -> list[Any]:
        sizes.append(size)
        if size > 100:
            raise InvalidRequestError(f"pageSize must be between 1 and 100, got {size}",
                                      code=1201, http_status=400)
        return records[(page_num - 1) * size:page_num * size]

    limit = PageLimit()
    seen = [r["task_id"] for page in [p async for p in walk_pages(fetch, page_size=1000,
                                                                    limit=limit)] for r in page]
    assert seen == [r["task_id"] for r in records]
    assert sizes[:3] == [1000, 500, 100] and limit.limit == 100
    sizes.clear()
    assert len([p async for p in walk_pages(fetch, page_size=1000, limit=limit)]) == 13
    assert 1000 not in sizes and 500 not in sizes  # remembered


@pytest.mark.parametrize("max_page_size", [100, 500, 1000])
async def test_iter_all_under_each_page_size(max_page_size: int) -> None:
    async with KlingEmulator(max_page_size=max_page_size, presets=130) as emu:
        async with client_for(emu) as client:
            await fill(emu, client, 230)
            tasks = [t async for t in client.custom_voices.iter_all(page_size=1000)]
            refusals = emu.count("list", code=1201)
            again = [t async for t in client.custom_voices.iter_all(page_size=1000)]
            presets = [v async for v in client.preset_voices.iter_all(page_size=1000)]
            if max_page_size < 1000:
                with pytest.raises(voiceapi.InvalidRequestError, match="pageSize"):
                    await client.custom_voices.list(page_size=1000)  # sent as given
            with pytest.raises(voiceapi.ValidationError):
                await client.custom_voices.list(page_size=1001)
    assert len({t.task_id for t in tasks}) == 230 and len(again) == 230
    assert refusals == {100: 2, 500: 1, 1000: 0}[max_page_size]
    assert emu.count("list", code=1201) - refusals == (1 if max_page_size < 1000 else 0)
    assert len(presets) == 130 and emu.count("presets", code=1201) == refusals


# --- the tracker, order-independent ------------------------------------------------------------

class FakeApi:
    """List pages over an in-memory account, in either order; counts what was asked."""

    def __init__(self, n: int, order: str, *, max_page: int = 500, listed: bool = True) -> None:
        self.records: list[Any] = [self.record(i) for i in range(n)]
        self.order = order
        self.page_limit = PageLimit()
        self.max_page = max_page
        self.listed = listed
        self.pages: list[tuple[int, int]] = []
        self.gets: list[str] = []
        self.rate_limit_delay = 0.01
        self.coordinator = None

    @staticmethod
    def record(i: int, status: str = "processing") -> dict[str, Any]:
        return {"task_id": str(10_000 + i), "task_status": status, "created_at": 1_000_000 + i,
                "updated_at": 1_000_000 + i, "task_info": {"external_task_id": f"e{i}"}}

    def add(self, status: str = "processing") -> str:
        rec = self.record(len(self.records), status)
        self.records.append(rec)
        return str(rec["task_id"])

    async def list_page(self, page_num: int, page_size: int) -> list[Any]:
        self.pages.append((page_num, page_size))
        if page_size > self.max_page:
            raise InvalidRequestError(f"pageSize must be between 1 and {self.max_page}",
                                      code=1201, http_status=400)
        if not self.listed:
            return []
        ordered = self.records if self.order == "oldest" else self.records[::-1]
        return ordered[(page_num - 1) * page_size:page_num * page_size]

    async def get(self, task_id: str) -> VoiceTask:
        self.gets.append(task_id)
        for record in self.records:
            if record["task_id"] == task_id:
                return parse_task(record)
        raise InvalidRequestError(f"Task not found by id/external id: {task_id}", code=1201,
                                  http_status=400)

    async def lookup(self, external_task_id: str) -> VoiceTask | None:
        raise AssertionError("not used by the tracker")

    async def create(self, body: dict[str, str]) -> Any:
        raise AssertionError("not used by the tracker")


@pytest.mark.parametrize("order", ["newest", "oldest"])
async def test_tracker_finds_a_batch_at_either_end_cheaply(order: str) -> None:
    api = FakeApi(20_000, order)
    tracker = ListTracker(api)
    mine = [api.add() for _ in range(8)]
    found = await tracker.poll(mine)
    assert set(found) == set(mine) and not api.gets
    first = len(api.pages)
    assert first <= 14  # locating the end of 20,000 tasks: gallop + bisect
    for _ in range(5):  # later polls start where the batch sits
        api.pages.clear()
        mine.append(api.add())
        found = await tracker.poll(mine)
        assert set(found) == set(mine) and len(api.pages) <= 2
    assert tracker.order == order


async def test_tracker_parses_only_tracked_records() -> None:
    api = FakeApi(50, "newest")
    api.records[10] = {"task_id": "broken", "task_status": 42, "voices": "nonsense"}
    api.records[11] = "not even an object"
    mine = [api.add()]
    assert set(await ListTracker(api).poll(mine)) == set(mine)


async def test_tracker_falls_back_to_bounded_lookups() -> None:
    """A server whose list does not show the tasks: each is asked for alone, at most
    BATCH_MAX_LOOKUPS_PER_POLL per poll, the longest-missed first."""
    api = FakeApi(0, "newest", listed=False)
    tracker = ListTracker(api, max_lookups=3)
    mine = [api.add() for _ in range(5)]
    assert await tracker.poll(mine) == {}  # missing once: maybe not listed yet
    found = await tracker.poll(mine)
    assert len(found) == 3 and len(api.gets) == 3
    found = await tracker.poll(mine)
    assert len(found) == 3 and set(api.gets) == set(mine)


async def test_tracker_steps_the_page_size_down() -> None:
    api = FakeApi(300, "newest", max_page=100)
    tracker = ListTracker(api)
    mine = [api.add() for _ in range(200)]
    assert set(await tracker.poll(mine)) == set(mine)
    assert api.page_limit.limit == 100


def test_list_order_from_created_at() -> None:
    recs = [FakeApi.record(i) for i in range(3)]
    assert list_order(recs) == "oldest" and list_order(recs[::-1]) == "newest"
    assert list_order(recs[:1]) is None
    assert list_order([{"created_at": "5"}, {"created_at": "4"}]) == "newest"


@pytest.mark.parametrize("order", ["newest", "oldest"])
@pytest.mark.slow
async def test_300_items_stay_cheap_in_either_order(order: str) -> None:
    async with KlingEmulator(concurrency=20, task_seconds=0.1, list_order=order,
                             max_page_size=500) as emu:
        async with client_for(emu) as client:
            await fill(emu, client, 700)
            before = emu.count()
            items = [{"voice_name": f"v{i}", "voice_url": emu.sample_url()} for i in range(300)]
            results = await client.custom_voices.create_many(items, poll_interval=0.05)
    assert all(r.ok for r in results)
    per_ext = collections.Counter(t["task_info"].get("external_task_id") for t in emu.tasks())
    assert emu.task_count == 1000 and set(per_ext.values()) == {1}
    assert (emu.count() - before) / 300 <= 4


async def test_tracker_drops_a_task_the_server_says_is_gone() -> None:
    api = FakeApi(0, "newest", listed=False)
    tracker = ListTracker(api)
    mine = [api.add(), api.add()]
    api.records.pop()  # the second one vanishes from the account
    for _ in range(3):
        found = await tracker.poll(mine)
    assert set(found) == {mine[0]} and set(tracker.gone) == {mine[1]}
    assert voiceapi._decode.is_not_found(tracker.gone[mine[1]])


async def test_poll_cost_leaves_out_time_queued_behind_the_rate_limit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Polls are spaced by their own cost: a page that waited behind the client's rate limit
    (creates sent meanwhile) must not count as a slow poll (12 items of 0.5 s tasks at
    8 req/s took 6.9 s when it did). A poll of several pages still costs several pages."""
    import voiceapi._tracker as tracker_mod

    now = [100.0]

    class Clock:
        @staticmethod
        def monotonic() -> float:
            return now[0]

    class QueuedApi(FakeApi):
        took = 0.01

        async def list_page(self, page_num: int, page_size: int) -> list[Any]:
            now[0] += self.took
            return await super().list_page(page_num, page_size)

    monkeypatch.setattr(tracker_mod, "time", Clock)
    api = QueuedApi(0, "newest")
    tracker = ListTracker(api)
    mine = [api.add() for _ in range(3)]
    await tracker.poll(mine)
    assert tracker.last_duration == pytest.approx(0.01)
    api.took = 0.26  # this time the page waited 0.25 s for a request slot
    await tracker.poll(mine)
    assert tracker.last_duration == pytest.approx(0.01)
    api.took = 0.005  # faster than ever: that is the new own time
    await tracker.poll(mine)
    assert tracker.last_duration == pytest.approx(0.005)
