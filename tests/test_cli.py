"""The CLI through its real entry point (click's runner, and subprocesses for the console)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from voiceapi._cli import cli
from voiceapi.testing import KlingEmulator

CLEAN_ENV: dict[str, str | None] = dict.fromkeys(
    ("KLING_ACCESS_KEY", "KLING_SECRET_KEY", "KLING_API_KEY", "KLING_BASE_URL"))


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
    assert out.stderr == ""


def test_demo_against_a_server_with_credentials(temu: KlingEmulator) -> None:
    result = run(temu, "demo", "--sample-url", temu.sample_url(9),
                 "--sample-url", temu.sample_url(14))
    assert result.exit_code == 0, result.output
    assert f"Using the Kling API at {temu.base_url}" in result.stdout
    assert temu.task_count == 2  # only the samples it was given
    # Deleted voices stay listed with status "deleted" (the emulator's default reading).
    deleted = [t for t in temu.tasks()
               if any(v.get("status") == "deleted" for v in t["task_result"]["voices"])]
    assert len(deleted) == 1  # it deletes one voice, and only one it created
    summary = run(temu, "--json", "demo")
    assert json.loads(summary.stdout.strip().splitlines()[-1])["tasks_listed"] == 2


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
