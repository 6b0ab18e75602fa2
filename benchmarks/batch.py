"""Batch economy: ``create_many`` against what a competent user writes without it.

Every run gets a fresh emulator process (a fresh account whose real cap is ``cap``). Figures:
slot utilisation = ideal wall (items × task time / cap) ÷ actual wall; requests per voice
(every attempt the client sent, counted by a middleware) and 1303 answers per voice.

The fair baseline ("naive"): an ``asyncio.Semaphore`` at the real cap, ``create()``, retry a
1303 after one poll interval, then poll that task with ``get()`` at a fixed interval — once per
task time T (like 1 s polls on 1 s tasks) and at T/8.

Tasks take T = 0.2 s here (real ones take seconds), so every poll interval is given in task
times: ``create_many`` gets ``poll_interval=T/8``, what it picks by itself on real tasks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import voiceapi
from voiceapi._constants import DEFAULT_MAX_RETRIES

from ._emulator import Emulator, emulator

FINAL = (voiceapi.TaskStatus.SUCCEED, voiceapi.TaskStatus.FAILED)


class Counter:
    """Counts every attempt the client sends, and the 1303 answers among them."""

    def __init__(self) -> None:
        self.requests = 0
        self.refused_1303 = 0
        self.list_polls = 0

    async def __call__(self, request: voiceapi.Request,
                       call_next: voiceapi.Handler) -> voiceapi.Response:
        self.requests += 1
        if request.method == "GET" and request.path.rstrip("/").endswith("/custom-voices"):
            self.list_polls += 1
        try:
            return await call_next(request)
        except voiceapi.APIError as exc:
            if exc.code == 1303:
                self.refused_1303 += 1
            raise


def items_for(n: int, tag: str) -> list[dict[str, Any]]:
    return [{"voice_name": f"{tag}{i}", "voice_url": f"https://x/{tag}-{i}-10s.wav"}
            for i in range(n)]


Runner = Callable[[voiceapi.AsyncVoiceClient, list[dict[str, Any]]], Awaitable[int]]


def sdk_runner(max_in_flight: int | None, poll_interval: float) -> Runner:
    async def run(client: voiceapi.AsyncVoiceClient, items: list[dict[str, Any]]) -> int:
        results = await client.custom_voices.create_many(items, max_in_flight=max_in_flight,
                                                         poll_interval=poll_interval)
        return sum(r.ok for r in results)
    return run


def naive_runner(cap: int, poll: float) -> Runner:
    async def run(client: voiceapi.AsyncVoiceClient, items: list[dict[str, Any]]) -> int:
        slots = asyncio.Semaphore(cap)

        async def one(item: dict[str, Any]) -> bool:
            async with slots:
                while True:
                    try:
                        task = await client.custom_voices.create(**item)
                        break
                    except voiceapi.RateLimitError:
                        await asyncio.sleep(poll)
                while task.task_status not in FINAL:
                    await asyncio.sleep(poll)
                    task = await client.custom_voices.get(task.task_id)
                return task.task_status is voiceapi.TaskStatus.SUCCEED

        return sum(await asyncio.gather(*(one(i) for i in items)))
    return run


async def _measure(emu: Emulator, items: int, run: Runner, *, sdk_retries: bool) -> dict[str, Any]:
    counter = Counter()
    # The naive user handles 1303 itself (the SDK's own 1303 delay is on Kling's time scale).
    async with voiceapi.AsyncVoiceClient(
            api_key=emu.api_key, base_url=emu.base_url, middlewares=[counter],
            max_retries=DEFAULT_MAX_RETRIES if sdk_retries else 0) as client:
        start = time.perf_counter()
        ok = await run(client, items_for(items, f"b{time.time_ns() % 10**6}-"))
        wall = time.perf_counter() - start
    stats = emu.stats()
    return {"wall": wall, "requests": counter.requests, "refused_1303": counter.refused_1303,
            "list_polls": counter.list_polls, "ok": ok,
            "peak_in_progress": None if stats is None else stats["peak_in_progress"]}


def variants(cap: int, task_s: float) -> dict[str, tuple[Runner, bool]]:
    return {
        # The SDK polls at T/8 of the tasks it sees, but never below a floor set for real
        # task times (seconds); on this compressed time scale the floor would be many task
        # times, so the benchmark passes what the SDK picks on real tasks: T/8.
        "create_many": (sdk_runner(None, task_s / 8), True),
        "naive_poll_T": (naive_runner(cap, task_s), False),
        "naive_poll_T/8": (naive_runner(cap, task_s / 8), False),
        "create_many_fixed_2x": (sdk_runner(2 * cap, task_s / 8), True),
    }


def bench_batch(items: int, cap: int, task_s: float, reps: int,
                log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Each variant ``reps`` times, the order rotated per repetition, a fresh account each."""
    ideal = items * task_s / cap
    todo = variants(cap, task_s)
    names = list(todo)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for rep in range(reps):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            log(f"batch {name} ({rep + 1}/{reps})")
            run, sdk_retries = todo[name]
            with emulator(cap, task_s) as emu:
                runs[name].append(asyncio.run(_measure(emu, items, run,
                                                       sdk_retries=sdk_retries)))
    out: dict[str, Any] = {"items": items, "cap": cap, "task_seconds": task_s,
                           "ideal_wall": ideal, "reps": reps}
    for name, results in runs.items():
        out[name] = {"wall": [r["wall"] for r in results],
                     "utilisation": [ideal / r["wall"] for r in results],
                     "requests_per_voice": [r["requests"] / items for r in results],
                     "refused_1303_per_voice": [r["refused_1303"] / items for r in results],
                     "list_polls_per_second": [r["list_polls"] / r["wall"] for r in results],
                     "peak_in_progress": [r["peak_in_progress"] for r in results],
                     "ok": min(r["ok"] for r in results)}
    return out
