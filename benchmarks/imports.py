"""Import cost: ``import voiceapi`` against ``import aiohttp`` (its heaviest dependency).

Each import runs in a fresh interpreter; only the import statement is measured — CPU seconds
from ``time.process_time()`` around it, and, under callgrind, the instructions between two
``os.getppid()`` markers (interpreter start-up is identical for both and left out).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from .percall import CALLGRIND, _dump_totals

MODULES = ("aiohttp", "voiceapi")
_SNIPPET = ("import os, time; os.getppid(); t = time.process_time(); import {m}; "
            "c = time.process_time() - t; os.getppid(); print(c)")


def _once(module: str, callgrind: bool) -> tuple[float, int | None]:
    cmd = [sys.executable, "-c", _SNIPPET.format(m=module)]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    with tempfile.TemporaryDirectory(prefix="voiceapi-cg-") as tmp:
        if callgrind:
            assert CALLGRIND is not None
            cmd = [CALLGRIND, "--tool=callgrind", "--dump-before=getppid",
                   f"--callgrind-out-file={Path(tmp) / 'cg.out'}", *cmd]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env,
                             timeout=600)
        instructions = _dump_totals(Path(tmp))[1] if callgrind else None
    return float(out.stdout.strip().splitlines()[-1]), instructions


def bench_import(rounds: int, callgrind: bool) -> dict[str, Any]:
    """CPU of each import over ``rounds`` rounds (order alternated); instructions once each
    (they repeat to within a fraction of a percent)."""
    for m in MODULES:
        _once(m, False)  # bytecode caches written, files in the page cache
    cpu: dict[str, list[float]] = {m: [] for m in MODULES}
    for r in range(rounds):
        for m in MODULES if r % 2 == 0 else MODULES[::-1]:
            cpu[m].append(_once(m, False)[0])
    out: dict[str, Any] = {"cpu_s": cpu,
                           "cpu_ratio": [v / a for a, v in zip(cpu["aiohttp"], cpu["voiceapi"],
                                                               strict=True)]}
    if callgrind and CALLGRIND is not None:
        ins = {m: _once(m, True)[1] for m in MODULES}
        out["instructions"] = ins
        out["instructions_ratio"] = (ins["voiceapi"] or 0) / (ins["aiohttp"] or 1)
    return out
