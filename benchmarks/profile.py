"""Where a call's cost goes, for whoever is cutting the hot path.

    python -m benchmarks.profile get      # AsyncVoiceClient.custom_voices.get() vs raw aiohttp
    python -m benchmarks.profile list     # list() of a 30-task page vs raw aiohttp
    python -m benchmarks.profile sync     # VoiceClient vs AsyncVoiceClient get()
    python -m benchmarks.profile import   # modules `import voiceapi` loads beyond aiohttp

For a call: instructions per call of both sides and the top C functions of the measured side by
self cost (``callgrind_annotate`` on that phase's dump alone), then the top Python functions by
own time (``cProfile`` over the same calls; for ``sync`` the profile covers the calling thread,
the loop thread's share is in the callgrind figures). For ``import``: ``-X importtime`` self
times of the modules that ``import voiceapi`` adds to ``import aiohttp``.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import subprocess
import sys
import tempfile
from pathlib import Path

from . import percall
from ._emulator import emulator


def callgrind_section(group: str, calls: int, top: int) -> None:
    if percall.CALLGRIND is None:
        print("valgrind is not installed: no instruction profile")
        return
    base, measured = percall.GROUPS[group]
    with tempfile.TemporaryDirectory(prefix="voiceapi-cg-") as tmp, \
            emulator(1000, 0.05) as emu:
        phases = percall.run_child(emu, [group], {group: calls}, 1, callgrind=True,
                                   keep_dir=Path(tmp))
        for p in phases:
            print(f"{p['variant']:>6}: {p['instructions'] / p['calls'] / 1000:,.1f}k "
                  "instructions per call")
        # Part 1 is start-up, then one dump per phase in the order the phases ran.
        order = [p["variant"] for p in phases]
        ours = self_costs(Path(tmp) / f"cg.out.{2 + order.index(measured)}")
        theirs = self_costs(Path(tmp) / f"cg.out.{2 + order.index(base)}")
    total = sum(ours.values())
    print(f"\nTop C functions by self instructions, {measured} side ({calls} calls), "
          f"per call; total {total / calls / 1000:,.1f}k:")
    for name, cost in sorted(ours.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {cost / calls / 1000:8.1f}k  {cost / total:6.1%}  {name}")
    extra = {fn: ours.get(fn, 0) - theirs.get(fn, 0) for fn in ours.keys() | theirs.keys()}
    print(f"\nWhere the {measured} side spends more than {base}, per call (self instructions):")
    for name, cost in sorted(extra.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {cost / calls / 1000:+8.1f}k  {name}")


def self_costs(dump: Path) -> dict[str, int]:
    """Self instructions per function from one callgrind dump (names uncompressed).

    Read here rather than with ``callgrind_annotate``: the dumps taken mid-run by
    ``--dump-before`` come out of it attributed to ``__libc_start_main``.
    """
    costs: dict[str, int] = {}
    obj, fn, skip_next = "", "", False
    with dump.open() as fh:
        for line in fh:
            if line.startswith("ob="):
                obj = line[3:].strip().rsplit("/", 1)[-1]
            elif line.startswith("fn="):
                # "f'2" is f at recursion depth 2: one row per function.
                fn = f"{line[3:].strip().split(chr(39))[0]} [{obj}]"
            elif line.startswith("calls="):
                skip_next = True  # the next cost line is the callee's inclusive cost
            elif line[:1].isdigit() or line[:1] in "+-*":
                if skip_next:
                    skip_next = False
                    continue
                fields = line.split()
                if len(fields) >= 2 and fn:
                    costs[fn] = costs.get(fn, 0) + int(fields[1])
    return costs


def python_section(group: str, calls: int, top: int) -> None:
    _, measured = percall.GROUPS[group]
    with emulator(1000, 0.05) as emu:
        loop = asyncio.new_event_loop()
        child = percall.Child(emu, loop)
        loop.run_until_complete(child.setup())
        run = child.variant(group, measured)
        run(max(3, calls // 5))
        prof = cProfile.Profile()
        prof.enable()
        run(calls)
        prof.disable()
        if child.sync_client is not None:
            child.sync_client.close()
        loop.run_until_complete(child.teardown())
        loop.close()
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("tottime").print_stats(top)
    print(f"\nTop Python functions by own time, {measured} side ({calls} calls):")
    print("\n".join(ln for ln in text.getvalue().splitlines()
                    if ln.strip() and "function calls" not in ln))


def _importtime(module: str) -> dict[str, int]:
    """Module name → self microseconds, from ``-X importtime``."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"],
                         capture_output=True, text=True, check=True)
    times: dict[str, int] = {}
    for line in out.stderr.splitlines():
        parts = line.removeprefix("import time:").split("|")
        if len(parts) == 3 and parts[0].strip().isdigit():
            times[parts[2].strip()] = int(parts[0])
    return times


def import_section(top: int) -> None:
    theirs = _importtime("aiohttp")
    ours = _importtime("voiceapi")
    extra = {m: t for m, t in ours.items() if m not in theirs}
    print(f"import aiohttp: {len(theirs)} modules, {sum(theirs.values()) / 1000:.0f} ms self; "
          f"import voiceapi: {len(ours)} modules, {sum(ours.values()) / 1000:.0f} ms self")
    print(f"{len(extra)} modules only in voiceapi's import, "
          f"{sum(extra.values()) / 1000:.1f} ms self (one run; noisy):")
    for name, us in sorted(extra.items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {us / 1000:7.2f} ms  {name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=[*percall.GROUPS, "import"])
    parser.add_argument("--calls", type=int, default=None, help="calls to profile")
    parser.add_argument("--top", type=int, default=25, help="rows per table")
    args = parser.parse_args(argv)
    if args.what == "import":
        import_section(args.top)
        return 0
    calls = args.calls or (20 if args.what == "list" else 200)
    callgrind_section(args.what, calls, args.top)
    python_section(args.what, calls * 10, args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
