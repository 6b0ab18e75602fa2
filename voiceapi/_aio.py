"""Small asyncio helpers shared by the resources and the batch scheduler."""

from __future__ import annotations

import asyncio
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine
from types import FrameType
from typing import Any, TypeVar

T = TypeVar("T")


async def within(aw: Awaitable[T], seconds: float, *,
                 undo: Callable[[T], object] | None = None) -> T:
    """``await aw`` with a time limit (raises the builtin TimeoutError, on 3.10 too).

    Not ``asyncio.wait_for`` before 3.12: when the inner call finishes just as the caller is
    cancelled, it returns the result and swallows the cancellation, so a Ctrl-C or
    ``task.cancel()`` could be lost. ``asyncio.timeout`` (3.11+) has no such race.

    ``undo(result)``: on 3.10 the call runs as a task of its own, which can finish while the
    caller is being cancelled; its result is then never delivered, and ``undo`` gives back
    what it holds (a request slot). On 3.11+ the call runs inline: it never happens.
    """
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            return await aw
    return await _within_310(aw, seconds, undo)  # pragma: no cover - Python 3.10


async def _within_310(aw: Awaitable[T], seconds: float,
                      undo: Callable[[T], object] | None) -> T:  # pragma: no cover - 3.10
    # asyncio.wait, unlike wait_for, lets the caller's cancel through even when the inner
    # call has finished in the meantime; the inner call never outlives us (as with wait_for).
    inner = asyncio.ensure_future(aw)
    delivered = False
    try:
        try:
            done, _ = await asyncio.wait((inner,), timeout=seconds)
        except asyncio.CancelledError:
            await _stop(inner)
            raise
        if not done:
            await _stop(inner)
            if inner.cancelled():
                raise TimeoutError
        delivered = True  # it ended on its own (right at the limit, maybe): that stands
        return inner.result()
    finally:
        if not delivered and undo is not None:
            _undo_when_done(inner, undo)


def _undo_when_done(inner: asyncio.Future[T],
                    undo: Callable[[T], object]) -> None:  # pragma: no cover - 3.10
    """``undo`` the result ``inner`` has, or will have (a second cancel can leave us before
    it ends), since nobody receives it."""
    def settle(future: asyncio.Future[T]) -> None:
        if not future.cancelled() and future.exception() is None:
            undo(future.result())

    if inner.done():
        settle(inner)
    else:
        inner.add_done_callback(settle)


async def _stop(inner: asyncio.Future[Any]) -> None:  # pragma: no cover - Python 3.10
    """Cancel ``inner`` and wait until it has ended (its outcome is not ours any more)."""
    inner.cancel()
    try:
        await asyncio.wait((inner,))
    finally:
        if inner.done() and not inner.cancelled():
            inner.exception()  # retrieved: no "exception was never retrieved" report


def run_main(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` with Python 3.11's Ctrl-C behaviour on 3.10 as well.

    On 3.10 a Ctrl-C raises KeyboardInterrupt inside whichever task happens to be running (a
    socket write, say). That task keeps it as its result and re-raises it, the loop then
    cancels the others, and a task awaiting it raises it a second time where nobody collects
    it: asyncio prints "Task exception was never retrieved" and a traceback after the CLI's own
    message. 3.11's runner turns the first Ctrl-C into a cancellation of the main task, lets
    every ``finally`` run, then raises KeyboardInterrupt once; this is that, for 3.10.
    """
    if sys.version_info >= (3, 11):
        return asyncio.run(main)
    return _run_main_310(main)  # pragma: no cover - Python 3.10


def _run_main_310(main: Coroutine[Any, Any, T]) -> T:  # pragma: no cover - Python 3.10
    # asyncio.run's own check, before anything is touched: past it, a call from inside a loop
    # swapped the SIGINT handler, failed with another message and left a task pending.
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError("asyncio.run() cannot be called from a running event loop")
    loop = asyncio.new_event_loop()
    interrupts = 0
    task = loop.create_task(main)

    def on_sigint(signum: int, frame: FrameType | None) -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts == 1 and not task.done():
            task.cancel()
            loop.call_soon_threadsafe(lambda: None)  # wake a select() with a long timeout
            return
        raise KeyboardInterrupt  # a second Ctrl-C: the user insists

    ours = (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    if ours:
        signal.signal(signal.SIGINT, on_sigint)
    try:
        asyncio.set_event_loop(loop)
        try:
            return loop.run_until_complete(task)
        except asyncio.CancelledError:
            if interrupts:
                raise KeyboardInterrupt from None
            raise
    finally:
        if ours and signal.getsignal(signal.SIGINT) is on_sigint:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            _cancel_the_rest(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def _cancel_the_rest(loop: asyncio.AbstractEventLoop) -> None:  # pragma: no cover - 3.10
    pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for t in pending:
        t.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
