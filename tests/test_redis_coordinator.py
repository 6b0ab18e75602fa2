"""RedisCoordinator against a real Redis server (see tests/_redis_server.py)."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Collection, Iterator, Mapping
from contextlib import AsyncExitStack
from typing import Any

import pytest
import redis.asyncio as aioredis

import voiceapi
from voiceapi import TaskStatus, VoiceTask
from voiceapi._coordinator import Coordinator, Grant, JournalEntry
from voiceapi.coordination import CoordinationError, RedisCoordinator

from ._redis_server import RedisServer, running_redis

Make = Callable[..., RedisCoordinator]


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with running_redis() as srv:
        yield srv


@pytest.fixture
def ns() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def make(server: RedisServer, ns: str) -> AsyncIterator[Make]:
    """Opens coordinators on the shared test namespace; closes them after the test."""
    async with AsyncExitStack() as stack:
        def factory(**kw: Any) -> RedisCoordinator:
            kw.setdefault("namespace", ns)
            coord = RedisCoordinator(server.url, **kw)
            stack.push_async_callback(coord.aclose)
            return coord
        yield factory


def task(task_id: str, status: TaskStatus, ext: str | None = None) -> VoiceTask:
    return VoiceTask(task_id=task_id, task_status=status, external_task_id=ext)


async def no_poll(ids: Collection[str]) -> Mapping[str, VoiceTask]:
    raise AssertionError("this worker must not poll")


async def no_lookup(key: str) -> VoiceTask | None:
    raise AssertionError("no lookup expected")


# --- packaging and settings -----------------------------------------------------------------

def test_import_voiceapi_needs_no_redis_and_the_error_names_the_extra() -> None:
    code = ("import sys; sys.modules['redis'] = None\n"
            "import voiceapi\n"
            "assert 'voiceapi.coordination' not in sys.modules\n"
            "try:\n"
            "    import voiceapi.coordination\n"
            "except ImportError as e:\n"
            "    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert "pip install 'voiceapi[redis]'" in out.stdout


def test_bad_settings_are_typed_errors() -> None:
    with pytest.raises(voiceapi.ValidationError):
        RedisCoordinator("http://localhost:6379")
    with pytest.raises(voiceapi.ValidationError):
        RedisCoordinator("redis://localhost", lease_seconds=0.001)
    with pytest.raises(voiceapi.ValidationError):
        RedisCoordinator("redis://localhost", max_in_flight=0)
    with pytest.raises(voiceapi.ValidationError):
        RedisCoordinator("redis://localhost", namespace="a{b}")
    with pytest.raises(voiceapi.ValidationError):
        RedisCoordinator(42)  # type: ignore[arg-type]


async def test_namespace_is_a_hash_of_the_key_never_the_key(
        server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    secret_url = server.url.replace("redis://", "redis://user:hunter2@")
    async with voiceapi.AsyncVoiceClient("ak-public", "sk-very-secret") as a, \
            voiceapi.AsyncVoiceClient("ak-public", "another-secret") as b, \
            voiceapi.AsyncVoiceClient(api_key="key-very-secret") as c:
        ca = RedisCoordinator(secret_url, credentials_of=a)
        cb = RedisCoordinator(server.url, credentials_of=b)
        cc = RedisCoordinator(server.url, credentials_of=c)
        assert ca.namespace == cb.namespace  # one account (access key), one namespace
        assert ca.namespace != cc.namespace
        for coord in (ca, cb, cc):
            text = repr(coord) + str(coord.namespace)
            for secret in ("ak-public", "sk-very-secret", "key-very-secret", "hunter2"):
                assert secret not in text
            await coord.aclose()
        with pytest.raises(voiceapi.ValidationError, match="another Kling account"):
            RedisCoordinator(server.url, credentials_of=a).bind(c)
    for var in ("KLING_ACCESS_KEY", "KLING_SECRET_KEY", "KLING_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    async with RedisCoordinator(server.url) as unbound:
        with pytest.raises(voiceapi.ValidationError, match="which Kling account"):
            await unbound.acquire("k")
    monkeypatch.setenv("KLING_API_KEY", "key-very-secret")
    async with RedisCoordinator(server.url) as from_env:
        await from_env.acquire("k")
        assert from_env.namespace == cc.namespace
        r = aioredis.Redis.from_url(server.url)
        keys = [k.decode() for k in await r.keys("*") if isinstance(k, bytes)]
        await r.aclose()
        assert keys and not any("secret" in k for k in keys)
        await from_env.release("k")


async def test_is_a_coordinator_and_accepts_an_existing_client(
        server: RedisServer, ns: str) -> None:
    r = aioredis.Redis.from_url(server.url, decode_responses=True)  # str answers work too
    async with RedisCoordinator(r, namespace=ns) as coord:
        assert isinstance(coord, Coordinator)
        assert await coord.acquire("k1") is Grant.CREATE
        await coord.accepted("k1", "t1", "submitted")
        assert await coord.known(["k1"]) == {"k1": JournalEntry("t1", "submitted")}

        async def poll(ids: Collection[str]) -> Mapping[str, VoiceTask]:
            return {i: task(i, TaskStatus.SUCCEED) for i in ids}

        seen = await coord.observe(["t1"], poll, no_lookup)
        assert seen["t1"].task_status is TaskStatus.SUCCEED
        await coord.finished("k1", "t1", "succeed")
        assert (await coord.snapshot())["slots"] == []
    assert await r.ping()  # a client we were given is not closed by us
    await r.aclose()


# --- slots ------------------------------------------------------------------------------------

async def test_slots_never_exceed_the_cap_under_concurrent_acquirers(make: Make) -> None:
    coords = [make(max_in_flight=3) for _ in range(4)]
    held = 0
    peak = 0
    granted: list[str] = []

    async def worker(coord: RedisCoordinator, keys: list[str]) -> None:
        nonlocal held, peak
        for key in keys:
            for _ in range(2000):  # bounded: each turn waits ≤ 50 ms
                grant = await coord.acquire(key)
                if grant is Grant.CREATE:
                    break
                assert grant is Grant.WAIT
                await coord.wait_for_slot(0.05)
            else:
                raise AssertionError("never granted")
            held += 1
            peak = max(peak, held)
            granted.append(key)
            await coord.accepted(key, f"task-{key}", "submitted")
            await asyncio.sleep(0.005)  # the "task" runs a little while
            held -= 1  # counted down before Redis frees it: the count never under-reports
            await coord.finished(key, f"task-{key}", "succeed")

    await asyncio.gather(*(worker(c, [f"w{i}-k{j}" for j in range(12)])
                           for i, c in enumerate(coords)))
    assert peak <= 3
    assert peak == 3  # the cap was actually used, not just respected
    assert sorted(granted) == sorted({*granted}) and len(granted) == 48
    snap = await coords[0].snapshot()
    assert snap["slots"] == [] and snap["orphans"] == [] and snap["journal"] == 48


async def test_same_key_is_created_once_and_followed_by_the_others(make: Make) -> None:
    coords = [make() for _ in range(4)]
    grants = await asyncio.gather(*(c.acquire("same") for c in coords))
    assert grants.count(Grant.CREATE) == 1
    assert set(grants) == {Grant.CREATE, Grant.FOLLOW}
    creator = coords[grants.index(Grant.CREATE)]
    other = coords[grants.index(Grant.FOLLOW)]
    a = coords[0]
    assert await creator.acquire("same") is Grant.CREATE  # asking again is harmless
    await creator.accepted("same", "t-1", "submitted")
    assert await other.known(["same", "unknown"]) == {"same": JournalEntry("t-1", "submitted")}
    await other.record("same", "t-1", "processing")
    assert (await creator.known(["same"]))["same"] == JournalEntry("t-1", "processing")
    # Finishing frees the slot whoever saw the end; the creator's release is then a no-op.
    await other.finished("same", "t-1", "succeed")
    await creator.release("same")
    snap = await a.snapshot()
    assert snap["slots"] == [] and (await a.known(["same"]))["same"].status == "succeed"


async def test_a_learned_cap_grows_then_falls_to_what_the_account_holds(make: Make) -> None:
    a, b = make(), make()
    assert await a.acquire("k0") is Grant.CREATE
    assert await b.acquire("k1") is Grant.CREATE  # initial learned cap: 2
    assert await a.acquire("k2") is Grant.WAIT
    await a.accepted("k0", "t0", "submitted")  # at the cap, before any 1303: grow
    assert a.cap == 3
    assert await a.acquire("k2") is Grant.CREATE
    await b.accepted("k1", "t1", "submitted")
    assert b.cap == 4
    assert await b.acquire("k3") is Grant.CREATE
    delay = await b.refused("k3")  # Kling says full with 3 held: the cap is 3
    assert 1.0 <= delay <= 1.5
    assert b.cap == 3 and b.in_flight == 1
    assert await b.acquire("k3") is Grant.WAIT
    snap = await a.snapshot()
    assert snap["cap"]["value"] == "3" and snap["cap"]["learned"] == "1"


async def test_a_fixed_cap_is_a_ceiling_and_1303_with_nothing_running_backs_off(make: Make) -> None:
    a, b = make(max_in_flight=2), make(max_in_flight=2)
    assert await a.acquire("k0") is Grant.CREATE
    await a.accepted("k0", "t0", "submitted")
    assert a.cap == 2  # a fixed cap never grows past the user's number
    await a.refused("k0")  # 1303 with nothing of ours at Kling: account-wide backoff
    started = time.monotonic()
    assert await b.acquire("k1") is Grant.WAIT
    await b.wait_for_slot(5.0)
    assert time.monotonic() - started >= 0.5  # slept through the backoff, not a busy loop
    for _ in range(50):
        if await b.acquire("k1") is Grant.CREATE:
            break
        await b.wait_for_slot(0.1)
    assert b.in_flight == 1 and b.cap == 1


async def test_a_release_wakes_waiting_workers_through_pubsub(make: Make,
                                                             server: RedisServer) -> None:
    a, b = make(max_in_flight=1), make(max_in_flight=1)
    assert await a.acquire("k0") is Grant.CREATE
    assert await b.acquire("k1") is Grant.WAIT  # both listeners are starting
    # The release must be published after b's subscription reached the server (a fixed pause
    # was not always enough on a loaded machine): wait until the server counts both.
    channel = b._k("events")[0]
    async with aioredis.from_url(server.url) as probe:
        for _ in range(1000):
            if (await probe.pubsub_numsub(channel))[0][1] >= 2:
                break
            await asyncio.sleep(0.01)
        else:
            pytest.fail("the coordinators never subscribed to their events channel")
    woken = b._wake_event
    waiter = asyncio.create_task(b.wait_for_slot(30.0))
    await asyncio.sleep(0)  # the waiter runs up to its wait on `woken` (no I/O before it)
    await a.finished("k0", "t0", "succeed")
    await waiter
    assert woken.is_set()  # the pub/sub message woke it: b's own poll never sets this event
    assert await b.acquire("k1") is Grant.CREATE


async def test_leases_renew_while_the_holder_lives(make: Make) -> None:
    a = make(lease_seconds=0.4)
    b = make(lease_seconds=0.4)
    assert await a.acquire("k0") is Grant.CREATE
    await asyncio.sleep(1.2)  # three leases: only renewal keeps the slot
    await b.acquire("other")  # sweeps lapsed leases
    snap = await b.snapshot()
    assert "k0" in snap["slots"] and snap["orphans"] == []


# --- orphans ----------------------------------------------------------------------------------

async def _orphan(make: Make, key: str, **kw: Any) -> RedisCoordinator:
    """A worker that took a slot for ``key`` and then died (stopped renewing)."""
    dead = make(lease_seconds=0.3, **kw)
    assert await dead.acquire(key) is Grant.CREATE
    await dead.aclose()  # stops renewing; its slot is not freed
    live = make(lease_seconds=0.3, **kw)
    for _ in range(100):
        await asyncio.sleep(0.05)
        await live.acquire(f"probe-{uuid.uuid4().hex}")
        if key in (await live.snapshot())["orphans"]:
            break
    return live


async def test_a_lapsed_lease_is_an_orphan_that_still_counts(make: Make) -> None:
    live = await _orphan(make, "k-dead", max_in_flight=1)
    snap = await live.snapshot()
    assert snap["orphans"] == ["k-dead"] and snap["slots"] == []
    assert await live.acquire("k-new") is Grant.WAIT  # the orphan holds the only slot
    assert await live.acquire("k-dead") is Grant.WAIT  # nobody re-creates it unresolved


async def test_orphan_found_finished_is_freed_and_journaled(make: Make) -> None:
    live = await _orphan(make, "k-dead", max_in_flight=1)
    seen: list[str] = []

    async def lookup(key: str) -> VoiceTask | None:
        seen.append(key)
        return task("t-dead", TaskStatus.SUCCEED, key)

    assert await live.resolve_orphans(lookup) == 1
    assert seen == ["k-dead"]
    assert (await live.known(["k-dead"]))["k-dead"] == JournalEntry("t-dead", "succeed")
    assert await live.acquire("k-dead") is Grant.FOLLOW
    assert await live.acquire("k-new") is Grant.CREATE


async def test_orphan_still_running_is_adopted_and_followed_to_its_end(make: Make) -> None:
    live = await _orphan(make, "k-dead", max_in_flight=1)

    async def lookup(key: str) -> VoiceTask | None:
        return task("t-dead", TaskStatus.PROCESSING, key)

    assert await live.resolve_orphans(lookup) == 1
    assert live.adopted == {"k-dead": "t-dead"} and live.in_flight == 1
    snap = await live.snapshot()
    assert snap["slots"] == ["k-dead"] and snap["owners"]["k-dead"] == live.worker_id
    assert await live.acquire("k-dead") is Grant.FOLLOW
    polled: list[set[str]] = []

    async def poll(ids: Collection[str]) -> Mapping[str, VoiceTask]:
        polled.append(set(ids))
        return {"t-dead": task("t-dead", TaskStatus.SUCCEED, "k-dead")}

    assert await live.observe([], poll, lookup) == {}  # adopted tasks are polled, not returned
    assert polled == [{"t-dead"}]
    assert live.adopted == {} and live.in_flight == 0
    snap = await live.snapshot()
    assert snap["slots"] == [] and snap["orphans"] == []
    assert (await live.known(["k-dead"]))["k-dead"].status == "succeed"


async def test_orphan_not_found_is_freed_only_after_the_grace_period(make: Make) -> None:
    live = await _orphan(make, "k-dead", max_in_flight=1, orphan_grace=0.8)

    async def not_found(key: str) -> VoiceTask | None:
        return None

    async def failing(key: str) -> VoiceTask | None:
        raise voiceapi.APIConnectionError("Kling unreachable")

    assert await live.resolve_orphans(not_found) == 0  # too young: the create may still land
    assert (await live.snapshot())["orphans"] == ["k-dead"]
    await asyncio.sleep(0.9)  # past the grace period (and the per-orphan claim, one lease)
    assert await live.resolve_orphans(failing) == 0  # a failed lookup is not "not found"
    assert (await live.snapshot())["orphans"] == ["k-dead"]
    await asyncio.sleep(0.4)  # the failed lookup's claim holds other lookups off one lease
    assert await live.resolve_orphans(not_found) == 1
    assert (await live.snapshot())["orphans"] == []
    assert await live.acquire("k-dead") is Grant.CREATE  # may now be created


async def test_a_worker_that_was_only_paused_takes_its_slot_back(make: Make) -> None:
    slow = make(lease_seconds=0.3)
    assert await slow.acquire("k") is Grant.CREATE
    for t in slow._tasks:  # freeze renewal, as a long stall would
        t.cancel()
    other = make(lease_seconds=0.3)
    for _ in range(100):
        await asyncio.sleep(0.05)
        await other.acquire(f"probe-{uuid.uuid4().hex}")
        if "k" in (await other.snapshot())["orphans"]:
            break
    await slow.accepted("k", "t-k", "submitted")  # its create landed after all
    snap = await other.snapshot()
    assert "k" in snap["slots"] and "k" not in snap["orphans"]


# --- the request rate and backoffs ----------------------------------------------------------

async def test_the_request_rate_is_shared_by_every_instance(make: Make) -> None:
    coords = [make(max_requests_per_second=40) for _ in range(3)]
    stamps: list[float] = []

    async def send(coord: RedisCoordinator) -> None:
        await coord.before_request(create=False)
        stamps.append(time.monotonic())

    started = time.monotonic()
    await asyncio.gather(*(send(coords[i % 3]) for i in range(41)))
    # 41 requests at 40/s account-wide need at least 1 s (each instance alone: 1/3 of that).
    assert stamps and max(stamps) - started >= 0.95
    stamps.sort()
    in_first_half_second = sum(1 for s in stamps if s - started < 0.5)
    assert in_first_half_second <= 21


async def test_a_shared_1303_backoff_holds_creates_but_not_reads(make: Make) -> None:
    # "Not held" is judged against a backoff of a minute (RETRY_AFTER_MAX): a request that is
    # not held passes well inside half of it, however loaded the machine; "held" is a wait
    # that cannot end early. (Bounds of 0.4 s against a 0.6 s backoff could be hit by load.)
    minute, within_half = 60.0, 30.0
    a, b = make(), make()
    await a.rate_limited(1303, minute)
    await asyncio.wait_for(b.before_request(create=False), within_half)
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(b.before_request(create=True), 0.3)
    # A short 1303 backoff is waited out, then the create goes (a fresh account).
    ns = f"t-{uuid.uuid4().hex[:12]}"
    c, d = make(namespace=ns), make(namespace=ns)
    await c.rate_limited(1303, 0.6)
    started = time.monotonic()
    await d.before_request(create=True)
    assert time.monotonic() - started >= 0.5
    await c.rate_limited(1302, 0.5)  # too fast: every request waits
    started = time.monotonic()
    await d.before_request(create=False)
    assert time.monotonic() - started >= 0.4
    ns = f"t-{uuid.uuid4().hex[:12]}"
    e, f = make(namespace=ns), make(namespace=ns)
    await e.rate_limited(1201, minute)  # not a rate limit: ignored, even with a Retry-After
    await asyncio.wait_for(f.before_request(create=True), within_half)


# --- one poller -------------------------------------------------------------------------------

async def test_one_leader_polls_for_everyone_and_hands_over_when_it_stops(make: Make) -> None:
    a, b = make(stale_after=0.5), make(stale_after=0.5)
    polls: dict[str, list[set[str]]] = {"a": [], "b": []}

    def poller(name: str) -> Callable[[Collection[str]], Any]:
        async def poll(ids: Collection[str]) -> Mapping[str, VoiceTask]:
            polls[name].append(set(ids))
            return {i: task(i, TaskStatus.PROCESSING) for i in ids}
        return poll

    assert set(await a.observe(["ta"], poller("a"), no_lookup)) == {"ta"}
    assert await b.observe(["tb"], no_poll, no_lookup) == {}  # not published yet
    assert set(await a.observe(["ta"], poller("a"), no_lookup)) == {"ta"}
    assert polls["a"][-1] == {"ta", "tb"}  # the leader polls for b too
    seen_b = await b.observe(["tb"], no_poll, no_lookup)
    assert set(seen_b) == {"tb"} and seen_b["tb"].task_status is TaskStatus.PROCESSING
    # a stops polling (its process hangs or its batch ended): b takes over once stale.
    await asyncio.sleep(0.7)
    assert set(await b.observe(["tb"], poller("b"), no_lookup)) == {"tb"}
    assert polls["b"] == [{"ta", "tb"}]
    # A clean exit hands the role over at once.
    await b.aclose()
    assert set(await a.observe(["ta"], poller("a"), no_lookup)) == {"ta"}


async def test_the_poller_frees_the_slots_of_tasks_it_saw_end_for_every_worker(
        make: Make) -> None:
    holder, poller = make(max_in_flight=2), make(max_in_flight=2)
    for key in ("k1", "k2"):
        assert await holder.acquire(key) is Grant.CREATE
        await holder.accepted(key, f"t-{key}", "submitted")
    assert await poller.acquire("k3") is Grant.WAIT  # the account is full

    async def poll(ids: Collection[str]) -> Mapping[str, VoiceTask]:
        # k1's task ended; a task of another id that claims k2's key must not free k2's slot.
        return {"t-k1": task("t-k1", TaskStatus.SUCCEED, "k1"),
                "t-other": task("t-other", TaskStatus.FAILED, "k2")}

    async def nothing(ids: Collection[str]) -> Mapping[str, VoiceTask]:
        return {}

    await poller.observe(["t-none"], nothing, no_lookup)  # poller: the leader
    await holder.observe(["t-k1", "t-k2"], no_poll, no_lookup)  # holder registers its ids
    await poller.observe([], poll, no_lookup)
    snap = await poller.snapshot()
    assert snap["slots"] == ["k2"]  # freed at the poll, before the holder read anything
    assert await poller.known(["k1"]) == {"k1": JournalEntry("t-k1", "succeed")}
    assert await poller.acquire("k3") is Grant.CREATE
    # The holder learns it later: its own finish is a no-op, renewing drops the key.
    await holder.finished("k1", "t-k1", "succeed")
    await holder.renew()
    assert holder.in_flight == 1
    assert sorted((await poller.snapshot())["slots"]) == ["k2", "k3"]


# --- Redis failures ---------------------------------------------------------------------------

async def test_scripts_are_reloaded_after_noscript(make: Make, server: RedisServer) -> None:
    a = make()
    assert await a.acquire("k0") is Grant.CREATE
    r = aioredis.Redis.from_url(server.url)
    await r.script_flush()
    assert await a.acquire("k1") is Grant.CREATE  # NOSCRIPT → loaded again, no error
    await a.release("k0")
    await a.release("k1")
    assert (await a.snapshot())["slots"] == []
    await r.aclose()


async def test_redis_killed_mid_run_fails_clearly() -> None:
    with running_redis() as srv:
        url = srv.url.replace("redis://", "redis://:pw-secret@")
        r = aioredis.Redis.from_url(srv.url)
        await r.config_set("requirepass", "pw-secret")
        await r.aclose()
        coord = RedisCoordinator(url, namespace="outage", lease_seconds=0.3)
        async with coord:
            assert await coord.acquire("k0") is Grant.CREATE
            srv.stop()
            started = time.monotonic()
            with pytest.raises(CoordinationError, match="unreachable") as info:
                await coord.acquire("k1")
            assert time.monotonic() - started < 15
            assert "pw-secret" not in str(info.value)
            assert isinstance(info.value, voiceapi.VoiceAPIError)
            await asyncio.sleep(0.3)  # the renewal loop meets the outage too, quietly
            # A fresh server (no scripts, no state) works again without a restart of ours.
            srv.restart()
            r = aioredis.Redis.from_url(srv.url)
            await r.config_set("requirepass", "pw-secret")
            await r.aclose()
            assert await coord.acquire("k2") is Grant.CREATE
            srv.stop()
        # closing with Redis gone does not raise
    with pytest.raises(CoordinationError, match="closed"):
        await coord.acquire("k3")


async def test_redis_down_at_start_fails_at_enter() -> None:
    with running_redis() as srv:
        url = srv.url
        srv.stop()
        with pytest.raises(CoordinationError, match="unreachable"):
            async with RedisCoordinator(url, namespace="x"):
                pass


# --- README ---------------------------------------------------------------------------------

def test_readme_scaling_out_examples_compile_and_import() -> None:
    import ast
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    body = readme.split("## Scaling out", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", body, flags=re.S)
    assert len(blocks) == 2
    for block in blocks:
        code = compile(block, "README.md", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        namespace: dict[str, Any] = {}
        exec(code, namespace)  # defines the functions; running them needs a Kling account
        assert namespace["RedisCoordinator"] is RedisCoordinator
    assert "VOICEAPI_REQUIRE_REDIS=1" in body and "CoordinationError" in body


async def test_a_cancelled_acquire_never_leaks_a_slot(make: Make) -> None:
    coord = make(max_in_flight=1)
    await coord.renew()  # connected and started: cancels land on the script call itself
    outcomes: set[object] = set()
    for turns in range(120):  # cancel at every point from "not sent" to "answer read"
        job = asyncio.create_task(coord.acquire(f"k{turns}"))
        for _ in range(turns):
            await asyncio.sleep(0)
        job.cancel()
        try:
            outcomes.add(await job)
            await coord.release(f"k{turns}")
        except asyncio.CancelledError:
            outcomes.add("cancelled")
        for _ in range(100):  # the give-back runs in the background; bounded wait for it
            if not coord._chores:
                break
            await asyncio.sleep(0.01)
        snap = await coord.snapshot()
        assert snap["slots"] == [], (turns, snap)
    assert "cancelled" in outcomes
    assert await coord.acquire("last") is Grant.CREATE  # the only slot is still free


async def test_a_cancel_that_redis_py_swallows_is_given_back(make: Make) -> None:
    """redis-py awaits asyncio.wait_for, which on Python 3.11 returns a ready result and drops
    a cancel that came meanwhile; a cancelled batch must still stop."""
    coord = make(max_in_flight=1)
    await coord.renew()
    real = coord._scripts["ACQUIRE"]

    async def swallowing(**kw: Any) -> Any:
        answer = await real(**kw)
        me = asyncio.current_task()
        assert me is not None
        me.cancel()  # the cancel arrives as the answer is ready...
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0)  # ...and is dropped, as wait_for does
        return answer

    coord._scripts["ACQUIRE"] = swallowing  # type: ignore[assignment]
    job = asyncio.create_task(coord.acquire("k"))
    with pytest.raises(asyncio.CancelledError):
        await job
    coord._scripts["ACQUIRE"] = real
    for _ in range(100):  # the slot granted just before the cancel is given back
        if not coord._chores:
            break
        await asyncio.sleep(0.01)
    assert (await coord.snapshot())["slots"] == []


async def test_adopt_counts_a_running_task_found_on_a_rerun(make: Make) -> None:
    a, b = make(max_in_flight=1), make(max_in_flight=1)
    await a.adopt("k-old", "t-old", "processing")  # a rerun re-attaches to a running task
    assert a.in_flight == 1
    assert (await b.known(["k-old"]))["k-old"] == JournalEntry("t-old", "processing")
    assert await b.acquire("k-new") is Grant.WAIT  # it holds the account's only slot
    await b.adopt("k-old", "t-old", "processing")  # already held by a live worker: journal only
    assert b.in_flight == 0
    await b.finished("k-old", "t-old", "succeed")  # whoever sees it end frees it
    assert await b.acquire("k-new") is Grant.CREATE
    await a.renew()
    assert a.in_flight == 0  # a learns at its next renewal that the slot is gone


async def test_many_orphans_are_looked_up_a_few_at_a_time(make: Make) -> None:
    dead = make(lease_seconds=0.3, max_in_flight=30)
    keys = [f"k{i}" for i in range(20)]
    for key in keys:
        assert await dead.acquire(key) is Grant.CREATE
    await dead.aclose()
    live = make(lease_seconds=0.3, max_in_flight=30)
    for _ in range(100):
        await asyncio.sleep(0.05)
        await live.renew()  # sweeps lapsed leases
        if len((await live.snapshot())["orphans"]) == 20:
            break
    running = 0
    peak = 0

    async def lookup(key: str) -> VoiceTask | None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)
        running -= 1
        return task(f"t-{key}", TaskStatus.SUCCEED, key)

    assert await live.resolve_orphans(lookup) == 20
    assert 1 < peak <= 8
    assert (await live.snapshot())["orphans"] == []
    assert set(await live.known(keys)) == set(keys)


# --- plain client calls through AsyncVoiceClient(coordinator=...) ---------------------------

async def test_clients_share_the_rate_and_a_1303_backoff_through_the_coordinator(
        server: RedisServer, ns: str) -> None:
    from voiceapi.testing import KlingEmulator

    async with KlingEmulator(concurrency=1, task_seconds=30) as emu:
        async with RedisCoordinator(server.url, namespace=ns, max_requests_per_second=20) as ca, \
                RedisCoordinator(server.url, namespace=ns, max_requests_per_second=20) as cb:
            def client(coord: RedisCoordinator) -> voiceapi.AsyncVoiceClient:
                return voiceapi.AsyncVoiceClient(emu.access_key, emu.secret_key,
                                                 base_url=emu.base_url, max_retries=0,
                                                 coordinator=coord)

            async with client(ca) as a, client(cb) as b:
                started = time.monotonic()
                await asyncio.gather(*(c.custom_voices.list() for c in (a, b) * 10))
                # 20 reads at 20/s account-wide: about a second (each alone: half that).
                assert time.monotonic() - started >= 0.9
                url = emu.sample_url(10)
                await a.custom_voices.create(voice_name="v1", voice_url=url)
                with pytest.raises(voiceapi.RateLimitError) as info:
                    await a.custom_voices.create(voice_name="v2", voice_url=url)
                assert info.value.code == 1303  # the account is full: shared with b
                started = time.monotonic()
                with pytest.raises(voiceapi.RateLimitError):
                    await b.custom_voices.create(voice_name="v3", voice_url=url)
                assert time.monotonic() - started >= 0.9  # b's create waited out the backoff
                # Reads are not held back by a 1303. Judged against a minute's Retry-After (the
                # former "a read within 0.5 s of a ~1 s backoff" could be hit by load): the
                # read passes within half of it, while b's creates are held by it.
                emu.inject("create", 1303, retry_after=60, times=1)
                with pytest.raises(voiceapi.RateLimitError):
                    await a.custom_voices.create(voice_name="v4", voice_url=url)
                await asyncio.wait_for(b.custom_voices.list(), 30)
                with pytest.raises(asyncio.TimeoutError):
                    await asyncio.wait_for(
                        b.custom_voices.create(voice_name="v5", voice_url=url), 1.5)
    assert emu.count("create", code=1303) == 3


async def test_a_1303_while_slots_are_held_is_left_to_the_slots(make: Make) -> None:
    a, b = make(), make()
    assert await a.acquire("k0") is Grant.CREATE  # a batch task holds a slot
    # A minute's Retry-After: were it applied, the create below would wait it out, far past
    # the half minute it gets (a 0.4 s bound against a 0.8 s backoff could be hit by load).
    await b.rate_limited(1303, 60)  # the same refusal the batch learns from in refused()
    # No blanket pause: a slot frees when k0 ends.
    await asyncio.wait_for(b.before_request(create=True), 30)
    await a.release("k0")
    started = time.monotonic()
    await b.rate_limited(1303, 0.6)  # nothing held: the only remedy is to wait
    await b.before_request(create=True)
    assert time.monotonic() - started >= 0.5


async def test_held_names_the_keys_whose_create_may_not_be_journaled_yet(make: Make) -> None:
    """A slot held by any worker, or an orphan, may hide a create that has landed at Kling
    without its ``accepted`` yet; a freed key (or one never asked) does not."""
    first, second = make(), make()
    assert await first.acquire("k-held") is Grant.CREATE
    assert await first.acquire("k-done") is Grant.CREATE
    await first.finished("k-done", "t-done", "succeed")
    assert await first.acquire("k-gone") is Grant.CREATE
    await first.release("k-gone")
    keys = ["k-held", "k-done", "k-gone", "k-never"]
    assert await second.held(keys) == {"k-held"}  # another worker's slot counts
    assert await first.held(keys) == {"k-held"}
    await first.accepted("k-held", "t-held", "submitted")
    assert await second.held(keys) == {"k-held"}  # journaled now, and still running
    live = await _orphan(make, "k-orphan", max_in_flight=5)
    assert await live.held(["k-orphan", "k-never"]) == {"k-orphan"}
    many = [f"k{i}" for i in range(2500)]  # more than one command's worth of keys
    assert await second.held([*many, "k-held"]) == {"k-held"}
