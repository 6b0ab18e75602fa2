"""pytest plugin (entry point ``pytest11``): the ``kling_emulator`` fixture for users' tests.

pytest loads this module in every project that installs voiceapi, so it imports only pytest:
the emulator (and ``aiohttp.web`` with it) is imported when a test first uses the fixture.

The emulator runs on its own thread, so the fixture serves sync tests and async tests alike
(whatever loop the test uses talks to it over loopback). A test during which the emulator hit
one of its own bugs fails at teardown, with the traceback: otherwise the 5000 it answers would
be retried by the SDK and the bug would pass unseen.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from ._emulator import KlingEmulator


def fail_on_internal_errors(emu: KlingEmulator) -> None:
    """Fail the current test if the emulator recorded internal errors."""
    report = emu.internal_error_report()
    if report is not None:
        pytest.fail(report, pytrace=False)


@pytest.fixture
def kling_emulator() -> Iterator[KlingEmulator]:
    """A fresh emulator per test: concurrency 5, tasks finish in 0.2 s."""
    from ._emulator import KlingEmulator

    with KlingEmulator(concurrency=5, task_seconds=0.2) as emu:
        yield emu
    fail_on_internal_errors(emu)
