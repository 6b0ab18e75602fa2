"""Test helpers for code that uses voiceapi: a faithful local Kling emulator.

``from voiceapi.testing import KlingEmulator``; with pytest, the ``kling_emulator`` fixture is
registered automatically (see README, "Testing your code with the emulator");
``python -m voiceapi.testing`` runs the emulator in its own process.

Names are imported on first use (PEP 562): pytest imports this package for the plugin in every
project that installs voiceapi, and should not pay for ``aiohttp.web`` unless the fixture runs.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._emulator import (
        DROPPED,
        FAULTS,
        ROUTES,
        STATS_PATH,
        KlingEmulator,
        RecordedRequest,
        make_wav,
        sign_webhook,
    )
    from ._options import PROFILES, build_parser, options_from_args
    from ._standalone import connection_info, main, serve

_HOMES = {
    **dict.fromkeys(("DROPPED", "FAULTS", "ROUTES", "STATS_PATH", "KlingEmulator",
                     "RecordedRequest", "make_wav", "sign_webhook"), "._emulator"),
    **dict.fromkeys(("PROFILES", "build_parser", "options_from_args"), "._options"),
    **dict.fromkeys(("connection_info", "main", "serve"), "._standalone"),
}

__all__ = [
    "DROPPED", "FAULTS", "PROFILES", "ROUTES", "STATS_PATH", "KlingEmulator", "RecordedRequest",
    "build_parser", "connection_info", "main", "make_wav", "options_from_args", "serve",
    "sign_webhook",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
