"""Batch scaling and memory: CPU and RSS per item of ``create_many`` at 1k, 10k and 100k items.

Each measurement is its own child process (``python -m benchmarks.scale``) so its RSS is the
batch's alone and a run that does not finish in its budget can be stopped by PID. The child
reports its CPU seconds over the ``create_many`` call alone and its memory around it:

* ``rss_before``: the resident set just before the call, after the caller's items list is built,
  the client warmed up (one request: session, parsers, converter) and a full collection, so
  neither the caller's data nor one-time start-up costs are billed to the batch;
* ``rss_hwm``: the kernel's own high-water mark (``VmHWM``), reset to the current RSS just before
  the call (``/proc/self/clear_refs``), so it is the true peak of the call: sampling every 50 ms
  from outside can miss a short peak;
* ``rss_after``: the resident set right after the call, with the results still held.

Where the high-water mark cannot be reset (not Linux, or no permission) the parent's 50 ms
samples of ``/proc/<pid>/statm`` are the peak instead (``peak_source`` says which).
"""

from __future__ import annotations

import asyncio
import gc
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


def high_water_mark() -> int | None:
    """This process's peak resident set (``VmHWM``) in bytes, None where unknown."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_high_water_mark() -> bool:
    """Set ``VmHWM`` to the current RSS (Linux ≥ 4.0); False when that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return high_water_mark() is not None


async def child(emu: Emulator, n: int, wait: bool, max_in_flight: int,
                warm_batch: bool = False) -> dict[str, Any]:
    items = [{"voice_name": f"s{i}", "voice_url": f"https://x/s-{i}-10s.wav"}
             for i in range(n)]  # the caller's data, not the SDK's cost: built before
    reports = 0

    def progress(p: voiceapi.BatchProgress) -> None:
        nonlocal reports
        reports += 1

    warm_rss: int | None = None
    async with voiceapi.AsyncVoiceClient(api_key=emu.api_key, base_url=emu.base_url) as client:
        await client.custom_voices.list(page_size=1)  # warm session, parsers, converter
        if warm_batch:
            # A one-item batch first: the batch modules' import and first-call costs are paid
            # once per process, not per task (reported apart as ``rss_warm_batch``).
            start = rss_bytes()
            await client.custom_voices.create_many(
                [{"voice_name": "warm", "voice_url": "https://x/warm-10s.wav"}], wait=False)
            end = rss_bytes()
            warm_rss = None if start is None or end is None else end - start
        gc.collect()  # garbage of the start-up is not the batch's
        hwm_reset = reset_high_water_mark()
        before = rss_bytes()
        cpu, wall = time.process_time(), time.perf_counter()
        results = await client.custom_voices.create_many(
            items, max_in_flight=max_in_flight, wait=wait, on_progress=progress)
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        hwm = high_water_mark() if hwm_reset else None
        after = rss_bytes()
    return {"items": n, "wait": wait, "cpu_s": cpu, "wall_s": wall, "rss_before": before,
            "rss_hwm": hwm, "rss_after": after, "rss_warm_batch": warm_rss,
            "submitted": sum(r.task is not None for r in results),
            "ok": sum(r.ok for r in results), "progress_reports": reports}


def measure(emu: Emulator, n: int, *, wait: bool, max_in_flight: int,
            budget: float, warm_batch: bool = False) -> dict[str, Any]:
    """One child run; ``finished: False`` (with the time spent) when it overran ``budget``.
    ``warm_batch``: run a one-item batch before the baseline (see ``child``)."""
    info = json.dumps({"base_url": emu.base_url, "access_key": emu.access_key,
                       "secret_key": emu.secret_key, "api_key": emu.api_key})
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.scale", info, str(n), "1" if wait else "0",
         str(max_in_flight), "1" if warm_batch else "0"], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, cwd=ROOT)
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
    hwm = result.get("rss_hwm")
    if hwm is not None:
        peak, source = hwm, "VmHWM"
    else:
        source = "sampled every 50 ms"
    after = result.get("rss_after")
    result.update(finished=True, rss_peak=peak, peak_source=source,
                  cpu_per_item_us=result["cpu_s"] / n * 1e6,
                  rss_per_item_bytes=max(0, peak - before) / n,
                  rss_settled_per_item_bytes=None if after is None else
                  max(0, after - before) / n)
    return result


if __name__ == "__main__":
    emu_info, count, wait_flag, cap, warm_flag = sys.argv[1:6]
    print(json.dumps(asyncio.run(child(Emulator(**json.loads(emu_info)), int(count),
                                       wait_flag == "1", int(cap), warm_flag == "1"))))
