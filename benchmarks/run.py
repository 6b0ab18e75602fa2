"""Benchmarks: every headline figure is a ratio against a baseline measured in the same run.

    python -m benchmarks            # full set, about 2.5 minutes on 2 cores
    python -m benchmarks --quick    # reduced set, under 30 s
    python -m benchmarks --json out.json --markdown benchmarks/RESULTS.md

The emulator runs in a separate process (``voiceapi mock-server``) so its CPU is not billed to
the client being measured; everything talks over loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import aiohttp

import voiceapi

API_KEY = "bench-api-key"


@contextlib.contextmanager
def emulator(concurrency: int, task_seconds: float) -> Iterator[str]:
    """Start ``voiceapi mock-server`` in its own process; yields its base URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "voiceapi", "mock-server", "--port", "0", "--concurrency",
         str(concurrency), "--task-seconds", str(task_seconds), "--api-key", API_KEY],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line.startswith("Kling emulator on "):
            raise RuntimeError(f"emulator did not start: {line!r}")
        yield line.split()[3]
    finally:
        proc.terminate()
        proc.wait(10)


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


class Counter:
    """A middleware counting requests actually sent (every attempt)."""

    def __init__(self) -> None:
        self.n = 0

    async def __call__(self, request: voiceapi.Request,
                       call_next: voiceapi.Handler) -> voiceapi.Response:
        self.n += 1
        return await call_next(request)


# --- 1. SDK overhead vs raw aiohttp -------------------------------------------------------------

async def _cpu_of(calls: int, concurrency: int, one: Callable[[], Awaitable[Any]]) -> float:
    """Client-process CPU seconds per call."""
    left = calls

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await one()

    start = time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (time.process_time() - start) / calls


async def bench_overhead(base: str, calls: int, concurrency: int, reps: int) -> dict[str, Any]:
    async with voiceapi.AsyncVoiceClient(api_key=API_KEY, base_url=base) as client:
        task = await client.custom_voices.create(voice_name="bench",
                                                 voice_url="https://x/bench-10s.wav")
        url = f"{base}/v1/general/custom-voices/{task.task_id}"
        headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
        async with aiohttp.ClientSession() as session:
            async def raw() -> Any:
                async with session.get(url, headers=headers) as resp:
                    body = await resp.json()
                if body["code"] != 0:
                    raise RuntimeError(body)
                return body["data"]

            async def sdk() -> Any:
                return await client.custom_voices.get(task.task_id)

            await _cpu_of(200, concurrency, raw)
            await _cpu_of(200, concurrency, sdk)
            ratios, raws, sdks = [], [], []
            for _ in range(reps):
                r = await _cpu_of(calls, concurrency, raw)
                s = await _cpu_of(calls, concurrency, sdk)
                raws.append(r * 1e6)
                sdks.append(s * 1e6)
                ratios.append(s / r)
    return {"ratio": spread(ratios), "sdk_us": spread(sdks), "raw_us": spread(raws)}


# --- 2. sync facade vs async --------------------------------------------------------------------

def bench_sync(base: str, calls: int, reps: int) -> dict[str, Any]:
    async def async_run(n: int) -> float:
        async with voiceapi.AsyncVoiceClient(api_key=API_KEY, base_url=base) as client:
            await client.preset_voices.list(page_size=1)
            start = time.perf_counter()
            for _ in range(n):
                await client.preset_voices.list(page_size=1)
            return (time.perf_counter() - start) / n

    def sync_run(n: int) -> float:
        with voiceapi.VoiceClient(api_key=API_KEY, base_url=base) as client:
            client.preset_voices.list(page_size=1)
            start = time.perf_counter()
            for _ in range(n):
                client.preset_voices.list(page_size=1)
            return (time.perf_counter() - start) / n

    ratios, a_us, s_us = [], [], []
    for _ in range(reps):
        a = asyncio.run(async_run(calls))
        s = sync_run(calls)
        ratios.append(s / a)
        a_us.append(a * 1e6)
        s_us.append(s * 1e6)
    return {"ratio": spread(ratios), "sync_us": spread(s_us), "async_us": spread(a_us),
            "thread_roundtrip_us": thread_roundtrip_us(calls)}


def thread_roundtrip_us(n: int) -> float:
    """The floor of any thread hop on this machine: two threads passing a lock back and forth
    (two wake-ups, like a sync call's request and answer)."""
    ping, pong = threading.Lock(), threading.Lock()
    ping.acquire()
    pong.acquire()

    def other() -> None:
        for _ in range(n):
            ping.acquire()
            pong.release()

    thread = threading.Thread(target=other)
    thread.start()
    start = time.perf_counter()
    for _ in range(n):
        ping.release()
        pong.acquire()
    elapsed = time.perf_counter() - start
    thread.join()
    return elapsed / n * 1e6


# --- 3 + 4. batch throughput and request economy -------------------------------------------------

def _items(n: int, tag: str) -> list[dict[str, Any]]:
    return [{"voice_name": f"{tag}{i}", "voice_url": f"https://x/{tag}-{i}-10s.wav"}
            for i in range(n)]


async def _batch_sdk(base: str, items: int, task_s: float) -> tuple[float, int, int]:
    counter = Counter()
    async with voiceapi.AsyncVoiceClient(api_key=API_KEY, base_url=base,
                                         middlewares=[counter]) as client:
        start = time.perf_counter()
        tag = f"s{time.time_ns() % 100000}-"
        results = await client.custom_voices.create_many(_items(items, tag))
        wall = time.perf_counter() - start
    return wall, counter.n, sum(r.ok for r in results)


async def _batch_naive(base: str, items: int, task_s: float) -> tuple[float, int, int]:
    """What most code does: gather every create (SDK retries on 1303) and wait per task."""
    counter = Counter()
    # The same time scale as real Kling (1 s first delay and 1 s polls for ~10 s tasks).
    policy = voiceapi.RetryPolicy(initial_delay=task_s / 20, max_delay=task_s * 2,
                                  rate_limit_min_delay=task_s / 10)
    async with voiceapi.AsyncVoiceClient(api_key=API_KEY, base_url=base, max_retries=10_000,
                                         retry_budget=3600, retry_policy=policy,
                                         middlewares=[counter]) as client:
        async def one(item: dict[str, Any]) -> bool:
            task = await client.custom_voices.create(**item)
            done = await client.custom_voices.wait(task, timeout=3600,
                                                   poll_interval=task_s / 10)
            return done.voice_id is not None

        start = time.perf_counter()
        ok = await asyncio.gather(*(one(i) for i in _items(items, f"n{time.time_ns() % 100000}-")))
        wall = time.perf_counter() - start
    return wall, counter.n, sum(ok)


def bench_batch(items: int, cap: int, task_s: float, reps: int) -> dict[str, Any]:
    """Both strategies, alternately, each against a fresh emulator (a fresh account)."""
    ideal = items * task_s / cap
    out: dict[str, Any] = {"items": items, "cap": cap, "task_seconds": task_s,
                           "ideal_wall": ideal}
    runs: dict[str, list[tuple[float, int, int]]] = {"create_many": [], "naive_gather": []}
    for _ in range(reps):
        for name, fn in (("create_many", _batch_sdk), ("naive_gather", _batch_naive)):
            with emulator(cap, task_s) as base:
                runs[name].append(asyncio.run(fn(base, items, task_s)))
    for name, results in runs.items():
        out[name] = {"wall": spread([w for w, _, _ in results]),
                     "utilisation": spread([ideal / w for w, _, _ in results]),
                     "requests_per_voice": spread([r / items for _, r, _ in results]),
                     "ok": min(ok for _, _, ok in results)}
    return out


# --- 5. memory ------------------------------------------------------------------------------------

def bench_memory(items: int) -> dict[str, Any]:
    with emulator(items + 10, 3600) as base:
        out = subprocess.run([sys.executable, "-m", "benchmarks.memory", base, API_KEY,
                              str(items)], capture_output=True, text=True, timeout=600,
                             check=True)
    result: dict[str, Any] = json.loads(out.stdout)
    return result


# --- 6. import time -------------------------------------------------------------------------------

def bench_import(reps: int) -> dict[str, Any]:
    def once(module: str) -> float:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", f"import {module}"], check=True)
        return time.perf_counter() - start

    once("voiceapi")
    once("aiohttp")
    ours, theirs = [], []
    for _ in range(reps):
        theirs.append(once("aiohttp"))
        ours.append(once("voiceapi"))
    ratios = [o / t for o, t in zip(ours, theirs, strict=True)]
    return {"ratio": spread(ratios), "voiceapi_ms": spread([o * 1000 for o in ours]),
            "aiohttp_ms": spread([t * 1000 for t in theirs])}


# --- report ---------------------------------------------------------------------------------------

def _fmt(s: dict[str, float], unit: str = "", digits: int = 2) -> str:
    return (f"{s['median']:.{digits}f}{unit} ({s['min']:.{digits}f}–{s['max']:.{digits}f})")


def table(r: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    rows: list[tuple[str, str, str, str]] = []
    for c, res in r["overhead"].items():
        rows.append((f"SDK CPU per get() vs raw aiohttp, concurrency {c}",
                     _fmt(res["ratio"], "×"), "≤ 1.25×",
                     f"{res['sdk_us']['median']:.0f} µs vs {res['raw_us']['median']:.0f} µs"))
    s = r["sync"]
    rows.append(("VoiceClient vs AsyncVoiceClient, wall per call", _fmt(s["ratio"], "×"),
                 "≤ 1.3×", f"{s['sync_us']['median']:.0f} µs vs {s['async_us']['median']:.0f} µs; "
                 f"bare thread round trip here: {s['thread_roundtrip_us']:.0f} µs"))
    b = r["batch"]
    cm, nv = b["create_many"], b["naive_gather"]
    rows.append((f"Batch slot utilisation, {b['items']} items, cap {b['cap']}",
                 _fmt(cm["utilisation"]), "≥ 0.9",
                 f"naive gather: {nv['utilisation']['median']:.2f}; wall "
                 f"{cm['wall']['median']:.1f}s vs ideal {b['ideal_wall']:.1f}s vs naive "
                 f"{nv['wall']['median']:.1f}s"))
    rows.append(("Requests per created voice", _fmt(cm["requests_per_voice"]), "≤ 3",
                 f"naive one-poll-per-task: {nv['requests_per_voice']['median']:.2f}"))
    m = r["memory"]
    rows.append((f"Peak RSS growth tracking {m['tasks']:,} tasks", f"{m['growth_mb']:.1f} MB",
                 "≤ 50 MB", f"{m['bytes_per_task']:.0f} bytes per task"))
    i = r["import"]
    rows.append(("import voiceapi vs import aiohttp", _fmt(i["ratio"], "×"), "≤ 1.3×",
                 f"{i['voiceapi_ms']['median']:.0f} ms vs {i['aiohttp_ms']['median']:.0f} ms"))
    return rows


def render(rows: list[tuple[str, str, str, str]]) -> str:
    head = ("benchmark", "measured (median, min–max)", "target", "detail")
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def machine() -> str:
    return (f"{platform.python_implementation()} {platform.python_version()}, "
            f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPU(s), "
            f"voiceapi {voiceapi.__version__}, aiohttp {aiohttp.__version__}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced set, under 30 s")
    parser.add_argument("--json", dest="json_path", help="write the raw results here")
    parser.add_argument("--markdown", help="write the table (with machine info) here")
    args = parser.parse_args(argv)
    q = args.quick
    started = time.perf_counter()
    results: dict[str, Any] = {"machine": machine(), "quick": q, "overhead": {}}
    with emulator(1000, 3600) as base:
        for c in (1, 50):
            print(f"overhead at concurrency {c}…", file=sys.stderr)
            results["overhead"][str(c)] = asyncio.run(
                bench_overhead(base, 600 if q else 5000, c, 1 if q else 3))
        print("sync facade…", file=sys.stderr)
        results["sync"] = bench_sync(base, 300 if q else 2000, 1 if q else 3)
    print("batch…", file=sys.stderr)
    results["batch"] = bench_batch(100 if q else 500, 5, 0.1 if q else 0.2, 1 if q else 3)
    print("memory…", file=sys.stderr)
    results["memory"] = bench_memory(2000 if q else 10_000)
    print("import time…", file=sys.stderr)
    results["import"] = bench_import(3 if q else 10)
    results["seconds"] = time.perf_counter() - started
    text = render(table(results))
    print(f"\n{machine()}; {'quick' if q else 'full'} run in {results['seconds']:.0f}s\n")
    print(text)
    if args.json_path:
        with open(args.json_path, "w") as fh:
            json.dump(results, fh, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(f"# Benchmark results\n\nMachine: {machine()}.\n"
                     f"Command: `python -m benchmarks{' --quick' if q else ''}` "
                     f"({results['seconds']:.0f} s).\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
