"""The commands. Exit codes: 0 success; 1 an API or task error (message, code and request id on
stderr); 2 a usage error (bad flags, bad input, missing credentials); 130 interrupted (Ctrl-C).
Tables go to stdout, ``--json`` gives one JSON document (JSON lines for ``--all``); progress and
colour appear on stderr, only on a terminal. A closed pipe (``| head -1``) ends quietly with 0;
a stdout that refuses the output (a full disk, closed) is exit 1 with one ``error:`` line.
"""

from __future__ import annotations

import asyncio
import difflib
import math
import os
import re
import shlex
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar
from urllib.parse import urlsplit

import attrs
import click
from click.core import ParameterSource

from .. import _constants as C
from .. import _validation
from .._aio import run_main
from .._batch import BatchProgress
from .._client import AsyncVoiceClient
from .._errors import (
    APIConnectionError,
    APIError,
    AuthenticationError,
    ConflictError,
    TaskFailedError,
    ValidationError,
    VoiceAPIError,
    WaitTimeoutError,
)
from .._middlewares import Handler, Request, Response
from .._models import BatchResult, VoiceTask
from . import _manifest
from ._output import (
    BatchBar,
    InputError,
    PipeClosed,
    Spinner,
    dump,
    error,
    jsonable,
    out,
    register_secrets,
    result_table,
    silence_stdout,
    stop_live_displays,
    task_table,
    voice_table,
)

T = TypeVar("T")

# The SDK names its parameters; the command line names its flags. Applied to the messages of
# ValidationErrors raised by a command's own arguments (manifests keep their column names).
_FLAG_WORDS = (
    ("give exactly one of task_id or external_task_id", "give a TASK_ID or --external-id"),
    ("pass access_key and secret_key, or api_key", "pass --access-key and --secret-key, or "
                                                   "--api-key"),
    ("voice_name", "--name"), ("voice_url", "--url"), ("video_id", "--video-id"),
    ("callback_url", "--callback-url"), ("external_task_id", "--external-id"),
    ("page_size", "--page-size"), ("page_num", "--page"), ("poll_interval", "--poll-interval"),
    ("max_in_flight", "--max-in-flight"), ("base_url", "--base-url"), ("task_id", "TASK_ID"),
    ("voice_id", "VOICE_ID"),
)


def cli_words(message: str) -> str:
    for sdk, flag in _FLAG_WORDS:
        message = re.sub(rf"(?<![\w-]){re.escape(sdk)}\b", flag, message)
    return message


class _Finite(click.FloatRange):
    """A float range that refuses nan and inf: both pass FloatRange (nan compares false with
    every bound), then reached the SDK, which named its own parameter instead of the flag, or
    the emulator (a ValueError traceback; ``inf`` a demo that never ends)."""

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


_POSITIVE = _Finite(0, min_open=True)


# --- settings shared by every command ------------------------------------------------------------

@attrs.define
class State:
    access_key: str | None = None
    secret_key: str | None = None
    api_key: str | None = None
    base_url: str | None = None
    request_timeout: float = C.DEFAULT_TIMEOUT
    max_retries: int = C.DEFAULT_MAX_RETRIES
    json: bool = False
    #: Global options given on the command line (not from the environment or defaults).
    explicit: tuple[str, ...] = ()
    #: What the command is doing, for the message after Ctrl-C.
    doing: str = ""
    attempts: int = 0
    host: str = ""

    @property
    def has_credentials(self) -> bool:
        return bool(self.api_key or (self.access_key and self.secret_key))

    async def _count(self, request: Request, call_next: Handler) -> Response:
        # Counted here, per attempt, so "no answer" can say how many attempts were made.
        self.attempts += 1
        return await call_next(request)

    def client_options(self) -> dict[str, Any]:
        return {"timeout": self.request_timeout, "max_retries": self.max_retries,
                "middlewares": [self._count]}

    def client(self, coordinator: Any = None) -> AsyncVoiceClient:
        register_secrets(self.secret_key, self.api_key)  # masked in all this command prints
        client = AsyncVoiceClient(self.access_key, self.secret_key, api_key=self.api_key,
                                  base_url=self.base_url, coordinator=coordinator,
                                  **self.client_options())
        self.host = urlsplit(client.base_url).netloc
        return client

    def refuse_globals(self, command: str, why: str) -> None:
        """Options a command would ignore are refused, not silently dropped."""
        if self.explicit:
            raise click.UsageError(f"{', '.join(self.explicit)}: not used by {command} ({why})")


def _auth_hints(host: str) -> list[str]:
    return [
        "check the key pair: KLING_ACCESS_KEY and KLING_SECRET_KEY (or KLING_API_KEY) from the "
        "same account, copied whole",
        f"check the region: requests went to {host or 'the default host'}; accounts created in "
        f"Beijing need KLING_BASE_URL={C.BEIJING_BASE_URL} (Singapore: {C.DEFAULT_BASE_URL})",
        "check this machine's clock: tokens are signed with it (sync it with NTP)",
    ]


def _show_task_on_failure(state: State, task: VoiceTask | None) -> None:
    # `--json` promises the record on stdout even when the task failed (then exit 1).
    if task is not None:
        out(dump(task) if state.json else task_table([task]))


def _run(state: State, make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run one command's coroutine; map errors to messages and the documented exit codes."""
    started = time.monotonic()
    try:
        return run_main(make())
    except ValidationError as exc:
        raise InputError(cli_words(str(exc))) from None
    except (TaskFailedError, WaitTimeoutError) as exc:
        _show_task_on_failure(state, exc.task)
        error(str(exc))
    except AuthenticationError as exc:
        error(str(exc), *_auth_hints(state.host))
    except APIConnectionError as exc:
        spent = time.monotonic() - started
        error(f"no answer from {state.host or 'the server'} after {state.attempts} "
              f"attempt(s) in {spent:.1f}s (last: {exc})",
              "check --base-url / KLING_BASE_URL and the network; --request-timeout sets "
              "the seconds per attempt, --max-retries the retries")
    except ConflictError as exc:  # your --external-id is taken: say how to see that task
        existing = f"voiceapi get {exc.existing_task_id}" if exc.existing_task_id else \
            "voiceapi get --external-id <id>"
        error(str(exc), f"give another --external-id, or see the task that has it: {existing}")
    except VoiceAPIError as exc:
        detail = str(exc)
        if isinstance(exc, APIError) and exc.request_id and exc.request_id not in detail:
            detail += f" (request_id={exc.request_id})"
        error(detail)
    except KeyboardInterrupt:
        stop_live_displays()  # the message comes last, not a progress bar redrawn below it
        click.echo(f"\ninterrupted{': ' + state.doing if state.doing else ''}", err=True)
        raise SystemExit(C.CLI_EXIT_INTERRUPTED) from None
    except OSError as exc:  # a local file went away mid-command (journal folder, full disk)
        if isinstance(exc, BrokenPipeError):
            raise
        error(f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}")
    raise SystemExit(C.CLI_EXIT_API_ERROR)


async def _with_client(state: State, fn: Callable[[AsyncVoiceClient], Awaitable[T]]) -> T:
    async with state.client() as client:
        return await fn(client)


class _Group(click.Group):
    """Ctrl-C anywhere exits 130, a closed stdout exits 0 quietly (click would say "Aborted!"
    and exit 1 for both)."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None,
             complete_var: str | None = None, standalone_mode: bool = True,
             **extra: Any) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except (click.Abort, KeyboardInterrupt):
            click.echo("interrupted", err=True)
            sys.exit(C.CLI_EXIT_INTERRUPTED)
        except PipeClosed:
            silence_stdout()
            sys.exit(0)
        sys.exit(rv if isinstance(rv, int) else 0)


_GLOBAL_FLAGS = {"access_key": "--access-key", "secret_key": "--secret-key",
                 "api_key": "--api-key", "base_url": "--base-url",
                 "request_timeout": "--request-timeout", "max_retries": "--max-retries"}


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]},
             epilog="\b\nExamples:\n  voiceapi demo\n  voiceapi list --all --json\n"
                    "  voiceapi batch voices.csv --report results.csv")
@click.option("--access-key", envvar=C.ENV_ACCESS_KEY, help="AccessKey (or KLING_ACCESS_KEY).")
@click.option("--secret-key", envvar=C.ENV_SECRET_KEY, help="SecretKey (or KLING_SECRET_KEY).")
@click.option("--api-key", envvar=C.ENV_API_KEY, help="API key (or KLING_API_KEY).")
@click.option("--base-url", envvar=C.ENV_BASE_URL,
              help=f"API host (or KLING_BASE_URL); default {C.DEFAULT_BASE_URL}, Beijing "
                   f"accounts {C.BEIJING_BASE_URL}.")
@click.option("--request-timeout", type=_POSITIVE,
              default=C.DEFAULT_TIMEOUT, show_default=True,
              help="Seconds per HTTP attempt (a command's --timeout is its overall limit).")
@click.option("--max-retries", type=click.IntRange(0, 20), default=C.DEFAULT_MAX_RETRIES,
              show_default=True, help="Retries after the first attempt of each request.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON on stdout.")
@click.version_option(package_name="voiceapi")
@click.pass_context
def cli(ctx: click.Context, access_key: str | None, secret_key: str | None,
        api_key: str | None, base_url: str | None, request_timeout: float, max_retries: int,
        as_json: bool) -> None:
    """Kling AI Custom Voice API from the shell.

    \b
    Exit codes: 0 ok, 1 API or task error, 2 usage error, 130 interrupted.
    Try it without an account:  voiceapi demo
    """
    register_secrets()  # none until this command makes a client (one process, many runs)
    explicit = tuple(flag for name, flag in _GLOBAL_FLAGS.items()
                     if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE)
    ctx.obj = State(access_key, secret_key, api_key, base_url, request_timeout, max_retries,
                    as_json, explicit)


pass_state = click.make_pass_decorator(State)


def _refuse_unused(params: Sequence[str], why: str) -> None:
    """Refuse options the current command was given but would not use (``--wait-timeout``
    without ``--wait``): silently dropping them hides the user's mistake."""
    ctx = click.get_current_context()
    given = [p.opts[0] for p in ctx.command.params
             if p.name in params and ctx.get_parameter_source(p.name or "")
             is ParameterSource.COMMANDLINE]
    if given:
        raise click.UsageError(f"{', '.join(given)}: not used {why}")


def _json_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--json`` after the subcommand too (``voiceapi list --all --json``)."""
    def turn_on(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
        if value:
            ctx.find_object(State).json = True  # type: ignore[union-attr]

    return click.option("--json", is_flag=True, expose_value=False, callback=turn_on,
                        help="Machine-readable JSON on stdout (same as before the command).")(fn)


def _print_task(state: State, task: VoiceTask) -> None:
    out(dump(task) if state.json else task_table([task]))



@cli.command(epilog="\b\nExample:\n  voiceapi create --name Narrator "
                    "--url https://example.com/narrator.wav --wait")
@click.option("--name", "voice_name", required=True, help="Voice name (at most 20 characters).")
@click.option("--url", "voice_url", help="Sample URL (audio or video, 5–30 s, one voice).")
@click.option("--video-id", help="A Kling video id to take the voice from (instead of --url).")
@click.option("--callback-url", help="Where Kling POSTs status changes.")
@click.option("--external-id", "external_task_id", help="Your own unique id for the task.")
@click.option("--wait/--no-wait", default=False, help="Wait until the voice is ready.")
@click.option("--wait-timeout", type=_POSITIVE, default=C.DEFAULT_WAIT_TIMEOUT,
              show_default=True, help="Overall seconds to wait (with --wait).")
@_json_option
@pass_state
def create(state: State, voice_name: str, voice_url: str | None, video_id: str | None,
           callback_url: str | None, external_task_id: str | None, wait: bool,
           wait_timeout: float) -> None:
    """Clone a voice from a sample (starts a task)."""
    if (voice_url is None) == (video_id is None):
        raise click.UsageError("give exactly one of --url or --video-id")
    if not wait:
        _refuse_unused(["wait_timeout"], "without --wait")
    state.doing = f"creating voice {voice_name!r}"

    async def go(client: AsyncVoiceClient) -> VoiceTask:
        task = await client.custom_voices.create(
            voice_name=voice_name, voice_url=voice_url, video_id=video_id,
            callback_url=callback_url, external_task_id=external_task_id)
        if not wait:
            return task
        state.doing = (f"task {task.task_id} was created and is still running; "
                       f"follow it with: voiceapi wait {task.task_id}")
        return await _wait(client, task.task_id, wait_timeout, C.DEFAULT_POLL_INTERVAL)

    _print_task(state, _run(state, lambda: _with_client(state, go)))


@cli.command(epilog="\b\nExamples:\n  voiceapi get 930801301486305328\n"
                    "  voiceapi get --external-id my-voice-001 --json")
@click.argument("task_id", required=False)
@click.option("--external-id", "external_task_id", help="Look up by your external id instead.")
@_json_option
@pass_state
def get(state: State, task_id: str | None, external_task_id: str | None) -> None:
    """Show one voice task (by TASK_ID or --external-id)."""
    if (task_id is None) == (external_task_id is None):
        raise click.UsageError("give a TASK_ID or --external-id (one of them)")
    task = _run(state, lambda: _with_client(state, lambda c: c.custom_voices.get(
        task_id, external_task_id=external_task_id)))
    _print_task(state, task)


async def _wait(client: AsyncVoiceClient, task_id: str, timeout: float,
                poll_interval: float) -> VoiceTask:
    with Spinner(f"waiting for task {task_id}"):
        return await client.custom_voices.wait(task_id, timeout=timeout,
                                               poll_interval=poll_interval)


@cli.command(epilog="\b\nExample:\n  voiceapi wait 930801301486305328 --timeout 120")
@click.argument("task_id")
@click.option("--timeout", "wait_timeout", type=_POSITIVE, default=C.DEFAULT_WAIT_TIMEOUT,
              show_default=True, help="Overall seconds to wait (--request-timeout is per "
                                      "HTTP attempt).")
@click.option("--poll-interval", type=_POSITIVE, default=C.DEFAULT_POLL_INTERVAL,
              show_default=True, help="Seconds between the first polls (they back off).")
@_json_option
@pass_state
def wait(state: State, task_id: str, wait_timeout: float, poll_interval: float) -> None:
    """Wait until a task ends; print it. Exit 1 if it failed or timed out."""
    state.doing = f"task {task_id} is still running; follow it with: voiceapi wait {task_id}"
    task = _run(state, lambda: _with_client(state, lambda c: _wait(
        c, task_id, wait_timeout, poll_interval)))
    _print_task(state, task)


def _paging_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--all", "fetch_all", is_flag=True,
                      help="Every page (JSON lines with --json).")(fn)
    fn = click.option("--page-size", type=click.IntRange(C.PAGE_MIN, C.PAGE_MAX),
                      help=f"Items per page ({C.PAGE_MIN}–{C.PAGE_MAX}; default "
                           f"{C.DEFAULT_PAGE_SIZE}, with --all {C.DEFAULT_ITER_PAGE_SIZE}).")(fn)
    fn = click.option("--page", "page_num", type=click.IntRange(min=1), default=1,
                      show_default=True, help="Which page (not with --all).")(fn)
    return _json_option(fn)


def _listing(state: State, resource: str, what: str, page_num: int, page_size: int | None,
             fetch_all: bool, table: Callable[[Sequence[Any]], str]) -> None:
    """One page (a JSON array) or every page (JSON lines as they arrive), else a table."""
    ctx = click.get_current_context()
    if fetch_all and ctx.get_parameter_source("page_num") is ParameterSource.COMMANDLINE:
        raise click.UsageError("--all reads every page: leave out --page")
    if fetch_all:
        async def every(client: AsyncVoiceClient) -> list[Any]:
            pages = getattr(client, resource)
            it = pages.iter_all() if page_size is None else pages.iter_all(page_size=page_size)
            items = []
            async for item in it:
                if state.json:
                    out(dump(item))  # stream: a pipe sees each item as it arrives
                else:
                    items.append(item)
            return items

        items = _run(state, lambda: _with_client(state, every))
        if state.json:
            return
    else:
        size = C.DEFAULT_PAGE_SIZE if page_size is None else page_size
        items = _run(state, lambda: _with_client(state, lambda c: getattr(c, resource).list(
            page_num=page_num, page_size=size)))
        if state.json:
            out(dump(items))
            return
    if not items:
        out(f"no {what}" + ("" if fetch_all else f" on page {page_num}"))
        return
    out(table(items))


@cli.command("list", epilog="\b\nExamples:\n  voiceapi list\n  voiceapi list --page 2 "
                            "--page-size 100\n  voiceapi list --all --json | jq -r "
                            "'.voices[].voice_id'")
@_paging_options
@pass_state
def list_(state: State, page_num: int, page_size: int | None, fetch_all: bool) -> None:
    """List your voice-creation tasks and their voices (a deleted voice says so)."""
    _listing(state, "custom_voices", "voice tasks", page_num, page_size, fetch_all, task_table)


@cli.command(epilog="\b\nExample:\n  voiceapi presets --page-size 100")
@_paging_options
@pass_state
def presets(state: State, page_num: int, page_size: int | None, fetch_all: bool) -> None:
    """List Kling's preset voices."""
    _listing(state, "preset_voices", "preset voices", page_num, page_size, fetch_all,
             voice_table)


@cli.command(epilog="\b\nExample:\n  voiceapi delete 930801338081615883")
@click.argument("voice_id")
@_json_option
@pass_state
def delete(state: State, voice_id: str) -> None:
    """Delete a custom voice (by VOICE_ID, not task id)."""
    _run(state, lambda: _with_client(state, lambda c: c.custom_voices.delete(voice_id)))
    out(dump({"deleted": voice_id}) if state.json else f"deleted voice {voice_id}")


# --- batch ---------------------------------------------------------------------------------------

def _writable_journal(journal: Path) -> None:
    if not journal.parent.is_dir():
        raise InputError(f"--journal {journal}: the folder {journal.parent} does not exist")
    if journal.exists() and not journal.is_file():
        # A journal is read back whole at the start: /dev/zero or /dev/full never end (the
        # batch filled the memory), a FIFO blocks, a directory cannot be appended to.
        raise InputError(f"--journal {journal}: not a regular file (give --journal PATH of a "
                         "file)")
    try:
        with open(journal, "a", encoding="utf-8"):
            pass
    except OSError as exc:
        raise InputError(f"--journal {journal}: cannot write it ({exc.strerror})") from None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist yet: compare where they would be
        return os.path.abspath(a) == os.path.abspath(b)


def _refuse_overlapping_files(manifest: Path, journal: Path, report: Path | None) -> None:
    """The journal is appended to and the report replaced: either on the manifest (or on each
    other) would destroy it, so ``--report voices.csv`` for ``voices.csv`` is refused."""
    named = [("the manifest", manifest), ("--journal", journal), ("--report", report)]
    for i, (first, a) in enumerate(named):
        for second, b in named[i + 1:]:
            if a is not None and b is not None and _same_file(a, b):
                raise InputError(f"{second} {b} is the same file as {first}: it would be "
                                 "overwritten; give another file name")


def _batch_summary(results: list[BatchResult], wheres: list[str]) -> dict[str, Any]:
    return {"total": len(results), "succeeded": sum(r.ok for r in results),
            "failed": sum(r.error is not None for r in results),
            "results": [{"index": i, "row": where, "input": r.input,
                         "task": jsonable(r.task) if r.task else None,
                         "error": jsonable(r.error) if r.error else None}
                        for i, (r, where) in enumerate(zip(results, wheres, strict=True))]}


@cli.command(epilog="\b\nExamples:\n  voiceapi batch voices.csv --dry-run\n"
                    "  voiceapi batch voices.csv --report results.csv\n"
                    "  voiceapi batch voices.jsonl --max-in-flight 5 --timeout 3600")
@click.argument("manifest", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--max-in-flight", type=click.IntRange(1, C.BATCH_MAX_SLOTS),
              help="Tasks in progress at once (default: learned from the account's limit).")
@click.option("--journal", type=click.Path(dir_okay=False, path_type=Path),
              help="Resume file (append-only); default MANIFEST.journal next to the manifest.")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path),
              help="Write every row with its task id, voice id, status and error "
                   "(.csv or .jsonl).")
@click.option("--encoding", default="utf-8-sig", show_default=True,
              help="The manifest's text encoding (a UTF-8 BOM is always accepted).")
@click.option("--dry-run", is_flag=True, help="Validate the manifest and stop.")
@click.option("--wait/--no-wait", default=True, help="Wait for every voice to finish.")
@click.option("--timeout", "batch_timeout", type=_POSITIVE,
              help="Overall seconds for the batch (--request-timeout is per HTTP attempt).")
@click.option("--redis", "redis_url", metavar="URL",
              help="Share the account's cap, request rate and journal with every process "
                   "using the same Redis and namespace (pip install 'voiceapi[redis]').")
@click.option("--namespace", metavar="NAME",
              help="Which shared state to use with --redis (default: a hash of the key).")
@_json_option
@pass_state
def batch(state: State, manifest: Path, max_in_flight: int | None, journal: Path | None,
          report: Path | None, encoding: str, dry_run: bool, wait: bool,
          batch_timeout: float | None, redis_url: str | None, namespace: str | None) -> None:
    """Create many voices from a CSV, JSON-lines or JSON-array MANIFEST.

    \b
    Columns / keys: voice_name, voice_url or video_id, optional external_task_id,
    callback_url. Every row is checked before anything is sent. A rerun with the same
    journal follows what was created and creates only the rest. Exit 1 if any item failed.
    With --redis, processes on several hosts can share one account (and one manifest).
    """
    if namespace is not None and redis_url is None:
        raise click.UsageError("--namespace: not used without --redis")
    if journal is None and not dry_run and not manifest.is_file():
        # `batch <(grep … voices.csv)` or /dev/stdin: no folder to keep MANIFEST.journal in
        # (/dev/fd), or one that is no place for it (/dev, as root).
        raise InputError(f"{manifest} is not a regular file (a pipe?): give --journal PATH, "
                         "the file a rerun resumes from")
    items, wheres, problems = _manifest.validate(_manifest.read_manifest(manifest, encoding))
    if problems:
        for p in problems:
            click.echo(p, err=True)
        raise InputError(f"{len(problems)} bad row(s) in {manifest}; nothing was sent")
    if report is not None:
        _manifest.check_report_path(report)
    if dry_run:
        _refuse_unused(["max_in_flight", "journal", "report", "wait", "batch_timeout",
                        "redis_url", "namespace"], "with --dry-run (nothing is sent)")
        out(dump({"valid": len(items)}) if state.json else f"{len(items)} rows are valid")
        return
    journal = journal or manifest.with_name(manifest.name + C.CLI_JOURNAL_SUFFIX)
    _refuse_overlapping_files(manifest, journal, report)
    _writable_journal(journal)
    coordinator_class = _redis_coordinator_class() if redis_url is not None else None
    # The Redis URL may hold a password: the resume hint says "same --redis", not the URL.
    resume = f"voiceapi batch {manifest} --journal {journal}" + \
        (" --redis … (the same)" if redis_url is not None else "")
    state.doing = (f"batch of {len(items)} from {manifest}; rerun to resume without "
                   f"duplicates (same --journal): {resume}")
    started = time.monotonic()
    with BatchBar() as bar:
        def on_progress(p: BatchProgress) -> None:
            bar.update(p)

        async def go() -> list[BatchResult]:
            options: dict[str, Any] = {
                "max_in_flight": max_in_flight, "journal": str(journal), "wait": wait,
                "timeout": batch_timeout, "on_progress": on_progress}
            if coordinator_class is None:
                return await _with_client(state, lambda c: c.custom_voices.create_many(
                    items, **options))
            # A bad URL is the coordinator's ValidationError (its message never shows the
            # password the URL may carry).
            coordinator = coordinator_class(redis_url, namespace=namespace,
                                            max_in_flight=max_in_flight)
            async with coordinator as coord, state.client(coordinator=coord) as client:
                return await client.custom_voices.create_many(items, coordinator=coord,
                                                              **options)

        results = _run(state, go)
    if report is not None:
        try:
            _manifest.write_report(report, results, wheres)
        except OSError as exc:  # the batch ran: say so, with what the journal still knows
            error(f"could not write --report {report}: {exc.strerror or exc}",
                  f"the journal {journal} lists every task created; rerun to write the report")
            raise SystemExit(C.CLI_EXIT_API_ERROR) from None
    if state.json:
        out(dump(_batch_summary(results, wheres)))
    else:
        out(result_table(results, wheres))
        ok = sum(r.ok for r in results)
        out(f"\n{ok} of {len(results)} voices ready in {time.monotonic() - started:.1f}s"
            + (f"; results in {report}" if report is not None else ""))
        if report is None and any(r.error is not None and len(str(r.error)) >
                                  C.CLI_MESSAGE_MAX_WIDTH for r in results):
            out("errors are cut short in the table: --report FILE (or --json) has them whole")
    refused = next((r.error for r in results if isinstance(r.error, AuthenticationError)), None)
    if refused is not None:  # every item carries it, cut in the table: say it once, in full
        error(str(refused), *_auth_hints(state.host))
    if any(r.error is not None for r in results):
        raise SystemExit(C.CLI_EXIT_API_ERROR)


def _redis_coordinator_class() -> Any:
    """``RedisCoordinator``, imported only for ``--redis`` (the extra may not be installed)."""
    try:
        from ..coordination import RedisCoordinator
    except ImportError:
        raise InputError(f"--redis needs the redis extra: {C.CLI_REDIS_INSTALL_HINT}") from None
    return RedisCoordinator


# --- the emulator ---------------------------------------------------------------------------------

class _MockServerCommand(click.Command):
    """``--help`` lists the emulator's own options, which come from its argparse parser (shared
    with ``python -m voiceapi.testing``) so the two never drift apart."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from ..testing import build_parser

        shown = {"port": str(C.CLI_EMULATOR_PORT),
                 "task_seconds": f"{_MOCK_DEFAULTS['task_seconds']:g}",
                 "api_key": C.CLI_EMULATOR_API_KEY, "secret_key": "a fixed key"}
        text = build_parser(prog="voiceapi mock-server", defaults_shown=shown).format_help()
        options = text.split("options:\n", 1)[-1]
        with formatter.section("Emulator options"):
            formatter.write("\n".join(line for line in options.splitlines()
                                              if "-h, --help" not in line) + "\n")
        super().format_epilog(ctx, formatter)


_MAX_PORT = 65535
_MOCK_DEFAULTS = {"port": C.CLI_EMULATOR_PORT, "task_seconds": 5.0,
                  "api_key": C.CLI_EMULATOR_API_KEY, "secret_key": C.CLI_EMULATOR_SECRET_KEY}


def _parse_fault(text: str, emulator_class: Any) -> tuple[str, str, int]:
    """``ROUTE:KIND[:TIMES]``, checked by the emulator itself (on a scratch instance that never
    starts) before the server starts, so a typo is a usage error, not a fault-free server."""
    route, _, rest = text.partition(":")
    kind, _, times_text = rest.partition(":")
    try:
        times = int(times_text) if times_text else 1
        if times < 1:
            raise ValueError("TIMES must be at least 1")
        emulator_class().inject(route, kind, times=times)
    except ValueError as exc:
        raise InputError(f"--fault {text!r}: {exc} (ROUTE:KIND[:TIMES], e.g. get:garbage:3)") \
            from None
    return route, kind, times


@cli.command("mock-server", cls=_MockServerCommand,
             context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
             epilog="\b\nExamples:\n  voiceapi mock-server --port 8787\n"
                    "  voiceapi mock-server --port 0 --json --profile strict-real "
                    "--webhook-secret whsec_dGVzdA==\n"
                    "  voiceapi mock-server --fault get:garbage:3 --fault create:1303")
@click.argument("emulator_args", nargs=-1, type=click.UNPROCESSED)
@click.option("--fault", "faults", metavar="ROUTE:KIND[:TIMES]", multiple=True,
              help="Script a fault for the next TIMES (default 1) requests to ROUTE (create, "
                   "get, list, presets, delete or *): a Kling code (5000, 1302, 1303, …) or "
                   "reset, slow, garbage, truncated, html502, commit_then_5000, "
                   "commit_then_drop. Repeatable.")
@_json_option
@pass_state
def mock_server(state: State, emulator_args: tuple[str, ...], faults: tuple[str, ...]) -> None:
    """Run the local Kling emulator until Ctrl-C (the options below are the emulator's)."""
    state.refuse_globals("mock-server", "it is the server; its key is mock-server --api-key")
    from ..testing import KlingEmulator, build_parser, serve

    scripted = [_parse_fault(f, KlingEmulator) for f in faults]

    parser = build_parser(prog="voiceapi mock-server")

    def refuse(message: str) -> NoReturn:  # argparse would print its whole usage block
        raise InputError(f"{message}; see voiceapi mock-server --help")

    parser.error = refuse  # type: ignore[method-assign]
    parsed, unknown = parser.parse_known_args(list(emulator_args))
    if parsed.port is not None and not 0 <= parsed.port <= _MAX_PORT:
        refuse(f"--port must be between 0 and {_MAX_PORT} (0 picks a free one)")
    if unknown:  # one line with a suggestion, like the other commands (not argparse's usage)
        flags = [f for action in parser._actions for f in action.option_strings]
        guess = difflib.get_close_matches(unknown[0].split("=", 1)[0], flags, n=1)
        hint = f" (did you mean {guess[0]}?)" if guess else ""
        raise InputError(f"unknown option {unknown[0]!r} for mock-server{hint}; see "
                         "voiceapi mock-server --help")
    options = {**_MOCK_DEFAULTS, **{k: v for k, v in vars(parsed).items() if v is not None}}

    def announce(emu: Any) -> None:
        for route, kind, times in scripted:
            emu.inject(route, kind, times=times)
        if state.json:
            out(dump({"base_url": emu.base_url, "access_key": emu.access_key,
                      "secret_key": emu.secret_key, "api_key": emu.api_key}))
            return
        out(f"Kling emulator on {emu.base_url}  (Ctrl-C to stop)")
        # Quoted: these lines are pasted into a shell, and a key may hold a space or a `;`.
        out(f"export KLING_BASE_URL={shlex.quote(emu.base_url)}")
        out(f"export KLING_API_KEY={shlex.quote(emu.api_key)}")
        out(f"# or AK/SK: KLING_ACCESS_KEY={shlex.quote(emu.access_key)} "
            f"KLING_SECRET_KEY={shlex.quote(emu.secret_key)}")
        out(f"# sample: {emu.sample_url(12)}")

    try:
        asyncio.run(serve(options, announce=announce))
    except ValueError as exc:  # a bad option value, named by the emulator
        raise InputError(str(exc)) from None
    except OSError as exc:
        where = f"{options.get('host', '127.0.0.1')}:{options['port']}"
        raise InputError(f"cannot listen on {where}: {exc.strerror or exc} (is another "
                         "server using it? --port 0 picks a free one)") from None
    except KeyboardInterrupt:  # before the emulator's own signal handling was in place
        pass
    click.echo("stopped", err=True)


@cli.command(epilog="\b\nExamples:\n  voiceapi demo\n  voiceapi demo --task-seconds 0.5\n"
                    "  KLING_API_KEY=... voiceapi demo --sample-url https://example.com/a.wav")
@click.option("--task-seconds", type=_Finite(min=0), default=2.0, show_default=True,
              help="Emulated time per voice (embedded emulator only).")
@click.option("--sample-url", "sample_urls", multiple=True,
              help="Sample URLs to clone (needed against a real server).")
@_json_option
@pass_state
def demo(state: State, task_seconds: float, sample_urls: tuple[str, ...]) -> None:
    """Show the whole SDK at work: against the embedded emulator unless credentials are set."""
    from .._demo import run_demo

    ctx = click.get_current_context()
    has_creds = state.has_credentials
    if not has_creds:
        given = [f for f in ("--base-url",) if f in state.explicit]
        if ctx.get_parameter_source("sample_urls") is ParameterSource.COMMANDLINE:
            given.append("--sample-url")
        if given:
            raise click.UsageError(f"{', '.join(given)} needs credentials (KLING_API_KEY, or "
                                   "KLING_ACCESS_KEY and KLING_SECRET_KEY); without them the "
                                   "demo uses its embedded emulator")
    elif ctx.get_parameter_source("task_seconds") is ParameterSource.COMMANDLINE:
        raise click.UsageError("--task-seconds is for the embedded emulator; with credentials "
                               "the demo uses your server")
    for url in sample_urls:  # refused here (exit 2), not reported as a failed voice (exit 1)
        try:
            _validation.voice_url(url)
        except ValidationError as exc:
            raise InputError(f"--sample-url {url!r}: {str(exc).replace('voice_url ', '')}") \
                from None
    state.doing = "running the demo"
    code = _run(state, lambda: run_demo(state.client if has_creds else None,
                                        task_seconds=task_seconds, sample_urls=list(sample_urls),
                                        echo=out, as_json=state.json,
                                        client_options=state.client_options()))
    raise SystemExit(code)


def main(argv: Sequence[str] | None = None) -> None:
    cli.main(args=list(argv) if argv is not None else None, prog_name="voiceapi")


__all__ = ["cli", "cli_words", "main"]
