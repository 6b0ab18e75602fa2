"""Which reading of the Kling API the emulator plays, and how those choices are checked.

Where the evidence (kling-api.md §11.1) leaves two readings open, the emulator can play each one,
so that tests can prove the SDK works under both. The choices live here, apart from the server,
so the in-process emulator, ``python -m voiceapi.testing`` and ``voiceapi mock-server`` resolve
and validate them the same way.
"""

from __future__ import annotations

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
}

#: Named bundles of readings. ``strict-real`` is what the newest evidence says the real server
#: does (kling-api.md §11.1): one auth code (1002) for every credential problem, page sizes
#: above 500 refused, deleted voices kept in lists with ``status: "deleted"``, voices carrying
#: ``status``, money fields as decimal strings (as documented and seen live, so
#: ``numeric_money`` stays off), and a repeated ``external_task_id`` refused. List order is not
#: part of it: nothing documents it, so tests choose ``list_order`` explicitly.
PROFILES: dict[str, dict[str, Any]] = {
    "strict-real": {
        "strict_auth": True,
        "max_page_size": 500,
        "deleted_voices": "mark",
        "voice_status": True,
        "numeric_money": False,
        "unique_external_ids": True,
    },
}

LIST_ORDERS = ("newest", "oldest")
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
    for name in ("strict_auth", "voice_status", "numeric_money", "unique_external_ids"):
        if not isinstance(opts[name], bool):
            raise ValueError(f"{name} must be True or False, got {opts[name]!r}")
    size = opts["max_page_size"]
    if isinstance(size, bool) or not isinstance(size, int) or \
            not 1 <= size <= PAGE_SIZE_CEILING:
        raise ValueError(f"max_page_size must be an int between 1 and {PAGE_SIZE_CEILING} "
                         f"(the real server allows 500 or 1000), got {size!r}")
    if opts["list_order"] not in LIST_ORDERS:
        raise ValueError(f"list_order must be one of {LIST_ORDERS}, got {opts['list_order']!r}")
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
