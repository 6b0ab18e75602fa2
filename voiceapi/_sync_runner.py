"""The engine of the sync facade: one long-lived event loop on one daemon thread per client.

A sync call submits the async coroutine to that loop and blocks on the result: the cost of a
thread hop, not of starting a loop, and the aiohttp session keeps its connection pool.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Coroutine, Iterator
from typing import Any, TypeVar

from ._errors import ClientClosedError

T = TypeVar("T")


class LoopThread:
    """Owns a private event loop running on a daemon thread, started on first use."""

    def __init__(self, name: str = "voiceapi-sync") -> None:
        self._name = name
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._closed:
                raise ClientClosedError("this client is closed; create a new one")
            if self._loop is None or self._pid != os.getpid():
                self._pid = os.getpid()  # a fork child gets a fresh loop of its own
                loop = asyncio.new_event_loop()
                started = threading.Event()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(started.set)
                    loop.run_forever()

                thread = threading.Thread(target=run, name=self._name, daemon=True)
                thread.start()
                if not started.wait(30):
                    raise RuntimeError("the client's event-loop thread did not start")
                self._loop, self._thread = loop, thread
            return self._loop

    def in_loop_thread(self) -> bool:
        thread = self._thread
        return thread is not None and thread.ident == threading.get_ident()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the private loop and block until it is done."""
        try:
            loop = self._ensure_loop()
            if self.in_loop_thread():
                raise RuntimeError(
                    "a VoiceClient method was called from the client's own event-loop thread "
                    "(e.g. from a middleware); that would deadlock. Use AsyncVoiceClient there.")
        except BaseException:
            coro.close()  # never leave a "coroutine was never awaited" behind
            raise
        # Leaner than run_coroutine_threadsafe (no concurrent Future, no callback chain): the
        # hop is two thread wake-ups, and on a busy machine those dominate a sync call's cost.
        done = threading.Lock()
        done.acquire()
        box: list[asyncio.Task[T]] = []

        def start() -> None:
            task = loop.create_task(coro)
            box.append(task)
            task.add_done_callback(lambda _: done.release())

        try:
            loop.call_soon_threadsafe(start)
        except RuntimeError:  # the loop was closed under us by close() in another thread
            coro.close()
            raise ClientClosedError("this client is closed; create a new one") from None
        try:
            done.acquire()
        except KeyboardInterrupt:
            # Ctrl-C: cancel the work on the loop (start() runs first, so box is filled),
            # then let the interrupt through promptly.
            loop.call_soon_threadsafe(lambda: box[0].cancel())
            raise
        return box[0].result()

    def iterate(self, agen: AsyncIterator[T]) -> Iterator[T]:
        """A plain iterator over an async one; breaking out early closes the async generator."""
        finished = False
        try:
            while True:  # ends with StopAsyncIteration; the async iterators are bounded
                try:
                    item = self.run(_anext(agen))
                except StopAsyncIteration:
                    finished = True
                    return
                yield item
        finally:
            if not finished and isinstance(agen, AsyncGenerator) and not self._closed \
                    and not self.in_loop_thread():
                self.run(agen.aclose())

    def stop(self) -> None:
        """Finish leftover tasks (e.g. one cancelled by Ctrl-C), stop the loop, join the thread.

        Like ``asyncio.run``'s exit: nothing is left pending, so nothing is "destroyed".
        """
        if self._loop is not None and not self._closed and self._pid == os.getpid() \
                and not self.in_loop_thread():
            self.run(_drain())
        with self._lock:
            self._closed = True
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is None or thread is None:
            return
        if self._pid == os.getpid():
            loop.call_soon_threadsafe(loop.stop)
            if thread is not threading.current_thread():
                thread.join(10)
            if not thread.is_alive():
                loop.close()

    def forget_after_fork(self) -> None:
        """The parent's loop thread does not exist in a fork child; start afresh on next use.
        The old loop is kept alive untouched: closing it could disturb the parent's sockets."""
        from ._transport import FORK_ORPHANS

        self._lock = threading.Lock()  # it may have been held by another thread at fork time
        if self._loop is not None:
            FORK_ORPHANS.append(self._loop)
        self._loop = self._thread = None


async def _anext(agen: AsyncIterator[T]) -> T:
    return await agen.__anext__()


async def _drain(grace: float = 5.0) -> None:
    """Cancel every other task on this loop and wait (bounded) for them to unwind."""
    me = asyncio.current_task()
    others = [t for t in asyncio.all_tasks() if t is not me]
    for task in others:
        task.cancel()
    if others:
        await asyncio.wait(others, timeout=grace)
    await asyncio.get_running_loop().shutdown_asyncgens()
