"""Real worker processes sharing one account through Redis, against the emulator in its own
process (harness: benchmarks/scaleout.py)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from benchmarks.scaleout import (
    answers,
    emulator_process,
    fetch_stats,
    start_worker,
    task_span,
    worker_result,
)

from ._redis_server import RedisServer, running_redis

# Real worker processes for tens of seconds each: CI runs them (VOICEAPI_SLOW_TESTS=1).
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with running_redis() as srv:
        yield srv


def _config(emu: dict[str, str], server: RedisServer, items: list[int], **kw: Any
            ) -> dict[str, Any]:
    return {"base_url": emu["base_url"], "access_key": emu["access_key"],
            "secret_key": emu["secret_key"], "redis_url": server.url,
            "namespace": f"mp-{uuid.uuid4().hex[:8]}", "prefix": uuid.uuid4().hex[:8],
            "sample_url": "https://example.com/sample-10s.wav", "item_ids": items, **kw}


async def _leftovers(url: str, namespace: str) -> dict[str, int]:
    r = aioredis.Redis.from_url(url)
    prefix = f"{{voiceapi:{namespace}}}"
    out = {"slots": await r.zcard(f"{prefix}:slots"),
           "orphans": await r.zcard(f"{prefix}:orphans")}
    await r.aclose()
    return out


def test_three_processes_share_the_same_items_and_learn_the_cap_once(
        server: RedisServer) -> None:
    task_s, cap, n = 0.5, 5, 300
    with emulator_process(concurrency=cap, task_seconds=task_s) as emu:
        cfg = _config(emu, server, list(range(n)), poll=0.05, timeout=150)
        procs = [start_worker(cfg) for _ in range(3)]
        results = [worker_result(p, timeout=200) for p in procs]
        stats = asyncio.run(fetch_stats(emu["stats_url"]))
        span = asyncio.run(task_span(emu))
    assert [r["ok"] for r in results] == [n, n, n]  # every process: a full, correct result
    assert results[0]["tasks"] == results[1]["tasks"] == results[2]["tasks"]
    assert stats["tasks_per_external_id"] == {"1": n}  # every external id: exactly one task
    assert stats["peak_in_progress"] <= cap
    utilisation = n * task_s / cap / span
    figures = {"1303": answers(stats, 1303), "requests_per_voice": stats["requests"] / n,
               "utilisation": utilisation}
    assert figures["1303"] <= 15, figures
    assert figures["requests_per_voice"] <= 3.5, figures
    # With the real create_many in every worker: measured 0.896-0.897 on a loaded 2-core
    # machine (0.5 s tasks, 40-50 ms polls; 2.75-2.9 requests per voice). A slot turns over in
    # about one poll plus a create (~55 ms of every 0.5 s task); the 0.9 is a speed
    # figure tracked by `python -m benchmarks.scaleout`. The margin still catches what matters:
    # workers that serialise or fight over the cap (separate processes: ~0.6). In CI this test
    # shares two cores with three other xdist workers: 0.78 was seen there, hence the floor.
    assert utilisation >= 0.7, figures
    assert asyncio.run(_leftovers(server.url, cfg["namespace"])) == {"slots": 0, "orphans": 0}


def test_three_processes_with_distinct_items_and_a_fixed_cap_never_see_1303(
        server: RedisServer) -> None:
    with emulator_process(concurrency=5, task_seconds=0.2) as emu:
        base = _config(emu, server, [], max_in_flight=5, poll=0.05, timeout=100)
        procs = [start_worker({**base, "item_ids": list(range(i * 100, (i + 1) * 100))})
                 for i in range(3)]
        results = [worker_result(p, timeout=150) for p in procs]
        stats = asyncio.run(fetch_stats(emu["stats_url"]))
    assert [r["ok"] for r in results] == [100, 100, 100]
    assert stats["tasks_per_external_id"] == {"1": 300}
    assert answers(stats, 1303) == 0
    assert stats["peak_in_progress"] <= 5


def test_a_worker_killed_mid_batch_is_taken_over_by_the_survivors(
        server: RedisServer) -> None:
    # Tasks long enough that the victim's are still running when its leases lapse, even on a
    # loaded machine (they would otherwise end first and be freed, not adopted).
    n = 20
    with emulator_process(concurrency=5, task_seconds=4.0) as emu:
        cfg = _config(emu, server, list(range(n)), max_in_flight=5, lease_seconds=0.6,
                      orphan_grace=1.0, stale_after=1.0, poll=0.1, timeout=100)
        victim = start_worker(cfg)
        # The victim alone first, so it holds running tasks when it dies.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if asyncio.run(fetch_stats(emu["stats_url"]))["task_count"] >= 4:
                break
            time.sleep(0.05)
        survivors = [start_worker(cfg) for _ in range(2)]
        time.sleep(0.3)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=10)
        assert victim.stdout is not None
        victim.stdout.close()
        results = [worker_result(p, timeout=150) for p in survivors]
        stats = asyncio.run(fetch_stats(emu["stats_url"]))
    assert [r["ok"] for r in results] == [n, n]
    assert stats["tasks_per_external_id"] == {"1": n}  # nothing created twice
    assert stats["peak_in_progress"] <= 5
    assert sum(r["adoptions"] for r in results) >= 1  # the victim's running tasks adopted
    assert all(r["adopted_left"] == 0 for r in results)
    assert asyncio.run(_leftovers(server.url, cfg["namespace"])) == {"slots": 0, "orphans": 0}


def test_the_request_rate_is_shared_across_processes(server: RedisServer) -> None:
    qps = 10
    with emulator_process(concurrency=50, task_seconds=0.5, qps=qps) as emu:
        base = _config(emu, server, [], max_requests_per_second=qps * 0.8, max_in_flight=50,
                       poll=0.2, timeout=100, max_retries=0)
        procs = [start_worker({**base, "item_ids": list(range(i * 12, (i + 1) * 12))})
                 for i in range(3)]
        results = [worker_result(p, timeout=150) for p in procs]
        stats = asyncio.run(fetch_stats(emu["stats_url"]))
    assert [r["ok"] for r in results] == [12, 12, 12]
    assert answers(stats, 1302) == 0
    assert stats["requests"] >= 36  # the rate was actually exercised
