"""Child process for the memory benchmark: peak RSS growth while create_many tracks N tasks.

Run by ``benchmarks.run`` as ``python -m benchmarks.memory BASE_URL API_KEY N``; prints JSON.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import resource
import sys

import voiceapi


def rss_mb() -> float:
    """Current resident set size (Linux /proc); elsewhere the peak so far."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def run(base: str, key: str, n: int) -> dict[str, float]:
    items = [{"voice_name": f"m{i}", "voice_url": f"https://x/m-{i}-10s.wav"}
             for i in range(n)]  # the caller's data, not the SDK's tracking cost
    async with voiceapi.AsyncVoiceClient(api_key=key, base_url=base) as client:
        await client.preset_voices.list()  # warm the session, parsers and converter
        gc.collect()
        before = rss_mb()
        tracked = 0
        peak = before

        def progress(p: voiceapi.BatchProgress) -> None:
            nonlocal tracked, peak
            tracked = max(tracked, p.in_flight)
            peak = max(peak, rss_mb())  # sampled every progress report (≤ 20 per second)

        results = await client.custom_voices.create_many(items, max_in_flight=n, wait=False,
                                                         on_progress=progress)
        peak = max(peak, rss_mb())
    growth = peak - before
    return {"tasks": n, "submitted": sum(r.task is not None for r in results),
            "max_tracked": tracked, "baseline_mb": before, "peak_mb": peak,
            "growth_mb": growth, "bytes_per_task": growth * 1024 * 1024 / n}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(run(sys.argv[1], sys.argv[2], int(sys.argv[3])))))
