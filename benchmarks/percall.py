"""Per-call cost: the SDK against what a competent user writes with aiohttp alone.

Every variant runs in ONE child process (``python -m benchmarks.percall``), round after round
with the order rotated, so warm caches and a busy neighbour hit both sides alike. Between
phases the child calls ``os.getppid()``: under ``valgrind --tool=callgrind
--dump-before=getppid`` each phase lands in its own dump, so its instruction count excludes
interpreter start-up, imports and warm-up. Outside valgrind the same child reports CPU seconds
per phase (the whole process, so the sync facade's loop thread is billed too).

Groups (both sides send the same headers and the same cached HS256 JWT, and decode the JSON):

- ``get``: ``client.custom_voices.get(id)`` vs ``session.get`` + ``resp.json()`` + code check;
- ``list``: ``client.custom_voices.list(page_size=30)`` (30 finished tasks with voices) vs the
  raw page request;
- ``sync``: ``VoiceClient.custom_voices.get`` vs ``AsyncVoiceClient.custom_voices.get``;
- ``parse`` (no HTTP; where a ``list`` call's extra cost goes): ``json.loads`` of the same
  30-task page vs ``json.loads`` + ``parse_task_list`` into frozen ``VoiceTask`` models;
- ``stamps``: ``list()`` and then every task's ``created_at`` and ``updated_at`` read, vs the
  raw page request. The models build their datetimes on first read, so ``list`` alone does not
  pay for them; this row shows what a caller who reads them all pays (no target).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jwt

import voiceapi

from ._emulator import Emulator

#: group -> (baseline variant, measured variant)
GROUPS: dict[str, tuple[str, str]] = {
    "get": ("raw", "sdk"),
    "list": ("raw", "sdk"),
    "sync": ("async", "sync"),
    "parse": ("json", "models"),
    "stamps": ("raw", "read"),
}
LIST_PAGE = 30
CALLGRIND = shutil.which("valgrind")
ROOT = Path(__file__).resolve().parents[1]


def _marker() -> None:
    """A phase boundary: callgrind dumps its counters when ``getppid`` is entered."""
    os.getppid()


def _token(access_key: str, secret_key: str) -> str:
    """What the user's own code would cache: the same claims the SDK signs."""
    now = int(time.time())
    return jwt.encode({"iss": access_key, "exp": now + 1800, "nbf": now - 5}, secret_key,
                      algorithm="HS256", headers={"alg": "HS256", "typ": "JWT"})


class Child:
    """The workloads, built once; each variant is a callable running one call."""

    def __init__(self, emu: Emulator, loop: asyncio.AbstractEventLoop) -> None:
        self.emu, self.loop = emu, loop
        self.headers = {"Authorization": f"Bearer {_token(emu.access_key, emu.secret_key)}",
                        "Content-Type": "application/json"}
        self.session: aiohttp.ClientSession | None = None
        self.client: voiceapi.AsyncVoiceClient | None = None
        self.sync_client: voiceapi.VoiceClient | None = None
        self.task_id = ""
        self.page_body = b""

    async def setup(self) -> None:
        self.session = aiohttp.ClientSession()
        self.client = voiceapi.AsyncVoiceClient(self.emu.access_key, self.emu.secret_key,
                                                base_url=self.emu.base_url)
        tasks = [await self.client.custom_voices.create(
            voice_name=f"pc{i}", voice_url=f"https://x/percall-{i}-10s.wav")
            for i in range(LIST_PAGE)]
        for task in tasks:  # finished tasks carry a voice: the realistic page to parse
            await self.client.custom_voices.wait(task, timeout=60, poll_interval=0.05)
        self.task_id = tasks[0].task_id
        assert self.session is not None
        async with self.session.get(
                f"{self.emu.base_url}/v1/general/custom-voices?pageNum=1&pageSize={LIST_PAGE}",
                headers=self.headers) as resp:
            self.page_body = await resp.read()

    async def teardown(self) -> None:
        if self.client is not None:
            await self.client.aclose()
        if self.session is not None:
            await self.session.close()

    def _parse_variant(self, name: str) -> Callable[[int], None]:
        """The page's JSON decoded (``json``), or decoded and built into models (``models``)."""
        from voiceapi._decode import parse_task_list

        body, loads = self.page_body, json.loads

        def decode(n: int) -> None:
            for _ in range(n):
                loads(body)

        def build(n: int) -> None:
            for _ in range(n):
                parse_task_list(loads(body)["data"])

        return decode if name == "json" else build

    async def _raw(self, url: str) -> Any:
        assert self.session is not None
        async with self.session.get(url, headers=self.headers) as resp:
            body = await resp.json()
        if body.get("code") != 0:
            raise RuntimeError(f"code {body.get('code')}")
        return body["data"]

    async def _list_and_read_stamps(self) -> list[Any]:
        assert self.client is not None
        tasks = await self.client.custom_voices.list(page_size=LIST_PAGE)
        return [(task.created_at, task.updated_at) for task in tasks]

    def variant(self, group: str, name: str) -> Callable[[int], None]:
        """A function making ``n`` calls of this variant."""
        client = self.client
        assert client is not None
        task_id = self.task_id
        one_url = f"{self.emu.base_url}/v1/general/custom-voices/{task_id}"
        page_url = f"{self.emu.base_url}/v1/general/custom-voices?pageNum=1&pageSize={LIST_PAGE}"
        calls: dict[tuple[str, str], Callable[[], Awaitable[Any]]] = {
            ("get", "raw"): lambda: self._raw(one_url),
            ("get", "sdk"): lambda: client.custom_voices.get(task_id),
            ("list", "raw"): lambda: self._raw(page_url),
            ("list", "sdk"): lambda: client.custom_voices.list(page_size=LIST_PAGE),
            ("sync", "async"): lambda: client.custom_voices.get(task_id),
            ("stamps", "raw"): lambda: self._raw(page_url),
            ("stamps", "read"): lambda: self._list_and_read_stamps(),
        }
        if group == "parse":
            return self._parse_variant(name)
        if (group, name) == ("sync", "sync"):
            if self.sync_client is None:
                self.sync_client = voiceapi.VoiceClient(
                    self.emu.access_key, self.emu.secret_key, base_url=self.emu.base_url)
            sync_get = self.sync_client.custom_voices.get

            def run_sync(n: int) -> None:
                for _ in range(n):
                    sync_get(task_id)
            return run_sync
        one = calls[(group, name)]

        async def many(n: int) -> None:
            for _ in range(n):
                await one()

        return lambda n: self.loop.run_until_complete(many(n))


def child_main(argv: list[str]) -> int:
    """``python -m benchmarks.percall EMULATOR_JSON GROUPS CALLS_JSON ROUNDS``: JSON on stdout."""
    info, groups, calls, rounds = (json.loads(argv[0]), argv[1].split(","), json.loads(argv[2]),
                                   int(argv[3]))
    emu = Emulator(**info)
    loop = asyncio.new_event_loop()
    child = Child(emu, loop)
    loop.run_until_complete(child.setup())
    runners = {(g, v): child.variant(g, v) for g in groups for v in GROUPS[g]}
    for (g, _), run in runners.items():
        run(max(3, calls[g] // 5))  # warm every path: connections, parsers, the loop thread
    phases: list[dict[str, Any]] = []
    _marker()
    for r in range(rounds):
        for g in groups:
            order = GROUPS[g] if r % 2 == 0 else GROUPS[g][::-1]  # rotated per round
            for v in order:
                cpu, wall = time.process_time(), time.perf_counter()
                runners[(g, v)](calls[g])
                phases.append({"group": g, "variant": v, "round": r, "calls": calls[g],
                               "cpu_s": time.process_time() - cpu,
                               "wall_s": time.perf_counter() - wall})
                _marker()
    if child.sync_client is not None:
        child.sync_client.close()
    loop.run_until_complete(child.teardown())
    loop.close()
    print(json.dumps({"phases": phases}))
    return 0


def _dump_totals(directory: Path) -> list[int]:
    """Instruction totals of the numbered callgrind dumps, in order (part 1 = start-up)."""
    parts: dict[int, int] = {}
    for path in directory.glob("cg.out.*"):
        part, total = None, None
        with path.open() as fh:
            for line in fh:
                if line.startswith("part:"):
                    part = int(line.split()[1])
                elif line.startswith(("totals:", "summary:")):
                    total = int(line.split()[1])
        if part is not None and total is not None:
            parts[part] = total
    return [parts[k] for k in sorted(parts)]


def run_child(emu: Emulator, groups: list[str], calls: dict[str, int], rounds: int, *,
              callgrind: bool, timeout: float = 1200,
              keep_dir: Path | None = None) -> list[dict[str, Any]]:
    """Run the child once; phases carry ``cpu_s`` and, under callgrind, ``instructions``."""
    args = [sys.executable, "-m", "benchmarks.percall", json.dumps({
        "base_url": emu.base_url, "access_key": emu.access_key, "secret_key": emu.secret_key,
        "api_key": emu.api_key}), ",".join(groups), json.dumps(calls), str(rounds)]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    with tempfile.TemporaryDirectory(prefix="voiceapi-cg-") as tmp:
        directory = keep_dir or Path(tmp)
        if callgrind:
            if CALLGRIND is None:
                raise RuntimeError("valgrind is not installed")
            # Names uncompressed: each dump must be readable on its own by callgrind_annotate.
            args = [CALLGRIND, "--tool=callgrind", "--dump-before=getppid",
                    "--compress-strings=no", "--compress-pos=no",
                    f"--callgrind-out-file={directory / 'cg.out'}", *args]
        out = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env,
                             check=False, cwd=ROOT)
        if out.returncode != 0:
            raise RuntimeError(f"per-call child failed: {out.stderr[-2000:]}")
        phases: list[dict[str, Any]] = json.loads(out.stdout.strip().splitlines()[-1])["phases"]
        if callgrind:
            totals = _dump_totals(directory)
            # Part 1 is start-up and warm-up, then one part per phase.
            if len(totals) < len(phases) + 1:
                raise RuntimeError(f"expected {len(phases) + 1} callgrind dumps, got "
                                   f"{len(totals)}")
            for phase, total in zip(phases, totals[1:], strict=False):
                phase["instructions"] = total
    return phases


def summarise(phases: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """Per group: per-call values of both variants and their per-round ratio."""
    out: dict[str, Any] = {}
    for group, (base, measured) in GROUPS.items():
        rows = [p for p in phases if p["group"] == group and key in p]
        if not rows:
            continue
        rounds = sorted({p["round"] for p in rows})
        per: dict[str, list[float]] = {base: [], measured: []}
        for r in rounds:
            for p in rows:
                if p["round"] == r:
                    per[p["variant"]].append(p[key] / p["calls"])
        ratios = [m / b for b, m in zip(per[base], per[measured], strict=True)]
        out[group] = {"baseline": base, "measured": measured, "rounds": len(rounds),
                      base: per[base], measured: per[measured], "ratio": ratios}
    return out


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
