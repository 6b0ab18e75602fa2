"""Test helpers for code that uses voiceapi: a faithful local Kling emulator.

``from voiceapi.testing import KlingEmulator``; with pytest, the ``kling_emulator`` fixture is
registered automatically (see README, "Testing your code").
"""

from ._emulator import FAULTS, ROUTES, KlingEmulator, RecordedRequest, make_wav, sign_webhook

__all__ = ["FAULTS", "ROUTES", "KlingEmulator", "RecordedRequest", "make_wav", "sign_webhook"]
