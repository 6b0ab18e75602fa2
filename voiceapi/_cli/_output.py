"""What the command line prints: tables and progress through rich, errors through click.

Tables are rendered to a string first so that every line can lose its trailing padding (rich
pads the last column) and so that a closed pipe surfaces in one place (``out``). Colour and
progress appear only on a terminal; pipes get plain text.
"""

from __future__ import annotations

import datetime as dt
import enum
import errno
import io
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from typing import Any

import attrs
import click
from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from .. import _constants as C
from .._batch import BatchProgress
from .._errors import (
    BIDI_CONTROLS,
    JWT_TOKEN,
    SECRET_MIN_CHARS,
    TaskFailedError,
    escape_char,
    printable,
)
from .._models import BatchResult, Voice, VoiceTask


class PipeClosed(Exception):
    """Whoever read stdout went away (``voiceapi list --all --json | head -1``)."""


#: The credentials of the command's client (``register_secrets``): masked in everything the
#: command prints or writes, data included. A server that echoes a key back (in a voice name,
#: a task's message) would otherwise put it on the terminal, in a CI log or in a report; the
#: SDK masks what it sent only in the messages of the errors it raises.
_SECRETS: list[str] = []


def register_secrets(*values: str | None) -> None:
    """Mask these values (the secret key, the API key) from now on; short ones are not secrets
    worth the noise (they would blank out ordinary words)."""
    _SECRETS[:] = sorted({v for v in values if v and len(v) >= SECRET_MIN_CHARS},
                         key=len, reverse=True)


def masked(text: str) -> str:
    """``text`` without the registered credentials or any JWT."""
    for secret in _SECRETS:
        if secret in text:
            text = text.replace(secret, "***")
    return JWT_TOKEN.sub("***", text) if "eyJ" in text else text


def out(text: str) -> None:
    """Write one line to stdout; a closed pipe becomes ``PipeClosed`` (a quiet exit 0), any other
    failure (a full disk, a closed descriptor) ``OutputError`` (exit 1, one line)."""
    if sys.stdout is None:  # started with stdout closed (`>&-`): Python leaves it None
        raise OutputError("stdout is closed")
    try:
        click.echo(_encodable(masked(text), sys.stdout))
    except OSError as exc:
        if isinstance(exc, BrokenPipeError) or exc.errno in (errno.EPIPE, errno.EINVAL):
            raise PipeClosed from None
        raise OutputError(exc.strerror or str(exc)) from None


def _encodable(text: str, stream: Any) -> str:
    """``text`` as the stream can take it: a Windows pipe (cp1252) cannot encode a Chinese
    voice name, a strict UTF-8 stdout cannot take a file name's undecodable bytes (lone
    surrogates). Those characters are escaped (``\\u4e2d``) instead of ending the command."""
    encoding = getattr(stream, "encoding", None)
    if not encoding:
        return text
    try:
        text.encode(encoding, getattr(stream, "errors", None) or "strict")
    except UnicodeEncodeError:
        return text.encode(encoding, "backslashreplace").decode(encoding)
    except LookupError:
        pass
    return text


class OutputError(click.ClickException):
    """stdout refused the output (not a closed pipe): exit 1 with one ``error:`` line."""

    exit_code = C.CLI_EXIT_API_ERROR

    def show(self, file: Any = None) -> None:
        silence_stdout()  # what is still buffered would fail again at the interpreter's exit
        error(f"cannot write the output: {self.format_message()}")


def silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail (Python docs,
    "Note on SIGPIPE"). Harmless when stdout is not a real file (test runners)."""
    with suppress(OSError, ValueError, AttributeError, io.UnsupportedOperation):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())


class InputError(click.UsageError):
    """Bad input rather than a bad flag (a manifest, a file, a busy port): exit 2 with one
    ``error:`` line and no usage banner, which would only bury the line that matters."""

    def show(self, file: Any = None) -> None:
        error(self.format_message())


def colour_allowed() -> bool:
    """False when the user turned colour off: ``NO_COLOR`` set and not empty (no-color.org) or
    ``TERM=dumb``. Terminals only either way (click and rich strip colour from pipes)."""
    return not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


def error(message: str, *hints: str) -> None:
    """One red ``error:`` line (red only on a terminal: click strips colour otherwise)."""
    line = f"error: {_no_bidi(masked(message))}"  # the SDK's messages escape the rest already
    click.echo(click.style(line, fg="red") if colour_allowed() else line, err=True)
    for hint in hints:
        click.echo(f"  {masked(hint)}", err=True)


# --- JSON ---------------------------------------------------------------------------------------

def jsonable(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, BaseException):
        return {"type": type(value).__name__, "message": str(value)}
    if attrs.has(type(value)):
        return {k: jsonable(v) for k, v in attrs.asdict(value, recurse=False).items()}
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def dump(value: Any) -> str:
    """One JSON document; non-ASCII text as is, unless stdout cannot encode it (a cp1252 pipe,
    a file name with undecodable bytes): then as JSON escapes, which every reader decodes
    (``out``'s own escaping would write ``\\U0001f600``, which is not JSON)."""
    data = jsonable(value)
    text = json.dumps(data, ensure_ascii=False)
    if sys.stdout is not None and _encodable(text, sys.stdout) != text:
        return json.dumps(data)
    return text


# --- tables -------------------------------------------------------------------------------------

def _stdout_tty() -> bool:
    return sys.stdout is not None and sys.stdout.isatty()


def _width() -> int:
    if _stdout_tty():
        return shutil.get_terminal_size().columns
    with suppress(ValueError):
        return max(40, int(os.environ.get("COLUMNS", "")))
    return C.CLI_PIPE_WIDTH


# Column kinds: ids are never cut; names and messages are bounded and end in "…" when cut.
_ID, _SHORT, _NAME, _MESSAGE = "id", "short", "name", "message"
_STYLES = {"succeed": "green", "failed": "red", "error": "red", "deleted": "dim",
           "processing": "yellow", "submitted": "yellow"}


#: Columns of a table are separated by three cells (a space of padding on each side of rich's
#: blank divider). Names and messages shrink to these widths, never less; a table that still
#: does not fit is drawn wider than the terminal (which wraps its lines): one line per row, so
#: `| grep` keeps working. Rich's own last resort shrank every column evenly and dropped those
#: that reached zero: on an 80-column terminal the task table lost its STATUS column and cut
#: the external ids.
_GAP = 3
_SHRINK_TO = {"name": 10, "message": 12}


def shown(text: str) -> str:
    """Server or file text as a terminal line may show it (``printable``: control characters
    and bidirectional controls escaped, tokens masked)."""
    return printable(text)


def _no_bidi(text: str) -> str:
    return BIDI_CONTROLS.sub(escape_char, text)


def render_table(columns: Sequence[tuple[str, str]], rows: Sequence[Sequence[str]]) -> str:
    """A plain, aligned table (cell widths as the terminal shows them: CJK and emoji count
    double) without trailing spaces; ids and statuses whole whatever the terminal's width."""
    tty = _stdout_tty()
    colour = tty and colour_allowed()
    # Escaped before measuring (not by ``out``), so a name stdout cannot encode still aligns.
    cells = [[_encodable(shown(cell), sys.stdout) for cell in row] for row in rows]
    widths, width = _fitted_widths(columns, cells, _width())
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold",
                  expand=False)
    for (header, kind), fitted in zip(columns, widths, strict=True):
        if kind in _SHRINK_TO:  # bounded, and cut with "…" when the terminal needs the room
            table.add_column(header, no_wrap=True, overflow="ellipsis", max_width=fitted)
        else:  # ids and short words are never cut
            table.add_column(header, no_wrap=True, min_width=fitted)
    for row in cells:
        # Server text is escaped (a control character could retitle the terminal or forge a
        # row); Text() never interprets markup, so a voice named "[red]x" prints as typed.
        table.add_row(*(Text(cell, style=_STYLES.get(cell, "") if colour else "")
                        for cell in row))
    buf = io.StringIO()
    console = Console(file=buf, width=width, force_terminal=tty,
                      color_system="standard" if tty else None, no_color=not colour,
                      highlight=False, emoji=False, soft_wrap=False)
    console.print(table)
    lines = [line.rstrip() for line in buf.getvalue().rstrip("\n").splitlines()]
    # rich may draw the rule under the header wider than any row: cut it to the widest row.
    widest = max((cell_len(Text.from_ansi(x).plain) for x in lines if "─" not in x), default=0)
    rule = "─" if _encodable("─", sys.stdout) == "─" else "-"  # e.g. a cp1252 pipe
    return "\n".join(_cut_rule(x, widest, rule) for x in lines)


def _fitted_widths(columns: Sequence[tuple[str, str]], cells: Sequence[Sequence[str]],
                   width: int) -> tuple[list[int], int]:
    """Each column's width in cells, and the width to draw the table at: ``width`` when it fits
    after names and messages (the message first) shrank down to ``_SHRINK_TO``, else wider."""
    widths = []
    for i, (header, kind) in enumerate(columns):
        natural = max([cell_len(header), *(cell_len(row[i]) for row in cells)])
        bound = {"name": C.CLI_NAME_MAX_WIDTH, "message": C.CLI_MESSAGE_MAX_WIDTH}.get(kind)
        widths.append(natural if bound is None else min(natural, max(bound, cell_len(header))))
    excess = sum(widths) + _GAP * (len(widths) - 1) - width
    for kind in ("message", "name"):
        for i, (header, column_kind) in enumerate(columns):
            if excess > 0 and column_kind == kind:
                floor = max(_SHRINK_TO[kind], cell_len(header))
                cut = min(excess, max(0, widths[i] - floor))
                widths[i] -= cut
                excess -= cut
    return widths, width + max(0, excess)


def _cut_rule(line: str, width: int, rule: str = "─") -> str:
    plain = Text.from_ansi(line).plain
    return rule * width if plain and set(plain) == {"─"} else line


TASK_COLUMNS = (("TASK ID", _ID), ("STATUS", _SHORT), ("VOICE ID", _ID),
                ("VOICE NAME", _NAME), ("VOICE STATUS", _SHORT), ("EXTERNAL ID", _ID),
                ("MESSAGE", _MESSAGE))


def voice_status(v: Voice | None) -> str:
    if v is None:
        return ""
    return "deleted" if v.is_deleted else (v.status or "")


def task_row(t: VoiceTask) -> list[str]:
    v = t.voice
    message = t.task_status_msg
    if v is None and t.task_status.value == "succeed" and not message:
        message = "voice deleted"  # a server that drops deleted voices from their task
    return [t.task_id, t.task_status.value, v.voice_id if v else "", v.voice_name if v else "",
            voice_status(v), t.external_task_id or "", message or ""]


def task_table(tasks: Sequence[VoiceTask]) -> str:
    return render_table(TASK_COLUMNS, [task_row(t) for t in tasks])


PRESET_COLUMNS = (("VOICE ID", _ID), ("VOICE NAME", _NAME), ("OWNED BY", _SHORT),
                  ("STATUS", _SHORT), ("TRIAL URL", _ID))


def voice_table(voices: Sequence[Voice]) -> str:
    return render_table(PRESET_COLUMNS, [[v.voice_id, v.voice_name, v.owned_by,
                                          voice_status(v), v.trial_url] for v in voices])


RESULT_COLUMNS = (("#", _SHORT), ("ROW", _SHORT), ("VOICE NAME", _NAME), ("STATUS", _SHORT),
                  ("TASK ID", _ID), ("VOICE ID", _ID), ("ERROR", _MESSAGE))


def result_status(r: BatchResult) -> str:
    """The task's status when it has one (a failed task is "failed"), else "error"."""
    t = r.task
    if t is not None and (r.error is None or isinstance(r.error, TaskFailedError)):
        return t.task_status.value
    return "error" if r.error is not None else ""


def result_table(results: Sequence[BatchResult], lines: Sequence[str]) -> str:
    rows = []
    for i, (r, line) in enumerate(zip(results, lines, strict=True)):
        t = r.task
        rows.append([str(i + 1), line, str(r.input.get("voice_name", "")),
                     result_status(r), t.task_id if t else "",
                     (t.voice_id or "") if t else "", str(r.error) if r.error else ""])
    return render_table(RESULT_COLUMNS, rows)


# --- progress (stderr, terminals only) ------------------------------------------------------------

def _stderr_console() -> Console | None:
    return Console(stderr=True, highlight=False) if sys.stderr.isatty() else None


class _RateColumn(ProgressColumn):
    """Voices per second (per minute when slower), from ``BatchBar``'s own average."""

    def render(self, task: Any) -> Text:
        rate = task.fields.get("rate")
        if not rate:
            return Text("–/s")
        return Text(f"{rate:.1f}/s" if rate >= 1 else f"{rate * 60:.1f}/min")


class _EtaColumn(ProgressColumn):
    """Time left, counting down between reports (the bar redraws several times a second)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__()
        self._clock = clock

    def render(self, task: Any) -> Text:
        ends_at = task.fields.get("ends_at")
        if ends_at is None:
            return Text("-:--:--")
        left = max(0, int(ends_at - self._clock() + 0.5))
        return Text(f"{left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}")


#: Live progress displays on stderr right now: a message printed while one is live would have
#: the display drawn again below it, so ``stop_live_displays`` ends them first.
_LIVE: set[Progress] = set()


def stop_live_displays() -> None:
    """End every live progress display (its last state stays on screen), e.g. before the
    "interrupted" message, so that message is the last thing on the terminal."""
    for progress in list(_LIVE):
        _LIVE.discard(progress)
        progress.stop()


class _LiveDisplay:
    """A rich Progress on stderr (None when stderr is not a terminal), listed in ``_LIVE``
    while it runs so ``stop_live_displays`` can end it early."""

    _progress: Progress | None = None

    def _start(self) -> None:
        if self._progress is not None:
            self._progress.start()
            _LIVE.add(self._progress)

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None and self._progress in _LIVE:
            _LIVE.discard(self._progress)
            self._progress.stop()


class BatchBar(_LiveDisplay):
    """A progress bar with counts, rate and ETA; a no-op when stderr is not a terminal.

    The rate is the average since the bar's first report, not rich's own speed: that one
    averages the last 30 s of changes, and a batch ends in waves (a slot's worth of voices
    every task time), so with tasks of 30 s or more it would show "–" the whole time.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        console = _stderr_console()
        self._task: Any = None
        self._clock = clock
        self._first: tuple[float, int] | None = None  # (when, done) at the first report
        if console is not None:
            self._progress = Progress(
                TextColumn("batch"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[detail]}"), _RateColumn(), TextColumn("ETA"),
                _EtaColumn(clock), console=console, transient=False,
                # stdout is the results' channel (maybe a pipe): never route it via the bar
                redirect_stdout=False, redirect_stderr=False)

    def __enter__(self) -> BatchBar:
        self._start()
        return self

    def update(self, p: BatchProgress) -> None:
        if self._progress is None:
            return
        detail = (f"ok {p.succeeded} failed {p.failed} running {p.submitted + p.processing} "
                  f"slots {p.slots}")
        rate, ends_at = self._estimate(p)
        if self._task is None:
            self._task = self._progress.add_task("batch", total=p.total, detail=detail)
        self._progress.update(self._task, completed=p.done, total=p.total, detail=detail,
                              rate=rate, ends_at=ends_at)

    def _estimate(self, p: BatchProgress) -> tuple[float | None, float | None]:
        """Voices per second since the first report, and when the rest should be done.

        Items a resumed batch found already done at its first report do not count as speed.
        """
        now = self._clock()
        if self._first is None:
            self._first = (now, p.done)
        since, done_then = self._first
        finished = p.done - done_then
        if finished <= 0 or now <= since:
            return None, None
        rate = finished / (now - since)
        return rate, now + (p.total - p.done) / rate


class Spinner(_LiveDisplay):
    """``waiting for <task id> 12s`` on stderr while a command waits (terminals only)."""

    def __init__(self, text: str) -> None:
        console = _stderr_console()
        self._progress = None if console is None else Progress(
            SpinnerColumn(), TextColumn(text.replace("[", r"\[")), TimeElapsedColumn(),
            console=console, transient=True, redirect_stdout=False, redirect_stderr=False)

    def __enter__(self) -> Spinner:
        self._start()
        if self._progress is not None:
            self._progress.add_task("", total=None)
        return self
