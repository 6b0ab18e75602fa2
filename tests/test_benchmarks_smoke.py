"""The benchmark suite runs end to end (numbers are not asserted: they belong in benchmarks/)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_quick_benchmarks_complete(tmp_path: Path) -> None:
    out_json = tmp_path / "bench.json"
    out = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--json",
                          str(out_json)], capture_output=True, text=True, timeout=300,
                         check=False, cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr
    assert "| benchmark |" in out.stdout
    results = json.loads(out_json.read_text())
    assert set(results) >= {"overhead", "sync", "batch", "memory", "import"}
    assert results["batch"]["create_many"]["ok"] == results["batch"]["items"]
