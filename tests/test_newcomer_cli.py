"""The command line under a hostile user: narrow terminals, stdouts that cannot encode or take
the text, manifests that are deep, endless or collide with the files the batch writes, bad
numbers, a server port out of range, Ctrl-C before the command runs. Each test failed on the
code before its fix (session 5, helper "newcomer")."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.cells import cell_len

from tests.conftest import scaled_examples
from voiceapi._cli import _manifest
from voiceapi._cli._app import cli
from voiceapi.testing import KlingEmulator

CLEAN_ENV: dict[str, str | None] = dict.fromkeys(
    ("KLING_ACCESS_KEY", "KLING_SECRET_KEY", "KLING_API_KEY", "KLING_BASE_URL", "COLUMNS",
     "LINES", "VOICEAPI_LOG"))


@pytest.fixture
def temu() -> Iterator[KlingEmulator]:
    with KlingEmulator(concurrency=5, task_seconds=0.05) as emu:
        yield emu


def run(emu: KlingEmulator | None, *args: str, **env: str) -> Result:
    full: dict[str, str | None] = dict(CLEAN_ENV)
    if emu is not None:
        full.update(KLING_API_KEY=emu.api_key, KLING_BASE_URL=emu.base_url)
    full.update(env)
    return CliRunner().invoke(cli, list(args), env=full, catch_exceptions=False)


def _env(emu: KlingEmulator | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KLING_", "VOICEAPI_LOG")) and k not in ("COLUMNS", "LINES")}
    if emu is not None:
        env.update(KLING_API_KEY=emu.api_key, KLING_BASE_URL=emu.base_url)
    env.update(extra)
    return env


def cli_run(args: list[str | bytes], env: dict[str, str], **kw: object) -> \
        subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "voiceapi", *args], env=env,  # type: ignore[call-overload,no-any-return]
                          capture_output=True, timeout=120, check=False, **kw)


def _no_traceback(text: str | bytes) -> None:
    assert ("Traceback" not in text) if isinstance(text, str) else (b"Traceback" not in text)


# --- tables on narrow terminals -------------------------------------------------------------------

def _tasks(emu: KlingEmulator, n: int) -> list[dict[str, object]]:
    for i in range(n):
        assert run(emu, "create", "--name", f"Speaker number {i}", "--url",
                   emu.sample_url() + ("?kling_fail=the+sample+is+too+noisy+to+use" if i == 0
                                       else "")).exit_code == 0
    emu.advance(3600)
    return [json.loads(x) for x in run(emu, "--json", "list", "--all").stdout.splitlines()]


@pytest.mark.parametrize("columns", [20, 40, 80, 120, 200])
def test_a_narrow_terminal_never_drops_a_column_or_cuts_an_id(temu: KlingEmulator,
                                                              columns: int) -> None:
    """At 80 columns (a default terminal) the task table lost its STATUS column and cut the
    external ids; at 40 only the two id columns were left, at 20 one. Now names and messages
    shrink, and a table that still does not fit is drawn wider (one line per row)."""
    tasks = _tasks(temu, 3)
    shown = run(temu, "list", COLUMNS=str(columns))
    assert shown.exit_code == 0
    lines = shown.stdout.splitlines()
    assert len(lines) == 2 + len(tasks)  # header, rule, one line per task
    assert lines[0].split()[:3] == ["TASK", "ID", "STATUS"] and lines[0].endswith("MESSAGE")
    for task in tasks:
        voice = task["voices"][0] if task["voices"] else {}  # type: ignore[index]
        row = next(x for x in lines if x.startswith(str(task["task_id"])))
        for value in (task["external_task_id"], voice.get("voice_id"), task["task_status"]):
            if value:
                assert re.search(rf"(?<!\w){re.escape(str(value))}(?![\w-])", row), (value, row)
    assert "the sample" in shown.stdout  # the failed task's message, maybe cut
    natural = run(temu, "list", COLUMNS="1000").stdout.splitlines()
    if cell_len(natural[0]) <= columns:  # it fits: unchanged
        assert lines == natural
    else:  # names and messages gave up what they could: 10 and 12 cells, then "…"
        assert cell_len(lines[0]) < cell_len(natural[0])
        assert "…" in shown.stdout
    presets = run(temu, "presets", "--page-size", "3", COLUMNS=str(columns))
    for voice in json.loads(run(temu, "--json", "presets", "--page-size", "3").stdout):
        row = next(x for x in presets.stdout.splitlines() if x.startswith(voice["voice_id"]))
        assert voice["trial_url"] in row and "kling" in row


def test_a_wide_table_is_unchanged(temu: KlingEmulator) -> None:
    """Wide enough: one row per task, in columns, as before."""
    tasks = _tasks(temu, 2)
    lines = run(temu, "list", COLUMNS="200").stdout.splitlines()
    assert lines[0].split() == ["TASK", "ID", "STATUS", "VOICE", "ID", "VOICE", "NAME", "VOICE",
                                "STATUS", "EXTERNAL", "ID", "MESSAGE"]
    assert len(lines) == 2 + len(tasks)


# --- stdout that cannot take the text -------------------------------------------------------------

def test_a_stdout_that_cannot_encode_the_names_still_gets_every_row() -> None:
    """A Windows pipe (cp1252) and a voice named in Chinese: UnicodeEncodeError traceback."""
    with KlingEmulator(task_seconds=0.05) as emu:
        name = "中文 voice 😀"
        assert run(emu, "create", "--name", name, "--url", emu.sample_url()).exit_code == 0
        emu.advance(60)
        env = _env(emu, PYTHONIOENCODING="cp1252")
        table = cli_run(["list"], env)
        page = cli_run(["--json", "list"], env)
        every = cli_run(["--json", "list", "--all"], env)
    assert table.returncode == 0, table.stderr
    _no_traceback(table.stderr)
    lines = table.stdout.decode("cp1252").splitlines()
    assert set(lines[1]) == {"-"}  # the rule in a character the pipe can carry
    row = next(x for x in lines if "\\u4e2d" in x)  # the name escaped, and still aligned
    assert row.index("succeed", row.index("\\u4e2d")) == lines[0].index("VOICE STATUS")
    assert page.returncode == 0 and every.returncode == 0, (page.stderr, every.stderr)
    assert json.loads(page.stdout)[0]["voices"][0]["voice_name"] == name
    assert json.loads(every.stdout.splitlines()[0])["voices"][0]["voice_name"] == name


def test_a_report_path_that_is_not_utf8_is_printed_without_a_traceback(tmp_path: Path) -> None:
    """A file name in another encoding (bytes that are not UTF-8) under a UTF-8 locale."""
    folder = os.fsencode(tmp_path)
    with KlingEmulator(task_seconds=0.05) as emu:
        manifest = folder + b"/voices-\xff.csv"
        report = folder + b"/report-\xfe.csv"
        with open(manifest, "w", encoding="utf-8") as fh:
            fh.write(f"voice_name,voice_url\na,{emu.sample_url()}\n")
        done = cli_run(["batch", manifest, "--report", report], _env(emu, PYTHONIOENCODING="utf-8"))
    assert done.returncode == 0, done.stderr
    _no_traceback(done.stderr)
    assert b"1 of 1 voices ready" in done.stdout and os.path.exists(report)


def test_a_stdout_that_fails_or_is_closed_is_one_error() -> None:
    """A full disk (/dev/full) or a closed stdout: OSError / AttributeError tracebacks."""
    with KlingEmulator() as emu:
        with open("/dev/full", "w") as dev_full:
            full = subprocess.run([sys.executable, "-m", "voiceapi", "presets"], env=_env(emu),
                                  stdout=dev_full, stderr=subprocess.PIPE, text=True,
                                  timeout=120, check=False)
        closed = subprocess.run(
            ["bash", "-c", f"{shlex.quote(sys.executable)} -m voiceapi presets >&-"],
            env=_env(emu), capture_output=True, text=True, timeout=120, check=False)
    assert full.returncode == 1 and "error: cannot write the output" in full.stderr
    assert "No space left" in full.stderr
    _no_traceback(full.stderr)
    assert closed.returncode == 1 and "error: cannot write the output" in closed.stderr
    _no_traceback(closed.stderr)


# --- manifests ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "text"), [
    ("deep.json", "[" * 100_000 + "]" * 100_000),
    ("deep.jsonl", '{"voice_name": ' + "[" * 100_000 + "]" * 100_000 + "}\n"),
])
def test_a_deeply_nested_json_manifest_is_refused(tmp_path: Path, name: str, text: str) -> None:
    """json.loads raised RecursionError: a traceback."""
    path = tmp_path / name
    path.write_text(text)
    result = run(None, "batch", str(path), "--dry-run")
    assert result.exit_code == 2 and "nested too deeply" in result.stderr, result.stderr


def test_a_lone_surrogate_in_a_json_manifest_names_the_row(tmp_path: Path) -> None:
    """"\\udcff" in JSON is a lone surrogate: the batch's id hashing raised
    UnicodeEncodeError before the row was validated."""
    path = tmp_path / "m.json"
    path.write_text('[{"voice_name": "ok", "voice_url": "https://e.com/a-12s.wav"},'
                    ' {"voice_name": "bad\\udcff", "voice_url": "https://e.com/b-12s.wav"}]')
    result = run(None, "batch", str(path), "--dry-run")
    assert result.exit_code == 2, result.output
    assert "item 2: voice_name" in result.stderr and "surrogate" in result.stderr


def test_library_create_many_reports_a_lone_surrogate_as_a_validation_error() -> None:
    from voiceapi._batch import prepare
    from voiceapi._errors import ValidationError

    entries = prepare([{"voice_name": "bad\udcff", "voice_url": "https://e.com/a-12s.wav"}])
    assert isinstance(entries[0].error, ValidationError)


def test_a_manifest_that_never_ends_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """/dev/zero (or a runaway FIFO) was read whole: MemoryError, or the machine's memory."""
    monkeypatch.setattr(_manifest, "MANIFEST_MAX_BYTES", 1 << 20)
    result = run(None, "batch", "/dev/zero", "--dry-run")
    assert result.exit_code == 2 and "larger than 1 MiB" in result.stderr, result.stderr


@pytest.mark.parametrize("collision", ["report", "journal", "report-journal", "spelling"])
def test_outputs_that_would_overwrite_the_manifest_are_refused(
        tmp_path: Path, temu: KlingEmulator, collision: str) -> None:
    """`--report voices.csv` replaced the manifest with the report; `--journal voices.jsonl`
    appended journal lines into it (the rerun then refused every line)."""
    suffix = ".jsonl" if collision == "journal" else ".csv"
    manifest = tmp_path / f"voices{suffix}"
    text = (json.dumps({"voice_name": "a", "voice_url": temu.sample_url()}) + "\n"
            if suffix == ".jsonl" else f"voice_name,voice_url\na,{temu.sample_url()}\n")
    manifest.write_text(text)
    other = tmp_path / "out.csv"
    args = {"report": ["--report", str(manifest)],
            "journal": ["--journal", str(manifest)],
            "report-journal": ["--report", str(other), "--journal", str(other)],
            "spelling": ["--report", f"{tmp_path}/./voices.csv"]}[collision]
    result = run(temu, "batch", str(manifest), *args)
    assert result.exit_code == 2, result.output
    assert "same file" in result.stderr
    assert manifest.read_text() == text and temu.count("create") == 0


def test_a_csv_error_names_the_line_it_is_on(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text("voice_name,voice_url\nok,https://e.com/a.wav\nok2,https://e.com/b.wav\n"
                    + "v" * 200_000 + ",https://e.com/c.wav\n")
    result = run(None, "batch", str(path), "--dry-run")
    assert result.exit_code == 2 and "line 4: field larger than field limit" in result.stderr


# --- numbers and flags ----------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "flag"), [
    (["--request-timeout", "nan", "get", "1"], "--request-timeout"),
    (["--request-timeout", "inf", "get", "1"], "--request-timeout"),
    (["wait", "1", "--timeout", "nan"], "--timeout"),
    (["wait", "1", "--poll-interval", "inf"], "--poll-interval"),
    (["create", "--name", "a", "--url", "https://e.com/a.wav", "--wait", "--wait-timeout", "nan"],
     "--wait-timeout"),
    (["batch", "m.csv", "--timeout", "nan"], "--timeout"),
    (["demo", "--task-seconds", "nan"], "--task-seconds"),
    (["demo", "--task-seconds", "inf"], "--task-seconds"),
])
def test_numbers_that_are_not_finite_name_the_flag(tmp_path: Path, args: list[str], flag: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """nan and inf passed click's FloatRange: `demo --task-seconds nan` was a ValueError
    traceback, `inf` a demo that never ends, the others named the SDK's `timeout`."""
    (tmp_path / "m.csv").write_text("voice_name,voice_url\na,https://e.com/a.wav\n")
    monkeypatch.chdir(tmp_path)
    result = run(None, *args, KLING_API_KEY="k", KLING_BASE_URL="http://127.0.0.1:9")
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{flag}'" in result.stderr, result.stderr


@pytest.mark.parametrize(("args", "expected"), [
    (["--port", "99999"], "--port must be between 0 and 65535 (0 picks a free one)"),
    (["--port", "-1"], "--port must be between 0 and 65535 (0 picks a free one)"),
    (["--port", "abc"], "argument --port: invalid int value: 'abc'"),
])
def test_mock_server_bad_values_are_one_line(args: list[str], expected: str) -> None:
    """A port out of range was an OverflowError traceback; a bad value printed argparse's whole
    usage block."""
    result = run(None, "mock-server", *args)
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [f"error: {expected}; see voiceapi mock-server "
                                                  "--help"], result.stderr


def test_mock_server_export_lines_are_shell_quoted() -> None:
    """The `export` lines are meant to be pasted into a shell: a key with a space, `;` or `$`
    ran as a command."""
    key = "key with spaces; touch pwned $HOME"
    proc = subprocess.Popen([sys.executable, "-m", "voiceapi", "mock-server", "--port", "0",
                             "--api-key", key], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(3)]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
    export = next(x for x in lines if x.startswith("export KLING_API_KEY="))
    assert shlex.split(export) == ["export", f"KLING_API_KEY={key}"]


def test_ctrl_c_before_the_command_runs_exits_130_quietly() -> None:
    """A Ctrl-C while the command line was still importing its modules was a traceback."""
    code = ("import sys\n"
            "class Interrupted:\n"
            "    def __getattr__(self, name):\n"
            "        raise KeyboardInterrupt\n"
            "sys.modules['voiceapi._cli._app'] = Interrupted()\n"
            "from voiceapi._cli import main\n"
            "main(['list'])\n")
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 130 and out.stderr.strip() == "interrupted", out.stderr


def test_a_bad_voiceapi_log_is_one_warning_line(temu: KlingEmulator) -> None:
    """The warning module printed a source path and a line of the SDK's code."""
    out = cli_run(["presets", "--page-size", "1"], _env(temu, VOICEAPI_LOG="loud"))
    assert out.returncode == 0
    assert out.stderr.decode().splitlines() == [
        "warning: VOICEAPI_LOG='loud' is not one of debug, info, warning, error, off; "
        "logging stays off"]


def test_a_journal_that_is_not_a_regular_file_is_refused(tmp_path: Path,
                                                         temu: KlingEmulator) -> None:
    """`--journal /dev/full` read the device back as an endless line (the batch was killed for
    its memory); `--journal /dev/null` ran a batch whose journal could never resume it."""
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"voice_name,voice_url\na,{temu.sample_url()}\n")
    result = run(temu, "batch", str(manifest), "--journal", os.devnull)
    assert result.exit_code == 2 and "not a regular file" in result.stderr, result.output
    assert temu.count("create") == 0


def test_a_redis_url_redis_cannot_parse_is_a_usage_error(tmp_path: Path) -> None:
    manifest = tmp_path / "m.csv"
    manifest.write_text("voice_name,voice_url\na,https://e.com/a-12s.wav\n")
    result = run(None, "batch", str(manifest), "--redis", "redis://:pw-secret@127.0.0.1:99999/0",
                 KLING_API_KEY="k", KLING_BASE_URL="http://127.0.0.1:9")
    assert result.exit_code == 2, result.output
    assert "Redis URL is not valid: Port out of range" in result.stderr
    assert "pw-secret" not in result.output


def test_library_redis_coordinator_refuses_a_bad_port_with_a_validation_error() -> None:
    pytest.importorskip("redis")
    from voiceapi._errors import ValidationError
    from voiceapi.coordination import RedisCoordinator

    for url in ("redis://:pw-secret@127.0.0.1:99999/0", "redis://:pw-secret@127.0.0.1:x/0"):
        with pytest.raises(ValidationError, match="Redis URL is not valid") as refused:
            RedisCoordinator(url)
        assert "pw-secret" not in str(refused.value)


def _on_a_terminal(args: list[str], env: dict[str, str], columns: int = 200) -> str:
    """What a terminal of ``columns`` columns shows (stdout and stderr on one pseudo-terminal)."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    try:
        proc = subprocess.Popen([sys.executable, "-m", "voiceapi", *args], env=env,
                                stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    finally:
        os.close(slave)
    chunks = []
    try:
        for _ in range(100_000):  # bounded: ends at the child's exit (EIO) long before
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
        proc.wait(60)
    return b"".join(chunks).decode("utf-8", "replace")


@pytest.mark.parametrize("setting", [{"NO_COLOR": "1"}, {"TERM": "dumb"}])
def test_no_color_and_a_dumb_terminal_get_no_colour(temu: KlingEmulator,
                                                    setting: dict[str, str]) -> None:
    """NO_COLOR (no-color.org) and TERM=dumb were ignored: green statuses, red errors."""
    _tasks(temu, 2)
    for args, columns in ((["list"], 200), (["list"], 60), (["get", "1"], 200)):
        shown = _on_a_terminal(args, _env(temu, **setting), columns)
        assert "succeed" in shown or "error: Task not found" in shown, shown
        assert not re.search(r"\x1b\[(3\d|9\d)m", shown), (args, columns, shown)
    coloured = _on_a_terminal(["get", "1"], _env(temu, TERM="xterm"))
    assert "\x1b[31merror:" in coloured  # the check above can see colour


def test_demo_refuses_a_bad_sample_url_before_sending(temu: KlingEmulator) -> None:
    """It was sent as a batch item, reported as a failed voice (exit 1, "voice_url …")."""
    bad = run(temu, "demo", "--sample-url", temu.sample_url(), "--sample-url", "notaurl")
    assert bad.exit_code == 2, bad.output
    assert bad.stderr.strip() == "error: --sample-url 'notaurl': must be an http(s) URL"
    assert temu.count("create") == 0 and temu.count("presets") == 0
    one = run(temu, "demo", "--sample-url", temu.sample_url())
    assert one.exit_code == 0, one.output
    assert "Cloning 1 voice as one batch" in one.stdout


def test_unknown_keys_and_columns_are_escaped_and_bounded(tmp_path: Path) -> None:
    """A JSON key "\\u001b]0;pwned\\u0007" reached the terminal raw (it retitles it); a header
    with 5000 unknown columns made a 700 kB message."""
    keys = tmp_path / "m.jsonl"
    keys.write_text('{"voice_name": "a", "\\u001b]0;pwned\\u0007": 1}\n')
    result = run(None, "batch", str(keys), "--dry-run")
    assert result.exit_code == 2 and "\x1b" not in result.stderr and "\x07" not in result.stderr
    assert r"unknown key(s) '\x1b]0;pwned\x07'" in result.stderr, result.stderr
    wide = tmp_path / "wide.csv"
    wide.write_text(",".join(["voice_name", *(f"column{i}" * 20 for i in range(5000))])
                    + "\na\n")
    result = run(None, "batch", str(wide), "--dry-run")
    assert result.exit_code == 2 and "and 4995 more" in result.stderr
    assert len(result.stderr) < 1000, len(result.stderr)


def test_every_command_against_a_mock_server_that_answers_garbage() -> None:
    """`voiceapi mock-server --fault …` scripts faults (the emulator had them, the command
    line could not reach them); every command then fails with one error line and exit 1, no
    traceback and no key."""
    secret = "sk-mock-secret-0123456789abcdef"
    server = subprocess.Popen(
        [sys.executable, "-m", "voiceapi", "mock-server", "--port", "0", "--json",
         "--task-seconds", "0.05", "--api-key", secret,
         "--fault", "get:garbage:50", "--fault", "list:truncated:50",
         "--fault", "presets:html502:50", "--fault", "delete:reset:50"],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        info = json.loads(server.stdout.readline())
        env = _env(KLING_API_KEY=secret, KLING_BASE_URL=info["base_url"])
        for args, expected in (
                (["get", "1"], "not a Kling JSON envelope"),
                (["--json", "list"], "not a Kling JSON envelope"),
                (["presets"], "HTTP 502 without a Kling JSON envelope"),
                (["delete", "1"], "no answer from"),
                (["wait", "1", "--timeout", "5"], "not a Kling JSON envelope")):
            done = cli_run(["--max-retries", "1", *args], env)
            err = done.stderr.decode()
            assert done.returncode == 1 and err.startswith("error: ") and expected in err, \
                (args, err)
            _no_traceback(err)
            assert secret.encode() not in done.stdout + done.stderr and done.stdout == b""
    finally:
        server.send_signal(signal.SIGINT)
        server.communicate(timeout=30)
    assert server.returncode == 0


@pytest.mark.parametrize(("fault", "expected"), [
    ("get:nope", "unknown fault 'nope'"),
    ("bogus:garbage", "unknown route 'bogus'"),
    ("get:garbage:0", "TIMES must be at least 1"),
    ("get:garbage:x", "invalid literal"),
])
def test_mock_server_refuses_a_bad_fault(fault: str, expected: str) -> None:
    result = run(None, "mock-server", "--port", "0", "--fault", fault)
    assert result.exit_code == 2 and expected in result.stderr, result.output
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(("data", "expected"), [
    ("voice_name,voice_url\na,https://e.com/a.wav\n".encode("utf-16"),
     "is UTF-16 (it starts with its byte-order mark): give --encoding utf-16"),
    (b"voice_name;voice_url\na;https://e.com/a.wav\n",
     "the header is one column holding ';': a CSV manifest is separated by commas"),
    (b"voice_name\tvoice_url\na\thttps://e.com/a.wav\n",
     "the header is one column holding '\\t'"),
], ids=["utf-16", "semicolons", "tabs"])
def test_spreadsheet_exports_get_the_right_hint(tmp_path: Path, data: bytes,
                                                expected: str) -> None:
    """Excel's "Unicode text" (UTF-16) was told to try --encoding cp1252; a ";"-separated
    export was told its whole header was one unknown column."""
    path = tmp_path / "voices.csv"
    path.write_bytes(data)
    result = run(None, "batch", str(path), "--dry-run")
    assert result.exit_code == 2 and expected in result.stderr, result.stderr
    if data.startswith(b"\xff\xfe"):
        fixed = run(None, "--json", "batch", str(path), "--dry-run", "--encoding", "utf-16")
        assert json.loads(fixed.stdout) == {"valid": 1}


_CELL = st.text(st.characters(codec="utf-8"), max_size=30)  # utf-8: no lone surrogates


@settings(max_examples=scaled_examples(80), deadline=None)
@given(rows=st.lists(st.tuples(st.from_regex(r"[0-9a-z-]{1,45}", fullmatch=True), _CELL, _CELL,
                               st.sampled_from(["succeed", "failed", "processing", ""])),
                     min_size=1, max_size=4),
       width=st.integers(min_value=1, max_value=260))
def test_any_table_keeps_every_id_and_status_on_one_line_per_row(
        rows: list[tuple[str, str, str, str]], width: int) -> None:
    """Whatever the terminal's width and the names (CJK, emoji, control characters): one line
    per row, ids and statuses whole, and within the width whenever the shrunk table fits."""
    from voiceapi._cli import _output
    from voiceapi._errors import printable

    columns = (("ID", "id"), ("NAME", "name"), ("MESSAGE", "message"), ("STATUS", "short"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_output, "_width", lambda: width)
        lines = _output.render_table(columns, rows).splitlines()
    assert len(lines) == 2 + len(rows)
    for (ident, name, _message, status), line in zip(rows, lines[2:], strict=True):
        assert line.startswith(ident + " ") or line == ident
        assert line.rstrip().endswith(status) or not status
        if cell_len(printable(name)) <= 10:  # short names are never cut
            assert printable(name) in line
    shrunk = max(len(r[0]) for r in rows) + 10 + 12 + 10 + 3 * 3
    if shrunk <= width:
        assert all(cell_len(line) <= width for line in lines), (width, lines)


def test_the_csv_report_never_holds_a_spreadsheet_formula(tmp_path: Path,
                                                          temu: KlingEmulator) -> None:
    """A failed task's message is the server's text and names are the manifest's: a cell
    starting with "=" ran as a formula when the report was opened in a spreadsheet."""
    formula = '=HYPERLINK("http://evil.example","x")'
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        json.dumps({"voice_name": "=1+1", "voice_url": temu.sample_url()}) + "\n"
        + json.dumps({"voice_name": "fine", "voice_url": temu.sample_url() + "?kling_fail="
                      + formula}) + "\n")
    csv_report, jsonl_report = tmp_path / "r.csv", tmp_path / "r.jsonl"
    assert run(temu, "batch", str(manifest), "--report", str(csv_report)).exit_code == 1
    with csv_report.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows[0]["voice_name"] == "'=1+1" and rows[1]["error"].startswith("voice task ")
    assert formula in rows[1]["error"]
    cells = [cell for row in rows for cell in row.values()]
    assert not any(cell.startswith(("=", "+", "-", "@")) for cell in cells), cells
    assert run(temu, "batch", str(manifest), "--report", str(jsonl_report)).exit_code == 1
    first = json.loads(jsonl_report.read_text().splitlines()[0])
    assert first["voice_name"] == "=1+1"  # JSON lines are data, not a spreadsheet: unchanged


def test_json_lines_in_a_json_file_are_told_to_use_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "voices.json"
    path.write_text('{"voice_name": "a", "voice_url": "https://e.com/a.wav"}\n'
                    '{"voice_name": "b", "voice_url": "https://e.com/b.wav"}\n')
    result = run(None, "batch", str(path), "--dry-run")
    assert result.exit_code == 2 and "name the file .jsonl" in result.stderr, result.stderr


def test_emulator_standalone_port_out_of_range_is_one_line() -> None:
    out = subprocess.run([sys.executable, "-m", "voiceapi.testing", "--port", "99999"],
                         env=_env(), capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr


def test_demo_on_your_server_expects_no_failure_whatever_the_sample_urls(
        temu: KlingEmulator) -> None:
    """The embedded emulator's deliberately bad sample was recognised by "-3s." in its URL, so
    your own sample named like that made a demo where every voice succeeded exit 1."""
    result = run(temu, "--json", "demo", "--sample-url", "https://example.com/take-3s.mp3.wav")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.splitlines()[-1])
    assert summary["created"] == 1 and summary["failed"] == 0


def test_a_piped_manifest_needs_a_journal_path(tmp_path: Path, temu: KlingEmulator) -> None:
    """`voiceapi batch <(grep … voices.csv)` put its journal at /dev/fd/63.journal ("cannot
    write it"); `batch /dev/stdin` run as root created /dev/stdin.journal."""
    (tmp_path / "m.csv").write_text(f"voice_name,voice_url\na,{temu.sample_url()}\n")
    line = f"{shlex.quote(sys.executable)} -m voiceapi batch <(cat m.csv)"
    piped = subprocess.run(["bash", "-c", line], env=_env(temu), cwd=tmp_path,
                           capture_output=True, text=True, timeout=120, check=False)
    assert piped.returncode == 2, piped.stderr
    assert "is not a regular file (a pipe?): give --journal PATH" in piped.stderr
    assert temu.count("create") == 0
    journal = tmp_path / "j.journal"
    done = subprocess.run(["bash", "-c", f"{line} --journal {journal}"], env=_env(temu),
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert journal.exists() and temu.count("create") == 1


def test_a_taken_external_id_says_which_task_has_it(temu: KlingEmulator) -> None:
    args = ("create", "--name", "dup", "--url", temu.sample_url(), "--external-id", "mine-1")
    first = run(temu, "--json", *args)
    assert first.exit_code == 0
    again = run(temu, *args)
    assert again.exit_code == 1 and again.stderr.startswith("error: ")
    task_id = json.loads(first.stdout)["task_id"]
    assert f"give another --external-id, or see the task that has it: voiceapi get {task_id}" \
        in again.stderr


def test_a_batch_with_refused_credentials_says_what_to_check(tmp_path: Path,
                                                            temu: KlingEmulator) -> None:
    """Every row said "Authorization is invalid (code=1002, ht…", cut by the table, without
    the hints every other command gives (key pair, region, clock)."""
    manifest = tmp_path / "m.csv"
    manifest.write_text("voice_name,voice_url\n" + "".join(
        f"v{i},{temu.sample_url()}\n" for i in range(3)))
    result = run(temu, "batch", str(manifest), KLING_API_KEY="not-the-key-0123456789")
    assert result.exit_code == 1
    assert result.stderr.count("error: Authorization is invalid (code=1002") == 1
    assert "check the key pair" in result.stderr and "check the region" in result.stderr
    assert "not-the-key-0123456789" not in result.output
    assert "errors are cut short in the table: --report FILE" in result.stdout


def test_a_right_to_left_override_in_a_name_cannot_disguise_its_row(temu: KlingEmulator) -> None:
    """U+202E in a voice name (server text) went to the terminal raw: the rest of the row is
    then drawn reversed, so the ids and statuses after the name read as something else."""
    name = "ab\u202ecd\u2066e"
    assert run(temu, "create", "--name", name, "--url", temu.sample_url()).exit_code == 0
    temu.advance(60)
    table = run(temu, "list", COLUMNS="200")
    assert "\u202e" not in table.stdout and "\u2066" not in table.stdout
    assert "ab\\u202ecd\\u2066e" in table.stdout
    tasks = json.loads(run(temu, "--json", "list").stdout)
    assert tasks[0]["voices"][0]["voice_name"] == name  # --json keeps the data as it is
    missing = run(temu, "get", "--external-id", "x\u202eyz")  # echoed in the server's error
    assert missing.exit_code == 1 and "\u202e" not in missing.stderr
    assert "x\\u202eyz" in missing.stderr, missing.stderr


def test_library_printable_escapes_bidirectional_overrides() -> None:
    from voiceapi._errors import printable

    assert "\u202e" not in printable("Task not found: ab\u202ecd")


def test_a_server_that_echoes_the_key_in_its_data_never_gets_it_printed(tmp_path: Path) -> None:
    """The SDK masks what it sent only in its errors' messages: a server echoing the API key in
    a task's message, voice name or external id put it on stdout (tables and --json), in the
    error line of a failed wait, and in the batch report."""
    import http.server
    import threading

    key = "sk-live-0123456789abcdef"
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJpc3MiOiJha2V5In0.c2lnbmF0dXJl"
    task: dict[str, Any] = {"task_id": "930000000000000001", "task_status": "failed",
            "task_status_msg": f"rejected {key} and {jwt}",
            "task_info": {"external_task_id": f"ext-{key}"},
            "task_result": {"voices": [{"voice_id": "v1", "voice_name": key}]}}

    class Echo(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            listing = self.path.startswith("/v1/general/custom-voices?")
            self._send({"code": 0, "message": "ok", "request_id": "r",
                        "data": [task] if listing else task})

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            self._send({"code": 0, "message": "ok", "request_id": "r", "data": task})

        def _send(self, envelope: dict[str, object]) -> None:
            body = json.dumps(envelope).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    thread = threading.Thread(target=server.serve_forever)
    thread.start()
    manifest = tmp_path / "m.csv"
    manifest.write_text("voice_name,voice_url\na,https://e.com/a-12s.wav\n")
    report = tmp_path / "r.jsonl"
    try:
        env = {"KLING_API_KEY": key, "KLING_BASE_URL": f"http://127.0.0.1:{server.server_port}"}
        results = [run(None, *args, **env) for args in (
            ["get", task["task_id"]], ["--json", "get", task["task_id"]], ["list"],
            ["--json", "list", "--all"], ["wait", task["task_id"]], ["get", "1"],
            ["--json", "batch", str(manifest), "--report", str(report)])]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    for result in results:
        assert result.exit_code in (0, 1), result.output
        assert key not in result.output and jwt not in result.output, result.output
    assert "rejected ***" in results[4].stderr  # the failed wait's error line, masked
    assert "external_task_id 'ext-***'" in results[5].stderr  # the SDK's own error, masked
    assert key not in report.read_text() and "***" in report.read_text()


def test_library_task_failed_error_masks_an_echoed_api_key() -> None:
    from voiceapi import TaskFailedError, VoiceClient

    with KlingEmulator(task_seconds=0.05, api_key="sk-live-0123456789abcdef") as emu, \
            VoiceClient(api_key=emu.api_key, base_url=emu.base_url) as client:
        task = client.custom_voices.create(
            voice_name="echo", voice_url=f"{emu.sample_url()}?kling_fail={emu.api_key}")
        with pytest.raises(TaskFailedError) as failed:
            client.custom_voices.wait(task, timeout=30)
    assert emu.api_key not in str(failed.value)
    assert "***" in str(failed.value) and emu.api_key in failed.value.task.task_status_msg


def test_library_batch_failed_item_masks_an_echoed_api_key() -> None:
    from voiceapi import TaskFailedError, VoiceClient

    with KlingEmulator(task_seconds=0.05, api_key="sk-live-0123456789abcdef") as emu, \
            VoiceClient(api_key=emu.api_key, base_url=emu.base_url) as client:
        [result] = client.custom_voices.create_many([{
            "voice_name": "echo", "voice_url": f"{emu.sample_url()}?kling_fail={emu.api_key}"}],
            poll_interval=0.05)
    assert isinstance(result.error, TaskFailedError)
    assert emu.api_key not in str(result.error) and "***" in str(result.error)
