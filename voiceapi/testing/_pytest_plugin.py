"""pytest plugin (entry point ``pytest11``): the ``kling_emulator`` fixture for users' tests.

The emulator runs on its own thread, so the fixture serves sync tests and async tests alike
(whatever loop the test uses talks to it over loopback).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ._emulator import KlingEmulator


@pytest.fixture
def kling_emulator() -> Iterator[KlingEmulator]:
    """A fresh emulator per test: concurrency 5, tasks finish in 0.2 s."""
    with KlingEmulator(concurrency=5, task_seconds=0.2) as emu:
        yield emu
