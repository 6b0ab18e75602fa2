"""Which reading of the Kling API the emulator plays, and how those choices are checked.

Where the evidence (kling-api.md §11.1) leaves two readings open, the emulator can play each one,
so that tests can prove the SDK works under both. The choices live here, apart from the server,
so the in-process emulator, ``python -m voiceapi.testing`` and ``voiceapi mock-server`` resolve
and validate them the same way.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from typing import Any

#: Built-in value of every "reading" option (used when neither the caller nor a profile sets it).
READING_DEFAULTS: dict[str, Any] = {
    "strict_auth": False,
    "max_page_size": 1000,
    "list_order": "newest",
    "deleted_voices": "mark",
    "voice_status": True,
    "numeric_money": False,
    "unique_external_ids": True,
    # Off: the mp3/wav/mp4/mov rule is about the media, not the URL (kling-api.md §11.1);
    # signed/CDN URLs often have no extension, and a wrong format becomes a failed task.
    "check_url_extension": False,
    "pending_voices": "empty",
}

#: Named bundles of readings. ``strict-real`` is what the newest evidence says the real server
#: does (kling-api.md §11.1): one auth code (1002) for every credential problem, page sizes
#: above 500 refused, deleted voices kept in lists with ``status: "deleted"``, voices carrying
#: ``status``, money fields as decimal strings (as documented and seen live, so
#: ``numeric_money`` stays off), a repeated ``external_task_id`` refused, and no check of the
#: URL's file extension (the mp3/wav/mp4/mov rule is about the media: signed and CDN URLs often
#: have no extension; a wrong format becomes a failed task). List order is not part of it:
#: nothing documents it, so tests choose ``list_order`` explicitly.
PROFILES: dict[str, dict[str, Any]] = {
    "strict-real": {
        "strict_auth": True,
        "max_page_size": 500,
        "deleted_voices": "mark",
        "voice_status": True,
        "numeric_money": False,
        "unique_external_ids": True,
        "check_url_extension": False,
    },
}

LIST_ORDERS = ("newest", "oldest")
#: How a task that has not succeeded shows its voices: ``task_result.voices`` as ``[]``, as
#: ``null``, or no ``task_result`` at all (the docs say "empty or absent until succeed").
PENDING_VOICES = ("empty", "null", "absent")
DELETED_VOICES = ("mark", "drop")
#: The most any page-size refusal can allow: the documented voice-list bound.
PAGE_SIZE_CEILING = 1000


def resolve_readings(profile: str | None, given: dict[str, Any]) -> dict[str, Any]:
    """The reading options in force: explicit values win over the profile, which wins over
    the built-in defaults. Raises ValueError naming the option for a bad value."""
    if profile is not None and profile not in PROFILES:
        raise ValueError(f"profile must be None or one of {sorted(PROFILES)}, got {profile!r}")
    unknown = set(given) - set(READING_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown emulator reading option(s): {sorted(unknown)}")
    out = dict(READING_DEFAULTS)
    if profile is not None:
        out.update(PROFILES[profile])
    out.update({k: v for k, v in given.items() if v is not None})
    _check_readings(out)
    return out


def _check_readings(opts: dict[str, Any]) -> None:
    for name in ("strict_auth", "voice_status", "numeric_money", "unique_external_ids",
                 "check_url_extension"):
        if not isinstance(opts[name], bool):
            raise ValueError(f"{name} must be True or False, got {opts[name]!r}")
    size = opts["max_page_size"]
    if isinstance(size, bool) or not isinstance(size, int) or \
            not 1 <= size <= PAGE_SIZE_CEILING:
        raise ValueError(f"max_page_size must be an int between 1 and {PAGE_SIZE_CEILING} "
                         f"(the real server allows 500 or 1000), got {size!r}")
    if opts["list_order"] not in LIST_ORDERS:
        raise ValueError(f"list_order must be one of {LIST_ORDERS}, got {opts['list_order']!r}")
    if opts["pending_voices"] not in PENDING_VOICES:
        raise ValueError(f"pending_voices must be one of {PENDING_VOICES}, "
                         f"got {opts['pending_voices']!r}")
    if opts["deleted_voices"] not in DELETED_VOICES:
        raise ValueError(f"deleted_voices must be one of {DELETED_VOICES}, "
                         f"got {opts['deleted_voices']!r}")


def check_number(name: str, value: Any, *, minimum: float, allow_none: bool = False,
                 integer: bool = False) -> None:
    """ValueError naming the option unless ``value`` is a number ≥ ``minimum``."""
    if value is None and allow_none:
        return
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not value >= minimum:
        kind = "an int" if integer else "a number"
        raise ValueError(f"{name} must be {kind} >= {minimum:g}, got {value!r}")


def build_parser(prog: str = "python -m voiceapi.testing",
                 defaults_shown: dict[str, str] | None = None) -> argparse.ArgumentParser:
    """The emulator's command-line options (argparse, so no click is needed).

    Every option defaults to "not given": the emulator's own defaults (and ``--profile``) then
    apply, exactly as for ``KlingEmulator(...)`` in code. ``defaults_shown`` (option dest →
    text) is for a front end with defaults of its own: its help then says those.
    """
    p = argparse.ArgumentParser(
        prog=prog, description="Run the local Kling Custom Voice emulator until SIGTERM/SIGINT. "
        "Prints one JSON line with base_url, access_key, secret_key and api_key; "
        "GET {base_url}/_emulator/stats shows what the server saw.")
    add = p.add_argument
    add("--host", help="interface to listen on (default 127.0.0.1)")
    add("--port", type=int, help="port (default 0: any free port)")
    add("--concurrency", type=int, help="tasks in progress before 429/1303 (default 5)")
    add("--task-seconds", type=float, help="time a task takes to finish (default 0.2)")
    add("--processing-after", type=float, help="seconds until 'processing' (default 1/4 of it)")
    add("--qps", type=float, help="requests per second before 429/1302 (default: no limit)")
    add("--api-key", help="API key to accept (default: random)")
    add("--access-key", help="JWT access key to accept (default emulator-access-key)")
    add("--secret-key", help="JWT secret key (default: random)")
    add("--account-id", help="numeric creator id in owned_by")
    add("--webhook-secret", help="whsec_… secret: sign callbacks (Standard Webhooks)")
    add("--callback-retries", type=int, help="extra callback attempts on non-2xx (default 0)")
    add("--presets", type=int, help="number of preset voices (default 48)")
    add("--profile", choices=sorted(PROFILES), help="bundle of real-server readings")
    add("--max-page-size", type=int, help="largest pageSize accepted (500 or 1000)")
    add("--list-order", choices=LIST_ORDERS, help="list order (default newest)")
    add("--deleted-voices", choices=DELETED_VOICES, help="keep deleted voices (mark) or drop")
    add("--pending-voices", choices=PENDING_VOICES,
        help="voices of an unfinished task: [] (empty), null, or absent")
    flag = argparse.BooleanOptionalAction
    add("--strict-auth", action=flag, help="answer 1002 for every auth problem")
    add("--voice-status", action=flag, help="voices carry status (default on)")
    add("--numeric-money", action=flag, help="money as numbers, timestamps as strings")
    add("--unique-external-ids", action=flag, help="refuse a repeated external_task_id "
        "(default on)")
    add("--check-url-extension", action=flag, help="refuse a voice_url whose path does not "
        "end in .mp3/.wav/.mp4/.mov (default off: the media is judged, a wrong format fails "
        "the task)")
    add("--reject-both-sources", action=flag, help="refuse voice_url and video_id together")
    add("--unique-voice-names", action=flag, help="refuse a repeated voice_name")
    add("--max-body-bytes", type=int, help="largest request body")
    add("--max-recorded-requests", type=int, help="length of the in-memory request log")
    add("--seed", type=int, help="seed for ids")
    for action in p._actions:  # argparse keeps no public list of its options
        shown = (defaults_shown or {}).get(action.dest)
        if shown is not None and action.help:
            action.help = re.sub(r"\(default[^)]*\)", f"(default {shown})", action.help)
    return p


def options_from_args(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``KlingEmulator(**options_from_args(argv))``: only the options given on the command
    line, so the emulator's defaults and profile apply to the rest. Exits 2 on bad usage."""
    args = build_parser().parse_args(argv)
    return {k: v for k, v in vars(args).items() if v is not None}
