"""The ``voiceapi`` command line (``python -m voiceapi`` too), built on click.

Exit codes: 0 success; 1 an API or task error (the message, code and request id on stderr);
2 a usage error (bad flags, bad input, missing credentials). Tables go to a terminal, ``--json``
gives one JSON document (JSON lines for streams); progress goes to stderr, only on a terminal.

Kept out of ``import voiceapi``: only the console script imports it.
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import enum
import io
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import attrs
import click

from ._batch import BatchProgress, prepare
from ._client import AsyncVoiceClient
from ._errors import APIError, TaskFailedError, ValidationError, VoiceAPIError
from ._models import BatchResult, Voice, VoiceTask

T = TypeVar("T")


# --- output helpers ---------------------------------------------------------------------------

def _jsonable(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, BaseException):
        return {"type": type(value).__name__, "message": str(value)}
    if attrs.has(type(value)):
        return {k: _jsonable(v) for k, v in attrs.asdict(value, recurse=False).items()}
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _dump(value: Any) -> str:
    return json.dumps(_jsonable(value), ensure_ascii=False)


def _table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    cells = [[str(c) if c is not None else "" for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(out)


TASK_HEADERS = ("task_id", "status", "voice_id", "voice_name", "external_task_id", "message")


def _task_row(t: VoiceTask) -> list[Any]:
    v = t.voice
    return [t.task_id, t.task_status.value, v.voice_id if v else "", v.voice_name if v else "",
            t.external_task_id or "", t.task_status_msg]


def _voice_row(v: Voice) -> list[Any]:
    return [v.voice_id, v.voice_name, v.owned_by, v.trial_url]


def _stderr_is_tty() -> bool:
    return sys.stderr.isatty()


class _Status:
    """A one-line progress display on stderr, only when it is a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and _stderr_is_tty()
        self.started = time.monotonic()

    def show(self, text: str) -> None:
        if self.enabled:
            click.echo(f"\r\x1b[2K{text}", nl=False, err=True)

    def done(self) -> None:
        if self.enabled:
            click.echo("\r\x1b[2K", nl=False, err=True)


# --- running ---------------------------------------------------------------------------------

@attrs.frozen
class Settings:
    access_key: str | None
    secret_key: str | None
    api_key: str | None
    base_url: str | None
    timeout: float
    json: bool

    def client(self) -> AsyncVoiceClient:
        return AsyncVoiceClient(self.access_key, self.secret_key, api_key=self.api_key,
                                base_url=self.base_url, timeout=self.timeout)


def _run(make: Callable[[], Awaitable[T]]) -> T:
    """Run one command's coroutine; map SDK errors to the documented exit codes."""
    try:
        return asyncio.run(_awaited(make))
    except ValidationError as exc:
        raise click.UsageError(str(exc)) from None
    except VoiceAPIError as exc:
        detail = f"error: {exc}"
        if isinstance(exc, APIError) and exc.request_id and exc.request_id not in detail:
            detail += f" (request_id={exc.request_id})"
        click.echo(detail, err=True)
        raise SystemExit(1) from None


async def _awaited(make: Callable[[], Awaitable[T]]) -> T:
    return await make()


async def _with_client(settings: Settings, fn: Callable[[AsyncVoiceClient], Awaitable[T]]) -> T:
    async with settings.client() as client:
        return await fn(client)


pass_settings = click.make_pass_decorator(Settings)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--access-key", envvar="KLING_ACCESS_KEY", help="AccessKey (or KLING_ACCESS_KEY).")
@click.option("--secret-key", envvar="KLING_SECRET_KEY", help="SecretKey (or KLING_SECRET_KEY).")
@click.option("--api-key", envvar="KLING_API_KEY", help="API key (or KLING_API_KEY).")
@click.option("--base-url", envvar="KLING_BASE_URL", help="API host (or KLING_BASE_URL).")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds per HTTP attempt.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON output.")
@click.version_option(package_name="voiceapi")
@click.pass_context
def cli(ctx: click.Context, access_key: str | None, secret_key: str | None,
        api_key: str | None, base_url: str | None, timeout: float, as_json: bool) -> None:
    """Kling AI Custom Voice API from the shell.

    \b
    Exit codes: 0 ok, 1 API or task error, 2 usage error.
    Try it without an account:  voiceapi demo
    """
    ctx.obj = Settings(access_key, secret_key, api_key, base_url, timeout, as_json)


def _print_task(settings: Settings, task: VoiceTask) -> None:
    if settings.json:
        click.echo(_dump(task))
    else:
        click.echo(_table([_task_row(task)], TASK_HEADERS))


@cli.command()
@click.option("--name", "voice_name", required=True, help="Voice name (at most 20 characters).")
@click.option("--url", "voice_url", help="Sample URL: .mp3/.wav/.mp4/.mov, 5–30 s, one voice.")
@click.option("--video-id", help="A Kling video id to take the voice from (instead of --url).")
@click.option("--callback-url", help="Where Kling POSTs status changes.")
@click.option("--external-id", "external_task_id", help="Your own unique id for the task.")
@click.option("--wait/--no-wait", default=False, help="Wait until the voice is ready.")
@click.option("--wait-timeout", default=300.0, show_default=True)
@pass_settings
def create(settings: Settings, voice_name: str, voice_url: str | None, video_id: str | None,
           callback_url: str | None, external_task_id: str | None, wait: bool,
           wait_timeout: float) -> None:
    """Clone a voice from a sample (starts a task)."""
    async def go(client: AsyncVoiceClient) -> VoiceTask:
        task = await client.custom_voices.create(
            voice_name=voice_name, voice_url=voice_url, video_id=video_id,
            callback_url=callback_url, external_task_id=external_task_id)
        if wait:
            task = await _wait_with_status(client, task.task_id, wait_timeout, 1.0)
        return task

    _print_task(settings, _run(lambda: _with_client(settings, go)))


@cli.command()
@click.argument("task_id", required=False)
@click.option("--external-id", "external_task_id", help="Look up by your external id instead.")
@pass_settings
def get(settings: Settings, task_id: str | None, external_task_id: str | None) -> None:
    """Show one voice task (by task id or --external-id)."""
    if (task_id is None) == (external_task_id is None):
        raise click.UsageError("give a TASK_ID or --external-id (one of them)")
    task = _run(lambda: _with_client(settings, lambda c: c.custom_voices.get(
        task_id, external_task_id=external_task_id)))
    _print_task(settings, task)


async def _wait_with_status(client: AsyncVoiceClient, task_id: str, timeout: float,
                            poll_interval: float) -> VoiceTask:
    status = _Status(True)
    waiter = asyncio.ensure_future(client.custom_voices.wait(task_id, timeout=timeout,
                                                            poll_interval=poll_interval))
    try:
        while not waiter.done():
            status.show(f"waiting for {task_id}… {time.monotonic() - status.started:.0f}s")
            await asyncio.wait([waiter], timeout=0.5)
        return waiter.result()
    finally:
        waiter.cancel()
        status.done()


@cli.command()
@click.argument("task_id")
@click.option("--timeout", "wait_timeout", default=300.0, show_default=True)
@click.option("--poll-interval", default=1.0, show_default=True)
@pass_settings
def wait(settings: Settings, task_id: str, wait_timeout: float, poll_interval: float) -> None:
    """Wait until a task ends; exit 1 if it failed or timed out."""
    task = _run(lambda: _with_client(settings, lambda c: _wait_with_status(
        c, task_id, wait_timeout, poll_interval)))
    _print_task(settings, task)


async def _collect(it: AsyncIterator[T], label: str, emit: Callable[[T], None] | None) -> list[T]:
    status = _Status(True)
    out: list[T] = []
    try:
        async for item in it:
            if emit is not None:
                emit(item)
            else:
                out.append(item)
            status.show(f"{label}: {len(out)}")
    finally:
        status.done()
    return out


def _paging_options(fn: Callable[..., None]) -> Callable[..., None]:
    fn = click.option("--all", "fetch_all", is_flag=True,
                      help="Every page (JSON lines with --json).")(fn)
    fn = click.option("--page-size", default=30, show_default=True)(fn)
    return click.option("--page", "page_num", default=1, show_default=True)(fn)


def _listing(settings: Settings, resource: str, label: str, page_num: int, page_size: int,
             fetch_all: bool, row: Callable[[Any], list[Any]], headers: Sequence[str]) -> None:
    """One page (a JSON array) or every page (JSON lines as they arrive), else a table."""
    if fetch_all:
        emit = (lambda x: click.echo(_dump(x))) if settings.json else None
        items: list[Any] = _run(lambda: _with_client(settings, lambda c: _collect(
            getattr(c, resource).iter_all(page_size=max(page_size, 100)), label, emit)))
        if settings.json:
            return
    else:
        items = _run(lambda: _with_client(settings, lambda c: getattr(c, resource).list(
            page_num=page_num, page_size=page_size)))
        if settings.json:
            click.echo(_dump(items))
            return
    click.echo(_table([row(x) for x in items], headers))


@cli.command("list")
@_paging_options
@pass_settings
def list_(settings: Settings, page_num: int, page_size: int, fetch_all: bool) -> None:
    """List your voice-creation tasks and their voices."""
    _listing(settings, "custom_voices", "tasks", page_num, page_size, fetch_all, _task_row,
             TASK_HEADERS)


@cli.command()
@_paging_options
@pass_settings
def presets(settings: Settings, page_num: int, page_size: int, fetch_all: bool) -> None:
    """List Kling's preset voices."""
    _listing(settings, "preset_voices", "voices", page_num, page_size, fetch_all, _voice_row,
             ("voice_id", "voice_name", "owned_by", "trial_url"))


@cli.command()
@click.argument("voice_id")
@pass_settings
def delete(settings: Settings, voice_id: str) -> None:
    """Delete a custom voice (by voice id, not task id)."""
    _run(lambda: _with_client(settings, lambda c: c.custom_voices.delete(voice_id)))
    click.echo(_dump({"deleted": voice_id}) if settings.json else f"deleted {voice_id}")


# --- batch ------------------------------------------------------------------------------------

_FIELDS = ("voice_name", "voice_url", "video_id", "external_task_id", "callback_url")


def read_manifest(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """Rows of a CSV (with a header) or JSON-lines manifest, with their line numbers."""
    text = path.read_text(encoding="utf-8-sig")
    rows: list[tuple[int, dict[str, Any]]] = []
    is_jsonl = path.suffix.lower() in (".jsonl", ".ndjson") or text.lstrip().startswith("{")
    if is_jsonl:
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                rows.append((n, {"__error__": "not valid JSON"}))
                continue
            rows.append((n, row if isinstance(row, dict) else {"__error__": "not an object"}))
        return rows
    reader = csv.DictReader(io.StringIO(text))
    missing = {"voice_name"} - set(reader.fieldnames or ())
    if missing:
        raise click.UsageError(f"{path}: the CSV header needs a voice_name column")
    for row in reader:
        clean = {k.strip(): v.strip() for k, v in row.items() if k and v and v.strip()}
        rows.append((reader.line_num, clean))
    return rows


def _validate_rows(rows: list[tuple[int, dict[str, Any]]]) -> tuple[list[dict[str, Any]],
                                                                   list[str]]:
    problems: list[str] = []
    items: list[dict[str, Any]] = []
    for line, row in rows:
        if "__error__" in row:
            problems.append(f"line {line}: {row['__error__']}")
            continue
        unknown = set(row) - set(_FIELDS)
        if unknown:
            problems.append(f"line {line}: unknown column(s) {', '.join(sorted(unknown))}")
            continue
        items.append(row)
    for (line, _), entry in zip([r for r in rows if "__error__" not in r[1]
                                 and not set(r[1]) - set(_FIELDS)], prepare(items), strict=True):
        if entry.error is not None:
            problems.append(f"line {line}: {entry.error}")
    return items, problems


def _progress_line(p: BatchProgress, started: float) -> str:
    elapsed = max(time.monotonic() - started, 1e-6)
    rate = p.done / elapsed
    eta = f"{(p.total - p.done) / rate:.0f}s" if rate > 0 else "?"
    width = 24
    filled = int(width * p.done / p.total) if p.total else width
    bar = "#" * filled + "-" * (width - filled)
    return (f"[{bar}] {p.done}/{p.total} ok {p.succeeded} failed {p.failed} "
            f"running {p.submitted + p.processing} slots {p.slots} "
            f"{rate:.1f}/s ETA {eta}")


def _result_row(index: int, r: BatchResult) -> list[Any]:
    t = r.task
    if r.ok or (t is not None and (r.error is None or isinstance(r.error, TaskFailedError))):
        status = t.task_status.value if t is not None else ""
    else:
        status = "error"
    return [index, r.input.get("voice_name", ""), status, t.task_id if t else "",
            t.voice_id if t and t.voice_id else "", str(r.error) if r.error else ""]


def _report(results: list[BatchResult]) -> dict[str, Any]:
    return {"total": len(results), "succeeded": sum(r.ok for r in results),
            "failed": sum(r.error is not None for r in results),
            "results": [{"index": i, "input": r.input,
                         "task": _jsonable(r.task) if r.task else None,
                         "error": _jsonable(r.error) if r.error else None}
                        for i, r in enumerate(results)]}


@cli.command()
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--max-in-flight", type=click.IntRange(1, 100),
              help="Tasks in progress at once (default: learned from the account's limit).")
@click.option("--journal", type=click.Path(dir_okay=False), help="Resume file (append-only).")
@click.option("--dry-run", is_flag=True, help="Validate the manifest and stop.")
@click.option("--wait/--no-wait", default=True, help="Wait for every voice to finish.")
@click.option("--timeout", "batch_timeout", type=float, help="Give up after this many seconds.")
@pass_settings
def batch(settings: Settings, manifest: Path, max_in_flight: int | None, journal: str | None,
          dry_run: bool, wait: bool, batch_timeout: float | None) -> None:
    """Create many voices from a CSV or JSON-lines MANIFEST.

    \b
    Columns / keys: voice_name, voice_url or video_id, optional external_task_id,
    callback_url. Every row is checked before anything is sent. Exit 1 if any item failed.
    """
    items, problems = _validate_rows(read_manifest(manifest))
    if problems:
        for p in problems:
            click.echo(p, err=True)
        raise click.UsageError(f"{len(problems)} bad row(s) in {manifest}; nothing was sent")
    if dry_run:
        msg = {"valid": len(items)} if settings.json else f"{len(items)} rows are valid"
        click.echo(_dump(msg) if settings.json else msg)
        return
    status = _Status(True)

    def on_progress(p: BatchProgress) -> None:
        status.show(_progress_line(p, status.started))

    results = _run(lambda: _with_client(settings, lambda c: c.custom_voices.create_many(
        items, max_in_flight=max_in_flight, journal=journal, wait=wait, timeout=batch_timeout,
        on_progress=on_progress)))
    status.done()
    if settings.json:
        click.echo(_dump(_report(results)))
    else:
        click.echo(_table([_result_row(i, r) for i, r in enumerate(results)],
                          ("#", "voice_name", "status", "task_id", "voice_id", "error")))
        ok = sum(r.ok for r in results)
        click.echo(f"\n{ok} of {len(results)} voices ready"
                   f" in {time.monotonic() - status.started:.1f}s")
    if any(r.error is not None for r in results):
        raise SystemExit(1)


# --- emulator commands ----------------------------------------------------------------------

@cli.command("mock-server")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8787, show_default=True)
@click.option("--concurrency", default=5, show_default=True)
@click.option("--task-seconds", default=5.0, show_default=True)
@click.option("--api-key", "server_api_key", default="local-api-key", show_default=True)
def mock_server(host: str, port: int, concurrency: int, task_seconds: float,
                server_api_key: str) -> None:
    """Run the local Kling emulator until Ctrl-C."""
    from .testing import KlingEmulator

    emu = KlingEmulator(host=host, port=port, concurrency=concurrency,
                        task_seconds=task_seconds, api_key=server_api_key,
                        secret_key="local-secret-key-0123456789abcdef")

    async def serve() -> None:
        async with emu:
            click.echo(f"Kling emulator on {emu.base_url}  (Ctrl-C to stop)")
            click.echo(f"export KLING_BASE_URL={emu.base_url}")
            click.echo(f"export KLING_API_KEY={emu.api_key}")
            click.echo(f"# or AK/SK: KLING_ACCESS_KEY={emu.access_key} "
                       f"KLING_SECRET_KEY={emu.secret_key}")
            click.echo(f"# sample: {emu.sample_url(12)}", nl=True)
            sys.stdout.flush()
            await asyncio.Event().wait()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        click.echo("stopped", err=True)


@cli.command()
@click.option("--task-seconds", default=2.0, show_default=True,
              help="Emulated time per voice (embedded emulator only).")
@click.option("--sample-url", "sample_urls", multiple=True,
              help="Sample URLs to clone (needed against a real server).")
@pass_settings
def demo(settings: Settings, task_seconds: float, sample_urls: tuple[str, ...]) -> None:
    """Show the whole SDK at work: against the embedded emulator unless credentials are set."""
    from ._demo import run_demo

    has_creds = bool(settings.api_key or (settings.access_key and settings.secret_key))
    code = _run(lambda: run_demo(settings.client if has_creds else None,
                                 task_seconds=task_seconds, sample_urls=list(sample_urls),
                                 echo=click.echo, as_json=settings.json))
    raise SystemExit(code)


def main(argv: Iterable[str] | None = None) -> None:
    cli.main(args=list(argv) if argv is not None else None, prog_name="voiceapi")


__all__ = ["cli", "main", "read_manifest"]
