"""A standalone emulator process for the benchmarks, for trees where ``python -m voiceapi.testing``
is not there yet. Prints the same JSON line (base URL and credentials) and serves until killed.

    python -m benchmarks._serve [--concurrency N] [--task-seconds S]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from voiceapi.testing import KlingEmulator


async def serve(concurrency: int, task_seconds: float) -> None:
    # A large request log would be billed to the emulator's memory, not the client's, but a
    # 100k-item batch records millions of requests: keep it small.
    emu = KlingEmulator(port=0, concurrency=concurrency, task_seconds=task_seconds,
                        max_recorded_requests=1000)
    async with emu:
        print(json.dumps({"base_url": emu.base_url, "access_key": emu.access_key,
                          "secret_key": emu.secret_key, "api_key": emu.api_key}), flush=True)
        await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks._serve")
    parser.add_argument("--concurrency", type=int, default=5)
    parser.add_argument("--task-seconds", type=float, default=0.2)
    args = parser.parse_args()
    try:
        asyncio.run(serve(args.concurrency, args.task_seconds))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
