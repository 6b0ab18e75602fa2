"""Test helpers for code that uses voiceapi: a faithful local Kling emulator.

``from voiceapi.testing import KlingEmulator``; with pytest, the ``kling_emulator`` fixture is
registered automatically (see README, "Testing your code").
"""

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

__all__ = [
    "DROPPED", "FAULTS", "PROFILES", "ROUTES", "STATS_PATH", "KlingEmulator", "RecordedRequest",
    "build_parser", "connection_info", "main", "make_wav", "options_from_args", "serve",
    "sign_webhook",
]
