"""Every code block in the README runs as written, against the emulator.

Python blocks run as scripts (their ``test_*`` functions are called too); the CLI block runs
line by line through bash with only the README's placeholders filled in (keys, ids, a manifest).
A new block of another kind makes ``test_every_block_is_covered`` fail until it is covered.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import voiceapi
from voiceapi.testing import KlingEmulator

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", flags=re.S | re.M)


def _blocks() -> list[tuple[str, str, str]]:
    """(section, language, code) for every fenced block, in order."""
    out = []
    for match in FENCE.finditer(README):
        prose = FENCE.sub("", README[:match.start()])  # a "# comment" in code is no heading
        heads = re.findall(r"^#{1,3} (.+)$", prose, flags=re.M)
        out.append((heads[-1] if heads else "", match.group(1), match.group(2)))
    return out


PYTHON = [(s, code) for s, lang, code in _blocks() if lang == "python"]
BASH = {s: code for s, lang, code in _blocks() if lang == "bash"}


def test_every_block_is_covered() -> None:
    """Python blocks all run below; bash blocks are the set-up commands and the CLI tour;
    unlabelled blocks are diagrams (the error tree), not code."""
    kinds = {lang for _, lang, _ in _blocks()}
    assert kinds <= {"python", "bash", ""}, kinds
    assert set(BASH) == {"voiceapi", "CLI"}
    # The jq filter is quoted (unquoted, a shell may glob `.voices[]`), and skips deleted
    # voices (they stay listed, marked "deleted").
    assert """jq -r '.voices[] | select(.status != "deleted") | .voice_id'""" in BASH["CLI"]
    assert all(not re.search(r"^\s*(import|from|voiceapi|python)\b", code, flags=re.M)
               for _, lang, code in _blocks() if lang == "")
    assert len(PYTHON) >= 6


@pytest.fixture
def readme_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[KlingEmulator]:
    """An emulator that accepts the README's placeholder key ("..."), credentials in the
    environment as the README says, and a scratch working folder for journals."""
    for name in ("KLING_ACCESS_KEY", "KLING_SECRET_KEY"):
        monkeypatch.delenv(name, raising=False)
    with KlingEmulator(api_key="...", task_seconds=0.05) as emu:
        monkeypatch.setenv("KLING_API_KEY", emu.api_key)
        monkeypatch.setenv("KLING_BASE_URL", emu.base_url)
        monkeypatch.chdir(tmp_path)
        yield emu


def _close_clients(namespace: dict[str, Any]) -> None:
    for value in namespace.values():
        if isinstance(value, voiceapi.AsyncVoiceClient):
            asyncio.run(value.aclose())


@pytest.mark.parametrize(("section", "code"), PYTHON,
                         ids=[f"{s}-{i}" for i, (s, _) in enumerate(PYTHON)])
def test_python_block_runs(section: str, code: str, readme_env: KlingEmulator,
                           capsys: pytest.CaptureFixture[str]) -> None:
    namespace: dict[str, Any] = {"__name__": "readme_example"}
    exec(compile(code, f"README.md ({section})", "exec"), namespace)
    tests = [fn for name, fn in namespace.items() if name.startswith("test_") and callable(fn)]
    for fn in tests:
        args = [readme_env] * len(inspect.signature(fn).parameters)  # the kling_emulator fixture
        result = fn(*args)
        if inspect.iscoroutine(result):
            asyncio.run(result)
    _close_clients(namespace)
    printed = capsys.readouterr().out
    if section == "Async":
        assert re.search(r"^\d{18}$", printed, flags=re.M)  # the voice id it printed
    if section == "Batch":
        assert printed.count("5 / 5") >= 1 and printed.count("Speaker") == 5
        assert Path("voices.journal").exists()


def _cli_lines() -> list[str]:
    return [line.split("  #", 1)[0].strip() for line in BASH["CLI"].splitlines()
            if line.strip() and not line.startswith("#")]


@pytest.mark.slow
def test_cli_block_runs_line_by_line(tmp_path: Path) -> None:
    """Each line of the CLI tour through bash, against the emulator. Filled in: the keys, the
    example ids (with the ones the tour's own `create` made), a voices.csv, and port 0 (8787
    may be taken on a shared machine)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "voiceapi"
    shim.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -m voiceapi \"$@\"\n")
    shim.chmod(0o755)
    with KlingEmulator(task_seconds=0.05, secret_key="s" * 32) as emu:
        (tmp_path / "voices.csv").write_text(
            "voice_name,voice_url\n" + "".join(f"Speaker {i},{emu.sample_url(8 + i)}\n"
                                               for i in range(3)))
        env = {k: v for k, v in os.environ.items() if not k.startswith("KLING_")}
        env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
                   KLING_BASE_URL=emu.base_url)
        ids: dict[str, str] = {}
        ran = []
        for line in _cli_lines():
            if line.startswith("export "):
                line = line.replace("KLING_ACCESS_KEY=...", f"KLING_ACCESS_KEY={emu.access_key}")
                line = line.replace("KLING_SECRET_KEY=...", f"KLING_SECRET_KEY={emu.secret_key}")
                for assignment in shlex.split(line)[1:]:
                    name, value = assignment.split("=", 1)
                    env[name] = value
                continue
            for placeholder, real in ids.items():
                line = line.replace(placeholder, real)
            if "| jq" in line and shutil.which("jq") is None:
                line = line.split("|", 1)[0]
            if line.startswith("voiceapi mock-server"):
                _run_mock_server(line.replace("--port 8787", "--port 0"), env, tmp_path)
                ran.append("mock-server")
                continue
            out = subprocess.run(["bash", "-o", "pipefail", "-c", line], env=env, cwd=tmp_path,
                                 capture_output=True, text=True, timeout=120, check=False)
            assert out.returncode == 0, (line, out.stderr)
            assert "Traceback" not in out.stderr
            ran.append(line.split()[1])
            if line.startswith("voiceapi create"):
                task = emu.tasks()[-1]
                assert task["task_status"] == "succeed"
                ids = {"930801301486305328": task["task_id"],
                       "930801338081615883": task["task_result"]["voices"][0]["voice_id"]}
                assert task["task_id"] in out.stdout
            if "jq" in line and shutil.which("jq"):
                assert ids["930801338081615883"] in out.stdout.split()
        assert emu.count("delete") == 1
    assert ran == ["create", "get", "list", "presets", "delete", "wait", "batch", "mock-server",
                   "demo"]
    report = (tmp_path / "results.csv").read_text().splitlines()
    assert len(report) == 4 and all(",succeed," in row for row in report[1:])


def _run_mock_server(line: str, env: dict[str, str], cwd: Path) -> None:
    proc = subprocess.Popen(["bash", "-c", f"exec {line}"], env=env, cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("Kling emulator on http://127.0.0.1:"), first
    finally:
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in err


def test_top_commands_match_ci_and_packaging() -> None:
    commands = re.findall(r"^python3 -m venv .*$", BASH["voiceapi"], flags=re.M)
    assert len(commands) == 2
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci.splitlines()
    # Command 1 installs the cli extra (the demo is the console script's): its run is
    # tests/test_cli.py::test_demo_runs_end_to_end_without_credentials.
    assert commands[0].endswith("pip install -q '.[cli]' && .venv/bin/voiceapi demo")
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert {d.split(">")[0] for d in project["optional-dependencies"]["cli"]} == \
        {"click", "rich"}
    assert not any(d.startswith(("click", "rich")) for d in project["dependencies"])
    assert project["scripts"] == {"voiceapi": "voiceapi._cli:main"}


@pytest.mark.parametrize("name", ["AsyncVoiceClient", "VoiceClient", "KlingEmulator",
                                  "create_many", "parse_callback", "CallbackReceiver"])
def test_documented_names_exist(name: str) -> None:
    import voiceapi.testing

    assert hasattr(voiceapi, name) or hasattr(voiceapi.testing, name) or \
        hasattr(voiceapi.AsyncVoiceClient(api_key="k").custom_voices, name)

