"""The emulator as its own process: ``python -m voiceapi.testing [options]``.

Multi-process tests and benchmarks need a server they do not share a loop (or a GIL) with. The
runner prints one JSON line with what a client needs, serves until SIGTERM or SIGINT, and then
stops cleanly (exit 0). It uses argparse, not click, so it works without the ``[cli]`` extra;
``voiceapi mock-server`` reuses :func:`serve` and :func:`options_from_args`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import Any

from ._emulator import KlingEmulator
from ._options import options_from_args


def connection_info(emu: KlingEmulator) -> dict[str, str]:
    """What a client needs to talk to a running emulator."""
    return {"base_url": emu.base_url, "access_key": emu.access_key,
            "secret_key": emu.secret_key, "api_key": emu.api_key}


def print_json_line(emu: KlingEmulator) -> None:
    """The runner's announcement: one JSON line on stdout, flushed so a parent can read it."""
    sys.stdout.write(json.dumps(connection_info(emu)) + "\n")
    sys.stdout.flush()


async def serve(options: dict[str, Any], *,
                announce: Callable[[KlingEmulator], None] = print_json_line,
                stop: asyncio.Event | None = None) -> None:
    """Run ``KlingEmulator(**options)`` until ``stop`` is set, or, when no event is given,
    until SIGTERM/SIGINT (handled on the main thread only, where signals arrive)."""
    loop = asyncio.get_running_loop()
    handled: list[signal.Signals] = []
    if stop is None:
        stop = asyncio.Event()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):  # e.g. Windows
                    loop.add_signal_handler(sig, stop.set)
                    handled.append(sig)
    try:
        async with KlingEmulator(**options) as emu:
            announce(emu)
            await stop.wait()
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m voiceapi.testing``; returns the exit status."""
    options = options_from_args(argv)
    try:
        asyncio.run(serve(options))
    except ValueError as exc:  # a bad option value: a usage error, one line
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before the handlers were in place
        return 130
    except OSError as exc:  # e.g. the port is taken
        where = f"{options.get('host', '127.0.0.1')}:{options.get('port', 0)}"
        print(f"error: cannot serve on {where}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0
