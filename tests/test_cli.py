"""The CLI through its real entry point (click's runner, and subprocesses for the console)."""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import os
import pty
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from rich.cells import cell_len

from voiceapi._cli._app import cli, cli_words
from voiceapi.testing import KlingEmulator

# COLUMNS/LINES too: a piped table's width follows COLUMNS, which some runners set (xdist: 80).
CLEAN_ENV: dict[str, str | None] = dict.fromkeys(
    ("KLING_ACCESS_KEY", "KLING_SECRET_KEY", "KLING_API_KEY", "KLING_BASE_URL", "COLUMNS",
     "LINES"))


@pytest.fixture
def temu() -> Iterator[KlingEmulator]:
    with KlingEmulator(concurrency=5, task_seconds=0.1) as emu:
        yield emu


def run(emu: KlingEmulator | None, *args: str) -> Result:
    env: dict[str, str | None] = dict(CLEAN_ENV)
    if emu is not None:
        env.update(KLING_API_KEY=emu.api_key, KLING_BASE_URL=emu.base_url)
    return CliRunner().invoke(cli, list(args), env=env, catch_exceptions=False)


def test_presets_as_json_and_table(temu: KlingEmulator) -> None:
    result = run(temu, "--json", "presets")
    assert result.exit_code == 0
    voices = json.loads(result.stdout)
    assert len(voices) == 30 and voices[0]["owned_by"] == "kling"
    table = run(temu, "presets", "--page-size", "3")
    assert table.exit_code == 0 and "Warm Narrator" in table.stdout
    assert len(table.stdout.strip().splitlines()) == 5  # header, rule, 3 rows
    every = run(temu, "--json", "presets", "--all")
    assert len([json.loads(line) for line in every.stdout.splitlines()]) == 48


def test_create_wait_get_list_delete(temu: KlingEmulator) -> None:
    created = run(temu, "--json", "create", "--name", "cli voice", "--url", temu.sample_url(),
                  "--external-id", "cli-1", "--wait")
    assert created.exit_code == 0, created.output
    task = json.loads(created.stdout)
    assert task["task_status"] == "succeed" and task["voices"][0]["voice_name"] == "cli voice"
    got = run(temu, "--json", "get", "--external-id", "cli-1")
    assert json.loads(got.stdout)["task_id"] == task["task_id"]
    listed = run(temu, "--json", "list", "--all")
    assert [json.loads(x)["task_id"] for x in listed.stdout.splitlines()] == [task["task_id"]]
    deleted = run(temu, "delete", task["voices"][0]["voice_id"])
    assert deleted.exit_code == 0 and "deleted" in deleted.stdout


def test_exit_codes(temu: KlingEmulator) -> None:
    missing = run(temu, "get", "123456789012345678")
    assert missing.exit_code == 1
    assert "1201" in missing.stderr and "request_id=" in missing.stderr
    assert run(temu, "get").exit_code == 2
    bad = run(temu, "create", "--name", "x" * 21, "--url", temu.sample_url())
    assert bad.exit_code == 2 and "21 characters" in bad.stderr
    failed = run(temu, "create", "--name", "short", "--url", temu.sample_url(2), "--wait")
    assert failed.exit_code == 1 and "between 5s and 30s" in failed.stderr


def test_missing_credentials_name_the_variable() -> None:
    result = run(None, "presets")
    assert result.exit_code == 2
    assert "KLING_ACCESS_KEY" in result.stderr and "KLING_API_KEY" in result.stderr


def _manifest(tmp_path: Path, emu: KlingEmulator, rows: list[str]) -> Path:
    path = tmp_path / "voices.csv"
    path.write_text("voice_name,voice_url,video_id\n" + "\n".join(rows) + "\n")
    return path


def test_batch_rejects_bad_rows_before_sending(tmp_path: Path, temu: KlingEmulator) -> None:
    path = _manifest(tmp_path, temu, [f"ok,{temu.sample_url()},", "no source,,",
                                      f"{'x' * 21},{temu.sample_url()},",
                                      "both,https://x/a.mp3,123"])
    result = run(temu, "batch", str(path))
    assert result.exit_code == 2
    lines = result.stderr
    assert "line 3:" in lines and "line 4:" in lines and "line 5:" in lines
    assert "line 2:" not in lines
    assert temu.count("create") == 0


def test_batch_jsonl_report_and_resume(tmp_path: Path, temu: KlingEmulator) -> None:
    path = tmp_path / "voices.jsonl"
    path.write_text("\n".join(json.dumps({"voice_name": f"b{i}", "voice_url": temu.sample_url(
        3 if i == 4 else 10)}) for i in range(12)) + "\n")
    assert run(temu, "--json", "batch", str(path), "--dry-run").stdout.strip() == \
        '{"valid": 12}'
    journal = tmp_path / "batch.journal"
    first = run(temu, "--json", "batch", str(path), "--journal", str(journal))
    assert first.exit_code == 1  # one sample is too short
    report = json.loads(first.stdout)
    assert (report["total"], report["succeeded"], report["failed"]) == (12, 11, 1)
    assert report["results"][4]["error"]["type"] == "TaskFailedError"
    again = run(temu, "--json", "batch", str(path), "--journal", str(journal))
    assert json.loads(again.stdout)["succeeded"] == 11
    assert temu.task_count == 12  # the rerun created nothing new


def test_mock_server_runs_until_ctrl_c() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "voiceapi", "mock-server", "--port", "0",
                             "--task-seconds", "0.1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("Kling emulator on http://127.0.0.1:")
        base = first.split()[3]
        exports = [proc.stdout.readline().strip() for _ in range(2)]
        key = exports[1].split("=", 1)[1]
        req = urllib.request.Request(base + "/v1/general/presets-voices",
                                     headers={"Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert json.loads(resp.read())["code"] == 0
    finally:
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err


def test_demo_runs_end_to_end_without_credentials() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KLING_")}
    out = subprocess.run([sys.executable, "-W", "error", "-m", "voiceapi", "demo",
                          "--task-seconds", "0.2"], capture_output=True, text=True, timeout=120,
                         env=env, check=False)
    assert out.returncode == 0, out.stderr
    assert "embedded Kling emulator" in out.stdout and "== Done" in out.stdout
    assert "failed  Demo voice 4" in out.stdout and "deleted" in out.stdout
    assert "allows 3 tasks in progress" in out.stdout and "starts with 2 slots" in out.stdout
    assert "TASK ID" in out.stdout and "VOICE ID" in out.stdout
    assert out.stderr == ""


def test_demo_against_a_server_with_credentials(temu: KlingEmulator) -> None:
    result = run(temu, "demo", "--sample-url", temu.sample_url(9),
                 "--sample-url", temu.sample_url(14))
    assert result.exit_code == 0, result.output
    assert f"Using the Kling API at {temu.base_url}" in result.stdout
    assert temu.task_count == 2  # only the samples it was given
    deleted = [v["voice_id"] for t in temu.tasks() for v in t["task_result"]["voices"]
               if v.get("status") == "deleted"]
    assert len(deleted) == 1  # it deletes one voice, and only one it created
    listed = result.stdout.split("Your custom voices", 1)[1]
    row = next(line for line in listed.splitlines() if deleted[0] in line)
    assert "deleted" in row.split(deleted[0], 1)[1]  # the listing says the voice is deleted
    summary = run(temu, "--json", "demo")
    assert json.loads(summary.stdout.strip().splitlines()[-1])["tasks_listed"] == 2


@pytest.mark.slow
def test_batch_killed_midway_resumes_without_duplicates(tmp_path: Path) -> None:
    with KlingEmulator(concurrency=3, task_seconds=0.2) as emu:
        manifest = tmp_path / "voices.jsonl"
        manifest.write_text("".join(json.dumps({"voice_name": f"k{i}",
                                                "voice_url": emu.sample_url()}) + "\n"
                                    for i in range(30)))
        journal = tmp_path / "run.journal"
        env = {**os.environ, "KLING_API_KEY": emu.api_key, "KLING_BASE_URL": emu.base_url}
        proc = subprocess.Popen([sys.executable, "-m", "voiceapi", "batch", str(manifest),
                                 "--journal", str(journal)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            for _ in range(600):  # wait (at most 30 s) until a third of the batch is journaled
                if journal.exists() and len(journal.read_text().splitlines()) >= 20:
                    break
                time.sleep(0.05)
        finally:
            proc.kill()
            proc.wait(30)
        created_before = emu.task_count
        assert 3 <= created_before < 30
        again = subprocess.run([sys.executable, "-m", "voiceapi", "--json", "batch",
                                str(manifest), "--journal", str(journal)], env=env,
                               capture_output=True, text=True, timeout=120, check=False)
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["succeeded"] == 30
        per_ext = [t["task_info"]["external_task_id"] for t in emu.tasks()]
        assert len(per_ext) == 30 == len(set(per_ext))


# --- issue 15 -------------------------------------------------------------------------------------

def _env(emu: KlingEmulator | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KLING_")}
    if emu is not None:
        env.update(KLING_API_KEY=emu.api_key, KLING_BASE_URL=emu.base_url)
    env.update(extra)
    return env


def _cli_proc(args: list[str], env: dict[str, str], **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "voiceapi", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


HIDE = ("import sys; sys.modules[{name!r}] = None; sys.argv[0] = 'voiceapi'\n"
        "from voiceapi._cli import main; main(['list'])")


@pytest.mark.parametrize("name", ["click", "rich"])
def test_without_the_cli_extra_one_line_says_how_to_install(name: str) -> None:
    out = subprocess.run([sys.executable, "-c", HIDE.format(name=name)], capture_output=True,
                         text=True, timeout=60, env=_env(), check=False)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "pip install 'voiceapi[cli]'" in out.stderr
    assert name in out.stderr and out.stdout == ""


def test_the_sdk_never_imports_the_cli_libraries() -> None:
    code = "import sys, voiceapi; print(sorted({'click', 'rich'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True)
    assert out.stdout.strip() == "[]"


COMMANDS = ("create", "get", "wait", "list", "presets", "delete", "batch", "mock-server", "demo")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_help_shows_json_and_an_example(command: str) -> None:
    result = run(None, command, "--help")
    assert result.exit_code == 0
    assert "--json" in result.stdout and "Example" in result.stdout
    assert f"voiceapi {command}" in result.stdout.split("Example", 1)[1]


def test_output_options_after_the_subcommand(temu: KlingEmulator) -> None:
    """Bug 1: the README's own `voiceapi list --all --json`."""
    run(temu, "create", "--name", "a", "--url", temu.sample_url())
    temu.advance(3600)  # the task has ended: both listings below see the same record
    after = run(temu, "list", "--all", "--json")
    before = run(temu, "--json", "list", "--all")
    assert after.exit_code == 0 and after.stdout == before.stdout
    [voice] = json.loads(after.stdout.splitlines()[0])["voices"]
    assert voice["voice_name"] == "a" and voice["status"] == "succeed"
    assert json.loads(run(temu, "presets", "--json", "--page-size", "2").stdout)[1]["voice_id"]


def test_all_with_page_is_refused_and_empty_pages_say_so(temu: KlingEmulator) -> None:
    refused = run(temu, "list", "--all", "--page", "2")
    assert refused.exit_code == 2 and "--page" in refused.stderr
    assert temu.count() == 0
    empty = run(temu, "list", "--page", "3")
    assert empty.exit_code == 0 and empty.stdout.strip() == "no voice tasks on page 3"
    assert run(temu, "list", "--all").stdout.strip() == "no voice tasks"
    assert run(temu, "--json", "list").stdout.strip() == "[]"


def test_messages_name_the_flags_not_the_parameters(temu: KlingEmulator) -> None:
    """Bug 5."""
    neither = run(temu, "create", "--name", "x")
    assert neither.exit_code == 2 and "--url or --video-id" in neither.stderr
    assert "voice_url" not in neither.stderr
    size = run(temu, "list", "--page-size", "0")
    assert size.exit_code == 2 and "--page-size" in size.stderr and "page_size" not in size.stderr
    bad_url = run(temu, "create", "--name", "x", "--url", "ftp://host/a.wav")
    assert bad_url.exit_code == 2 and "--url must be an http(s) URL" in bad_url.stderr
    assert cli_words("give exactly one of task_id or external_task_id") == \
        "give a TASK_ID or --external-id"
    assert cli_words("voice_name is longer; --video-id ok") == "--name is longer; --video-id ok"
    assert temu.count("create") == 0


def test_authentication_failure_says_what_to_check(temu: KlingEmulator) -> None:
    result = CliRunner().invoke(cli, ["list"], env={**CLEAN_ENV, "KLING_API_KEY": "wrong-key",
                                                    "KLING_BASE_URL": temu.base_url})
    assert result.exit_code == 1 and "1002" in result.stderr
    for hint in ("key pair", "KLING_BASE_URL=https://api-beijing.klingai.com", "clock",
                 temu.base_url.split("//")[1]):
        assert hint in result.stderr
    assert "wrong-key" not in result.output
    assert "\x1b[" not in result.stderr  # colour only on a terminal


def test_a_refused_host_names_host_attempts_and_time() -> None:
    """Bug 8, refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = CliRunner().invoke(cli, ["--max-retries", "1", "get", "1"], env={
        **CLEAN_ENV, "KLING_API_KEY": "k", "KLING_BASE_URL": f"http://127.0.0.1:{port}"})
    assert result.exit_code == 1
    assert re.search(rf"no answer from 127\.0\.0\.1:{port} after 2 attempt\(s\) in "
                     r"\d+\.\ds", result.stderr), result.stderr
    assert "Traceback" not in result.output


def test_a_hanging_host_names_host_attempts_and_time() -> None:
    """Bug 8, a host that accepts and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        port = s.getsockname()[1]
        started = time.monotonic()
        result = CliRunner().invoke(
            cli, ["--request-timeout", "0.3", "--max-retries", "2", "list"],
            env={**CLEAN_ENV, "KLING_API_KEY": "k", "KLING_BASE_URL": f"http://127.0.0.1:{port}"})
        spent = time.monotonic() - started
    assert result.exit_code == 1
    match = re.search(rf"no answer from 127\.0\.0\.1:{port} after 3 attempt\(s\) in "
                      r"(\d+\.\d)s", result.stderr)
    assert match is not None, result.stderr
    assert 0.9 <= float(match.group(1)) <= spent + 0.1
    assert "no answer within 0.3s" in result.stderr and "--request-timeout" in result.stderr


def test_global_timeout_is_per_request_and_ignored_options_are_refused() -> None:
    """Bug 7."""
    old = run(None, "--timeout", "5", "list")
    assert old.exit_code == 2 and "Did you mean '--request-timeout'" in old.stderr
    assert "--request-timeout" in run(None, "--help").stdout
    refused = run(None, "--api-key", "X", "--request-timeout", "3", "mock-server")
    assert refused.exit_code == 2
    assert "--api-key, --request-timeout: not used by mock-server" in refused.stderr
    waitless = run(None, "create", "--name", "x", "--url", "https://x/a.wav", "--wait-timeout", "5")
    assert waitless.exit_code == 2 and "--wait-timeout: not used without --wait" in waitless.stderr
    demo_url = run(None, "--base-url", "http://127.0.0.1:9", "demo")
    assert demo_url.exit_code == 2 and "needs credentials" in demo_url.stderr


@pytest.mark.slow
def test_mock_server_takes_the_emulator_knobs() -> None:
    proc = _cli_proc(["mock-server", "--port", "0", "--json", "--profile", "strict-real",
                      "--webhook-secret", "whsec_dGVzdA==", "--concurrency", "2"], _env())
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        env = _env(KLING_API_KEY=info["api_key"], KLING_BASE_URL=info["base_url"])
        big = subprocess.run([sys.executable, "-m", "voiceapi", "list", "--page-size", "1000"],
                             env=env, capture_output=True, text=True, timeout=60, check=False)
        assert big.returncode == 1 and "1201" in big.stderr
        ok = subprocess.run([sys.executable, "-m", "voiceapi", "list", "--page-size", "500"],
                            env=env, capture_output=True, text=True, timeout=60, check=False)
        assert ok.returncode == 0 and "no voice tasks" in ok.stdout
    finally:
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in err


def test_mock_server_options_are_the_emulators() -> None:
    helped = run(None, "mock-server", "--help")
    for flag in ("--profile {strict-real}", "--list-order", "--deleted-voices", "--numeric-money",
                 "--webhook-secret", "--max-page-size"):
        assert flag in helped.stdout
    # The defaults shown are the ones this command uses, not the standalone emulator's.
    text = " ".join(helped.stdout.split())
    for shown in ("port (default 8787)", "to finish (default 5)", "(default local-api-key)"):
        assert shown in text
    assert "any free port" not in text and "(default 0.2)" not in text
    bad = run(None, "mock-server", "--port", "0", "--max-page-size", "5000")
    assert bad.exit_code == 2 and bad.stderr.startswith("error: max_page_size must be")
    unknown = run(None, "mock-server", "--colour", "red")
    assert unknown.exit_code == 2 and unknown.stderr.count("\n") == 1
    assert "unknown option '--colour'" in unknown.stderr
    typo = run(None, "mock-server", "--task-secnds", "2")
    assert typo.exit_code == 2 and "did you mean --task-seconds?" in typo.stderr


def test_mock_server_on_a_busy_port_is_a_usage_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        result = run(None, "mock-server", "--port", str(port))
    assert result.exit_code == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "--port 0" in result.stderr
    assert "Traceback" not in result.output


# --- manifests (bugs 2 and 6)

def _write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_manifest_row_without_voice_name_is_a_usage_error(tmp_path: Path,
                                                          temu: KlingEmulator) -> None:
    path = _write(tmp_path / "m.jsonl", json.dumps({"voice_name": "a", "voice_url":
                                                    temu.sample_url()}) + "\n"
                  + json.dumps({"voice_url": temu.sample_url()}) + "\n[1]\n")
    result = run(temu, "batch", str(path))
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "line 2: voice_name is missing" in result.stderr
    assert "line 3: expected an object" in result.stderr
    assert temu.count("create") == 0


def test_manifest_encoding(tmp_path: Path, temu: KlingEmulator) -> None:
    rows = f"voice_name,voice_url\nok,{temu.sample_url()}\nCaf\u00e9,{temu.sample_url()}\n"
    latin = _write(tmp_path / "latin.csv", rows.encode("cp1252"))
    result = run(temu, "batch", str(latin), "--dry-run")
    assert result.exit_code == 2
    assert "line 3 is not valid utf-8-sig" in result.stderr and "--encoding" in result.stderr
    fixed = run(temu, "--json", "batch", str(latin), "--dry-run", "--encoding", "cp1252")
    assert fixed.exit_code == 0 and json.loads(fixed.stdout) == {"valid": 2}
    bom = _write(tmp_path / "bom.csv", b"\xef\xbb\xbf" + rows.encode("utf-8"))
    assert json.loads(run(temu, "--json", "batch", str(bom), "--dry-run").stdout)["valid"] == 2
    dry = run(temu, "batch", str(bom), "--dry-run", "--report", "r.csv", "--max-in-flight", "2")
    assert dry.exit_code == 2
    assert "--max-in-flight, --report: not used with --dry-run" in dry.stderr
    unknown = run(temu, "batch", str(bom), "--encoding", "klingon-8")
    assert unknown.exit_code == 2 and "unknown --encoding" in unknown.stderr


@pytest.mark.parametrize(("name", "text", "expected"), [
    ("header.csv", "voice_name,voice_url\n", "has only a header"),
    ("empty.jsonl", "\n\n", "has no rows"),
    ("empty.json", "[]", "has no rows"),
    ("object.json", '{"voice_name": "a"}', "must be an array of objects"),
    ("cols.csv", "voice_name,voice_url,colour,size\na,https://x/a.wav,red,1\n"
                 "b,https://x/b.wav,blue,2\n", "unknown column(s) 'colour', 'size' in the header"),
    ("noname.csv", "voice_url\nhttps://x/a.wav\n", "needs a voice_name column"),
    ("wide.csv", "voice_name,voice_url\na,https://x/a.wav,extra\n",
     "line 2: more values than header columns"),
])
def test_manifest_shapes_refused_clearly(tmp_path: Path, name: str, text: str,
                                         expected: str) -> None:
    result = run(None, "batch", str(_write(tmp_path / name, text)), "--dry-run")
    assert result.exit_code == 2 and expected in result.stderr, result.stderr
    assert result.stderr.count(expected) == 1 and "Traceback" not in result.output


def test_manifest_json_array_and_trimmed_headers(tmp_path: Path, temu: KlingEmulator) -> None:
    arr = _write(tmp_path / "m.json", json.dumps([{"voice_name": f"j{i}", "voice_url":
                                                   temu.sample_url()} for i in range(3)]))
    assert json.loads(run(temu, "--json", "batch", str(arr), "--dry-run").stdout)["valid"] == 3
    spaced = _write(tmp_path / "s.csv", f" voice_name , voice_url \n a , {temu.sample_url()}\n")
    result = run(temu, "--json", "batch", str(spaced))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["results"][0]["task"]["voices"][0]["voice_name"] == "a"


def test_journal_in_a_missing_folder_is_a_usage_error(tmp_path: Path,
                                                      temu: KlingEmulator) -> None:
    path = _manifest(tmp_path, temu, [f"ok,{temu.sample_url()},"])
    result = run(temu, "batch", str(path), "--journal", str(tmp_path / "nope" / "j"))
    assert result.exit_code == 2 and "does not exist" in result.stderr
    report = run(temu, "batch", str(path), "--report", str(tmp_path / "r.txt"))
    assert report.exit_code == 2 and ".csv or .jsonl" in report.stderr
    assert temu.count("create") == 0


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_batch_report_maps_every_row(tmp_path: Path, temu: KlingEmulator, suffix: str) -> None:
    path = _manifest(tmp_path, temu, [f"a,{temu.sample_url()},", f"b,{temu.sample_url(2)},",
                                      f"c,{temu.sample_url(12)},"])
    report = tmp_path / f"results{suffix}"
    result = run(temu, "batch", str(path), "--report", str(report))
    assert result.exit_code == 1  # "b" is too short
    if suffix == ".csv":
        with open(report, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    else:
        rows = [json.loads(line) for line in report.read_text().splitlines()]
    assert [r["row"] for r in rows] == ["line 2", "line 3", "line 4"]
    assert [r["status"] for r in rows] == ["succeed", "failed", "succeed"]
    by_ext = {t["task_info"]["external_task_id"]: t for t in temu.tasks()}
    for r in rows:
        task = by_ext[r["external_task_id"]]
        assert r["task_id"] == task["task_id"]
        voices = task["task_result"]["voices"]
        assert r["voice_id"] == (voices[0]["voice_id"] if voices else "")
    assert "between 5s and 30s" in rows[1]["error"] and rows[0]["error"] == ""
    assert not list(tmp_path.glob("*.tmp"))


def test_batch_uses_a_default_journal_next_to_the_manifest(tmp_path: Path,
                                                          temu: KlingEmulator) -> None:
    path = _manifest(tmp_path, temu, [f"x{i},{temu.sample_url()}," for i in range(3)])
    assert run(temu, "batch", str(path)).exit_code == 0
    journal = tmp_path / "voices.csv.journal"
    assert len({json.loads(x)["ext"] for x in journal.read_text().splitlines()}) == 3
    assert run(temu, "batch", str(path)).exit_code == 0
    assert temu.task_count == 3


# --- tables (rich) ----------------------------------------------------------------------------

def test_tables_align_wide_characters_bound_messages_and_show_deleted_voices() -> None:
    with KlingEmulator(task_seconds=0.05, deleted_voices="mark") as emu:
        names = ["北京话播音员", "🎙️ host", "[red]plain"]
        for name in names:
            assert run(emu, "create", "--name", name, "--url", emu.sample_url()).exit_code == 0
        emu_long = "reason " * 30
        run(emu, "create", "--name", "bad", "--url",
            f"https://x.test/a-12s.wav?kling_fail={emu_long.replace(' ', '+')}")
        emu.advance(3600)  # every task has ended
        first = json.loads(run(emu, "--json", "get", "--external-id",
                               emu.tasks_by_name(names[0])[0]["task_info"]["external_task_id"])
                           .stdout)
        assert run(emu, "delete", first["voices"][0]["voice_id"]).exit_code == 0
        table = run(emu, "list").stdout
    lines = table.splitlines()
    assert all(line == line.rstrip() for line in lines)
    header = lines[0]
    for label in ("TASK ID", "VOICE ID", "VOICE NAME", "VOICE STATUS", "MESSAGE"):
        assert label in header
    status_col = cell_len(header[:header.index("VOICE STATUS")])
    rows = {next((n for n in names if n in line), "bad"): line for line in lines[2:]}
    assert len(rows) == 4 and " failed " in rows["bad"]
    for name, line in rows.items():  # columns line up by terminal cells, CJK and emoji too
        if name != "bad":
            cut = line.index(name) + len(name)
            assert cell_len(line[:cut]) <= status_col
            rest = line[cut:]
            assert cell_len(line[:cut]) + len(rest) - len(rest.lstrip()) == status_col
    assert "deleted" in rows[names[0]].split(names[0])[1]
    assert "[red]plain" in rows["[red]plain"]
    message = rows["bad"][header.index("MESSAGE"):]  # an ASCII row: characters are cells
    assert message.startswith("reason reason") and message.endswith("…")
    assert len(message) <= 40
    rule = lines[1]
    assert set(rule) == {"─"} and len(rule) == max(cell_len(x) for x in lines if x != rule)


def _stderr_on_a_terminal(args: list[str], env: dict[str, str]) -> tuple[int, bytes, str]:
    """Run the CLI with stderr on a pseudo-terminal: (exit code, stdout, what the terminal
    showed)."""
    master, slave = pty.openpty()
    chunks: list[bytes] = []

    def drain() -> None:
        with contextlib.suppress(OSError):
            while data := os.read(master, 4096):
                chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        proc = subprocess.run([sys.executable, "-m", "voiceapi", *args], env=env,
                              stdout=subprocess.PIPE, stderr=slave, timeout=120, check=False)
    finally:
        os.close(slave)
        reader.join(10)
        os.close(master)
    return proc.returncode, proc.stdout, b"".join(chunks).decode("utf-8", "replace")


@pytest.mark.slow
def test_progress_and_colour_appear_on_a_terminal_only(tmp_path: Path) -> None:
    with KlingEmulator(concurrency=3, task_seconds=0.2) as emu:
        path = _manifest(tmp_path, emu, [f"p{i},{emu.sample_url()}," for i in range(6)])
        code, stdout, shown = _stderr_on_a_terminal(["batch", str(path)], _env(emu))
        assert code == 0
        assert "6/6" in shown and "/s" in shown and "ETA" in shown and "slots" in shown
        assert b"\x1b[" not in stdout and b"ETA" not in stdout  # stdout is a pipe
        code, stdout, shown = _stderr_on_a_terminal(["get", "123"], _env(emu))
        assert code == 1 and "\x1b[31merror: " in shown and stdout == b""
        emu.task_seconds = 1.0
        code, stdout, shown = _stderr_on_a_terminal(
            ["create", "--name", "w", "--url", emu.sample_url(), "--wait", "--json"], _env(emu))
        task_id = json.loads(stdout)["task_id"]
        assert code == 0 and f"waiting for task {task_id}" in shown
    piped = run(None, "--json", "batch", str(path), "--dry-run")
    assert piped.stderr == ""


# --- Ctrl-C, pipes, failures

def test_json_on_a_failed_wait_prints_the_task_and_exits_1(temu: KlingEmulator) -> None:
    """Bug 4."""
    failed = run(temu, "--json", "create", "--name", "short", "--url", temu.sample_url(2),
                 "--wait")
    assert failed.exit_code == 1
    task = json.loads(failed.stdout)
    assert task["task_status"] == "failed" and task["task_id"] in failed.stderr
    again = run(temu, "wait", task["task_id"], "--json")
    assert again.exit_code == 1 and json.loads(again.stdout)["task_id"] == task["task_id"]


def _interrupt_when(proc: subprocess.Popen[str], ready: Callable[[], bool]) -> tuple[str, str]:
    try:
        for _ in range(600):  # at most 30 s
            if ready() or proc.poll() is not None:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        return proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_ctrl_c_while_waiting_exits_130_with_the_task_id() -> None:
    """Bug 3."""
    with KlingEmulator(task_seconds=120) as emu:
        created = json.loads(run(emu, "--json", "create", "--name", "slow", "--url",
                                 emu.sample_url()).stdout)
        gets = emu.count("get")
        proc = _cli_proc(["wait", created["task_id"]], _env(emu))
        _out, err = _interrupt_when(proc, lambda: emu.count("get") > gets)
    assert proc.returncode == 130
    assert f"voiceapi wait {created['task_id']}" in err and "Traceback" not in err
    assert "Aborted" not in err


def test_ctrl_c_during_create_wait_names_the_created_task() -> None:
    with KlingEmulator(task_seconds=120) as emu:
        proc = _cli_proc(["create", "--name", "slow", "--url", emu.sample_url(), "--wait"],
                         _env(emu))
        _out, err = _interrupt_when(proc, lambda: emu.count("get") > 0)
        task_id = emu.tasks()[0]["task_id"]
    assert proc.returncode == 130 and task_id in err and "Traceback" not in err


@pytest.mark.slow
def test_ctrl_c_during_a_batch_says_how_to_resume(tmp_path: Path) -> None:
    with KlingEmulator(concurrency=2, task_seconds=120) as emu:
        path = _manifest(tmp_path, emu, [f"c{i},{emu.sample_url()}," for i in range(4)])
        journal = tmp_path / "voices.csv.journal"
        proc = _cli_proc(["batch", str(path)], _env(emu))
        _out, err = _interrupt_when(proc, lambda: journal.exists() and
                                    len(journal.read_text().splitlines()) >= 2)
        assert proc.returncode == 130 and "Traceback" not in err
        assert f"--journal {journal}" in err and "resume" in err
        created = emu.task_count
        assert created >= 2
        emu.advance(200)  # the running voices finish while nobody watches
        emu.task_seconds, emu.processing_after = 0.1, 0.02  # and the rest go quickly
        again = subprocess.run([sys.executable, "-m", "voiceapi", "--json", "batch", str(path)],
                               env=_env(emu), capture_output=True, text=True, timeout=120,
                               check=False)
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["succeeded"] == 4
        exts = [t["task_info"]["external_task_id"] for t in emu.tasks()]
        assert len(exts) == 4 == len(set(exts))  # the resume created only the missing ones


def test_a_closed_pipe_ends_quietly_with_0() -> None:
    """Bug 9: `voiceapi --json presets --all | head -1`."""
    with KlingEmulator(presets=3000) as emu:
        piped = subprocess.run(
            ["bash", "-c", f"set -o pipefail; {shlex.quote(sys.executable)} -m voiceapi --json "
                           "presets --all --page-size 1000 | head -1"],
            env=_env(emu), capture_output=True, text=True, timeout=120, check=False)
        assert piped.returncode == 0, piped.stderr
        assert piped.stderr == "" and len(piped.stdout.splitlines()) == 1
        proc = _cli_proc(["presets"], _env(emu))  # the reader is gone before the first line
        assert proc.stdout is not None
        proc.stdout.close()
        _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and err == ""


@pytest.mark.parametrize("reading", [
    {"max_page_size": 500, "list_order": "oldest", "deleted_voices": "mark"},
    {"max_page_size": 1000, "list_order": "newest", "deleted_voices": "drop"},
    {"profile": "strict-real", "list_order": "newest", "numeric_money": True},
    {"deleted_voices": "mark", "voice_status": False},
])
def test_listing_under_each_reading_of_the_api(reading: dict[str, Any]) -> None:
    """Issue 10 item 3: every task listed, a deleted voice shown as deleted, whatever the
    server's page size, order, deleted-voice handling or number format."""
    with KlingEmulator(task_seconds=0.05, **reading) as emu:
        for i in range(3):
            assert run(emu, "create", "--name", f"r{i}", "--url", emu.sample_url()).exit_code == 0
        emu.advance(3600)  # every task has ended
        tasks = [json.loads(x) for x in run(emu, "--json", "list", "--all").stdout.splitlines()]
        assert sorted(t["voices"][0]["voice_name"] for t in tasks) == ["r0", "r1", "r2"]
        gone = next(t for t in tasks if t["voices"][0]["voice_name"] == "r1")
        assert run(emu, "delete", gone["voices"][0]["voice_id"]).exit_code == 0
        table = run(emu, "list", "--all")
        single = run(emu, "list", "--page-size", "500")
    assert table.exit_code == 0 and single.exit_code == 0
    assert table.stdout == single.stdout
    row = next(line for line in table.stdout.splitlines() if gone["task_id"] in line)
    if reading.get("deleted_voices") == "drop":
        assert row.rstrip().endswith("voice deleted") and "r1" not in row
    elif reading.get("voice_status") is False:
        assert "r1" in row  # a server that sends no voice status: nothing to show
    else:
        assert re.search(r"r1\s+deleted\b", row), row
    assert len(table.stdout.splitlines()) == 2 + 3


@pytest.mark.slow
def test_the_suite_passes_in_a_checkout_named_voiceapi(tmp_path: Path) -> None:
    """Bug 10: `git clone …/voiceapi.git` gives a folder named voiceapi; path-substring checks
    (\"/voiceapi/\" in a frame's file name) then mistake the tests' frames for the SDK's."""
    root = Path(__file__).resolve().parents[1]
    checkout = tmp_path / "voiceapi"
    skip = shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.journal", ".mypy_cache",
                                  ".ruff_cache", ".pytest_cache")
    for part in ("voiceapi", "tests"):
        shutil.copytree(root / part, checkout / part, ignore=skip)
    shutil.copy(root / "pyproject.toml", checkout)
    out = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                          "tests/test_hardening.py", "-k", "secrets"], cwd=checkout,
                         capture_output=True, text=True, timeout=120, check=False,
                         env=_env())
    assert out.returncode == 0, out.stdout[-2000:]
    assert "1 passed" in out.stdout


# --- voiceapi batch --redis (issue 14) ------------------------------------------------------

@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    from tests._redis_server import running_redis

    with running_redis() as server:
        yield server.url


@pytest.mark.slow
def test_batch_processes_share_one_account_through_redis(tmp_path: Path, redis_url: str) -> None:
    """Two `voiceapi batch --redis` processes given the same manifest: every voice is created
    once, both report every item ready, and the shared state lives under the namespace."""
    import redis

    namespace = f"cli-{os.getpid()}-{time.monotonic_ns()}"
    with KlingEmulator(concurrency=3, task_seconds=0.3) as emu:
        path = _manifest(tmp_path, emu, [f"s{i},{emu.sample_url()}," for i in range(12)])
        procs = [_cli_proc(["--json", "batch", str(path), "--redis", redis_url, "--namespace",
                            namespace, "--journal", str(tmp_path / f"w{n}.journal")], _env(emu))
                 for n in range(2)]
        outs = [p.communicate(timeout=120) for p in procs]
        for proc, (stdout, stderr) in zip(procs, outs, strict=True):
            assert proc.returncode == 0, stderr
            assert json.loads(stdout)["succeeded"] == 12
        exts = [t["task_info"]["external_task_id"] for t in emu.tasks()]
        assert len(exts) == 12 == len(set(exts))  # work shared, nothing created twice
        assert emu.peak_in_progress <= 3
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.keys(f"{{voiceapi:{namespace}}}*")
    finally:
        client.close()


def test_batch_redis_usage_errors(tmp_path: Path, temu: KlingEmulator) -> None:
    path = _manifest(tmp_path, temu, [f"ok,{temu.sample_url()},"])
    alone = run(temu, "batch", str(path), "--namespace", "n")
    assert alone.exit_code == 2 and "--namespace: not used without --redis" in alone.stderr
    bad = run(temu, "batch", str(path), "--redis", "http://127.0.0.1:6379")
    assert bad.exit_code == 2 and "redis://" in bad.stderr and "Traceback" not in bad.output
    dry = run(temu, "batch", str(path), "--dry-run", "--redis", "redis://127.0.0.1:1")
    assert dry.exit_code == 2 and "--redis: not used with --dry-run" in dry.stderr
    assert temu.count("create") == 0


def test_batch_redis_unreachable_is_one_clear_error(tmp_path: Path, temu: KlingEmulator) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = _manifest(tmp_path, temu, [f"ok,{temu.sample_url()},"])
    result = run(temu, "batch", str(path), "--redis", f"redis://:hunter2@127.0.0.1:{port}/0")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.stderr.startswith("error: ") and "hunter2" not in result.output
    assert temu.count("create") == 0


def test_batch_redis_without_the_extra_names_it(tmp_path: Path) -> None:
    path = _write(tmp_path / "m.csv", "voice_name,voice_url\na,https://x.test/a.wav\n")
    code = ("import sys; sys.modules['redis'] = None\n"
            "from voiceapi._cli import main\n"
            f"main(['batch', {str(path)!r}, '--redis', 'redis://127.0.0.1:1'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, env=_env(KLING_API_KEY="k",
                                              KLING_BASE_URL="http://127.0.0.1:9"), check=False)
    assert out.returncode == 2
    assert out.stderr.strip() == "error: --redis needs the redis extra: pip install " \
                                 "'voiceapi[redis]'"


def test_a_journal_the_batch_cannot_open_is_one_error(
        tmp_path: Path, temu: KlingEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    """The folder was writable when checked; then the disk filled up before the batch opened
    the journal (an OSError from the batch, not from the CLI's own checks)."""
    from voiceapi._local_coordinator import FileJournal

    def full(self: FileJournal, path: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(FileJournal, "__init__", full)
    path = _manifest(tmp_path, temu, [f"ok,{temu.sample_url()},"])
    result = run(temu, "batch", str(path), "--journal", str(tmp_path / "j"))
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: No space left on device: {tmp_path / 'j'}"
    assert temu.count("create") == 0


def test_an_interrupted_batch_ends_with_its_message_not_a_redrawn_bar(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Ctrl-C inside the batch's progress bar: the bar's last state stays, and the
    "interrupted … rerun to resume" message is the last thing on the terminal."""
    import types

    from rich.console import Console

    from voiceapi import BatchProgress
    from voiceapi._cli import _app, _output

    monkeypatch.setattr(_output, "_stderr_console", lambda: Console(
        file=sys.stderr, force_terminal=True, width=100, highlight=False))

    async def interrupted() -> None:
        raise KeyboardInterrupt

    state: Any = types.SimpleNamespace(doing="batch of 3 from v.csv; rerun to resume")
    with pytest.raises(SystemExit) as exit_info, _output.BatchBar() as bar:
        bar.update(BatchProgress(total=3, pending=1, submitted=1, processing=0, succeeded=1,
                                 failed=0, in_flight=1, slots=5))
        _app._run(state, interrupted)
    assert exit_info.value.code == 130
    err = capsys.readouterr().err
    assert "ok 1 failed 0" in err  # the bar was drawn
    tail = err.rstrip().rsplit("\n", 1)[-1]
    assert tail.endswith("interrupted: batch of 3 from v.csv; rerun to resume"), repr(err[-300:])


def test_the_batch_bar_estimates_rate_and_eta_from_waves_far_apart(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Voices end in waves (a slot's worth per task time). rich's own speed averages the last
    30 s of changes, so with 60 s tasks the bar said "–" throughout; ours is the average since
    the first report, counts down between reports, and ignores what a resume found done."""
    from rich.console import Console

    from voiceapi import BatchProgress
    from voiceapi._cli import _output

    monkeypatch.setattr(_output, "_stderr_console", lambda: Console(
        file=io.StringIO(), force_terminal=True, width=160))
    now = [1000.0]

    def progress(done: int) -> BatchProgress:
        return BatchProgress(total=100, pending=100 - done - 5, submitted=0, processing=5,
                             succeeded=done, failed=0, in_flight=5, slots=5)

    def shown(bar: _output.BatchBar) -> tuple[str, str]:
        assert bar._progress is not None
        task = bar._progress.tasks[0]
        rate, eta = (c.render(task) for c in bar._progress.columns
                     if isinstance(c, (_output._RateColumn, _output._EtaColumn)))
        return str(rate), str(eta)

    with _output.BatchBar(clock=lambda: now[0]) as bar:
        bar.update(progress(10))  # a resumed batch: 10 were done before this run
        assert shown(bar) == ("–/s", "-:--:--")
        now[0] += 60.0
        bar.update(progress(15))  # the first wave, a minute later
        assert shown(bar) == ("5.0/min", "0:17:00")  # 85 left at 5 a minute
        now[0] += 30.0  # no report for 30 s: the time left still counts down
        assert shown(bar) == ("5.0/min", "0:16:30")
        now[0] += 30.0
        bar.update(progress(20))
        assert shown(bar) == ("5.0/min", "0:16:00")
