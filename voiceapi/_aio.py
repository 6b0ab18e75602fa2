"""Small asyncio helpers shared by the resources and the batch scheduler."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def within(aw: Awaitable[T], seconds: float) -> T:
    """``await aw`` with a time limit (raises TimeoutError).

    Not ``asyncio.wait_for`` on 3.11: when the inner call finishes just as the caller is
    cancelled, it returns the result and swallows the cancellation (fixed in 3.12), so a
    Ctrl-C or ``task.cancel()`` could be lost. ``asyncio.timeout`` has no such race.
    """
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            return await aw
    return await asyncio.wait_for(aw, seconds)  # pragma: no cover - Python 3.10
