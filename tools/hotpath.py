"""Instructions per call on the hot path, measured with callgrind (repeatable on a noisy box).

    python -m tools.hotpath [--calls 300]

Starts a tiny loopback server in its own process, then runs each client kind under
``valgrind --tool=callgrind`` twice (warm-up only, and warm-up + N calls); the difference over N
is the cost of one call in instructions, the client process's threads included:

* ``raw``:   ``aiohttp`` GET + ``json.loads`` of the same answer (the floor);
* ``sdk``:   ``AsyncVoiceClient.custom_voices.get()`` (decode, parse to a frozen VoiceTask);
* ``sync``:  ``VoiceClient.custom_voices.get()`` (the same, plus the thread hop).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import site
import subprocess
import sys
import tempfile
from typing import Any

TASK = {"task_id": "930801301486305328", "task_status": "succeed", "task_status_msg": "",
        "task_info": {"external_task_id": "ext-1"},
        "task_result": {"voices": [{"voice_id": "829824295735410756", "voice_name": "v",
                                    "trial_url": "https://x/t.mp3", "owned_by": "929",
                                    "status": "succeed"}]},
        "created_at": 1790605869865, "updated_at": 1790605869865}
BODY = json.dumps({"code": 0, "message": "SUCCEED", "request_id": "r", "data": TASK}).encode()
PATH = "/v1/general/custom-voices/930801301486305328"
WARMUP = 30
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def serve() -> None:
    from aiohttp import web

    async def one(request: web.Request) -> web.Response:
        return web.Response(body=BODY, content_type="application/json")

    async def main() -> None:
        app = web.Application()
        app.router.add_get(PATH, one)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        print(runner.addresses[0][1], flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def client(kind: str, base: str, calls: int) -> None:
    import aiohttp

    import voiceapi

    print(voiceapi.__file__, file=sys.stderr)
    total = WARMUP + calls
    if kind == "sync":
        with voiceapi.VoiceClient(api_key="k", base_url=base) as sc:
            for _ in range(total):
                sc.custom_voices.get("930801301486305328")
        return

    async def run() -> None:
        if kind == "raw":
            async with aiohttp.ClientSession() as http:
                for _ in range(total):
                    async with http.get(base + PATH,
                                        headers={"Authorization": "Bearer k"}) as resp:
                        json.loads(await resp.read())
        else:
            async with voiceapi.AsyncVoiceClient(api_key="k", base_url=base) as ac:
                for _ in range(total):
                    await ac.custom_voices.get("930801301486305328")

    asyncio.run(run())


def instructions(kind: str, base: str, calls: int, src: str) -> int:
    # -S and an explicit path: the package comes from ``src`` (e.g. an exported older commit,
    # for before/after figures), not from whatever the environment has installed.
    path = os.pathsep.join([src, ROOT, *site.getsitepackages()])
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={tmp}/cg.out",
             sys.executable, "-S", "-m", "tools.hotpath", "--client", kind, "--base", base,
             "--calls", str(calls)],
            capture_output=True, text=True, check=True, cwd=tmp,
            env={**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": path})
    found = re.search(r"Collected : (\d+)", out.stderr)
    if found is None:
        raise RuntimeError(out.stderr[-2000:])
    return int(found.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--client")
    parser.add_argument("--base")
    parser.add_argument("--serve", action="store_true")
    parser.add_argument("--kinds", default="raw,sdk,sync")
    parser.add_argument("--src", default=ROOT, help="directory holding the voiceapi package")
    args = parser.parse_args(argv)
    if args.serve:
        serve()
        return 0
    if args.client:
        client(args.client, args.base, args.calls)
        return 0
    server = subprocess.Popen([sys.executable, "-m", "tools.hotpath", "--serve"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        base = f"http://127.0.0.1:{server.stdout.readline().strip()}"
        result: dict[str, Any] = {}
        kinds = args.kinds.split(",")
        for kind in kinds:
            per_call = (instructions(kind, base, args.calls, args.src)
                        - instructions(kind, base, 0, args.src)) / args.calls
            result[kind] = round(per_call)
            print(f"{kind:5s} {per_call / 1000:8.1f} k instructions per get()", flush=True)
        if {"sdk", "raw"} <= result.keys():
            print(f"sdk/raw  {result['sdk'] / result['raw']:.3f}")
        if {"sdk", "sync"} <= result.keys():
            print(f"sync/sdk {result['sync'] / result['sdk']:.3f}  "
                  f"(hop: {(result['sync'] - result['sdk']) / 1000:.1f} k)")
    finally:
        server.kill()
        server.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
