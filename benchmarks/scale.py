"""Batch scaling and memory: CPU and RSS per item of ``create_many`` at 1k, 10k and 100k items.

Each measurement is its own child process (``python -m benchmarks.scale``) so its RSS is the
batch's alone and a run that does not finish in its budget can be stopped by PID. The parent
samples the child's resident set from ``/proc/<pid>/statm`` every 50 ms (nothing is billed to
the child); the child reports its CPU seconds over the ``create_many`` call alone and its
resident set just before it (after the caller's items list is built and the client warmed up).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import voiceapi

from ._emulator import Emulator

ROOT = Path(__file__).resolve().parents[1]
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes(pid: int | str = "self") -> int | None:
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * PAGE
    except (OSError, ValueError, IndexError):
        return None


async def child(emu: Emulator, n: int, wait: bool, max_in_flight: int) -> dict[str, Any]:
    items = [{"voice_name": f"s{i}", "voice_url": f"https://x/s-{i}-10s.wav"}
             for i in range(n)]  # the caller's data, not the SDK's cost: built before
    reports = 0

    def progress(p: voiceapi.BatchProgress) -> None:
        nonlocal reports
        reports += 1

    async with voiceapi.AsyncVoiceClient(api_key=emu.api_key, base_url=emu.base_url) as client:
        await client.custom_voices.list(page_size=1)  # warm session, parsers, converter
        before = rss_bytes()
        cpu, wall = time.process_time(), time.perf_counter()
        results = await client.custom_voices.create_many(
            items, max_in_flight=max_in_flight, wait=wait, on_progress=progress)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return {"items": n, "wait": wait, "cpu_s": cpu, "wall_s": wall, "rss_before": before,
            "submitted": sum(r.task is not None for r in results),
            "ok": sum(r.ok for r in results), "progress_reports": reports}


def measure(emu: Emulator, n: int, *, wait: bool, max_in_flight: int,
            budget: float) -> dict[str, Any]:
    """One child run; ``finished: False`` (with the time spent) when it overran ``budget``."""
    info = json.dumps({"base_url": emu.base_url, "access_key": emu.access_key,
                       "secret_key": emu.secret_key, "api_key": emu.api_key})
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.scale", info, str(n), "1" if wait else "0",
         str(max_in_flight)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=ROOT)
    start = time.monotonic()
    peak = 0
    while proc.poll() is None and time.monotonic() - start < budget:
        peak = max(peak, rss_bytes(proc.pid) or 0)
        time.sleep(0.05)
    if proc.poll() is None:
        proc.kill()
        proc.communicate()
        return {"items": n, "wait": wait, "finished": False, "budget_s": budget}
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"scale child failed: {err[-2000:]}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    before = result["rss_before"] or 0
    result.update(finished=True, rss_peak=peak, cpu_per_item_us=result["cpu_s"] / n * 1e6,
                  rss_per_item_bytes=max(0, peak - before) / n)
    return result


if __name__ == "__main__":
    emu_info, count, wait_flag, cap = sys.argv[1:5]
    print(json.dumps(asyncio.run(child(Emulator(**json.loads(emu_info)), int(count),
                                       wait_flag == "1", int(cap)))))
