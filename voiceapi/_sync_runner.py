"""The engine of the sync facade: one long-lived event loop on one daemon thread per client.

A sync call submits the async coroutine to that loop and blocks on the result: the cost of a
thread hop, not of starting a loop, and the aiohttp session keeps its connection pool.

This module also owns the facade's lifecycle edges: closing while other threads are in calls,
a client dropped without ``close()`` (finalizer), interpreter exit, and ``os.fork()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
import weakref
from _thread import allocate_lock as _allocate_lock
from _thread import get_ident
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine, Iterator
from typing import Any, Generic, TypeVar

from ._errors import ClientClosedError

T = TypeVar("T")

_CLOSED = "this client is closed; create a new one"
THREAD_NAME = "voiceapi-sync"
#: Every sync call's task: a fixed name tells them apart in a debugger and is cheaper than
#: asyncio's numbered default (formatted per task).
TASK_NAME = "voiceapi-sync-call"
_DESTROYED_PENDING = "Task was destroyed but it is pending!"  # asyncio's message, verbatim
#: How long close() waits for calls it cancelled to unwind, and for the thread to end.
SHUTDOWN_GRACE = 5.0

#: Loop-bound objects inherited from the parent across fork: kept alive, never closed.
#: Closing (or collecting) them would unregister the parent's sockets from the epoll instance
#: that parent and child share after fork, and hang the parent.
FORK_ORPHANS: list[object] = []
_runners: weakref.WeakSet[LoopThread] = weakref.WeakSet()
#: Call bodies closed before any task ran them (see _Call.discard).
_UNBORN: weakref.WeakSet[Coroutine[Any, Any, None]] = weakref.WeakSet()


class LoopThread:
    """Owns a private event loop running on a daemon thread, started on first use.

    ``on_fork`` is called in a fork child; it forgets the client's loop-bound state and returns
    what must be kept alive untouched.
    """

    def __init__(self, on_fork: Callable[[], list[object]] | None = None) -> None:
        self._on_fork = on_fork
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._thread_ident: int | None = None
        #: The loop is ours (a _HandOffLoop, not in debug mode): the caller's thread creates
        #: each call's task (see run); otherwise the loop thread does (_Call.start).
        self._direct = False
        #: Calls started by _Call.start and not finished (touched on the loop thread only).
        self._calls: set[_Call[Any]] = set()
        self._closing = False
        self._closed = False
        #: Set by _shutdown just before it stops the loop: any other stop is not the end.
        self._stopping = threading.Event()
        _runners.add(self)

    @property
    def closed(self) -> bool:
        return self._closing

    def _ensure_loop(self) -> asyncio.AbstractEventLoop:
        # Caller holds self._lock.
        if self._loop is None:
            loop = _new_loop()
            started = threading.Event()
            stopping = self._stopping

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(started.set)
                try:
                    # Only _shutdown ends the loop. A SystemExit or KeyboardInterrupt raised
                    # in a task (say a middleware's, in a batch worker) escapes run_forever
                    # after the task has stored it: run on, and the call awaiting that task
                    # re-raises it in its caller's thread. A stopped loop would leave every
                    # caller waiting for ever. Each pass ends with one such raise or stop().
                    while not stopping.is_set():
                        with contextlib.suppress(SystemExit, KeyboardInterrupt):
                            loop.run_forever()
                finally:
                    if not stopping.is_set():  # the loop broke: no call can finish any more
                        self._closing = self._closed = True
                    # The loop closes itself once stopped: also right when the stop came
                    # from a finalizer running on this very thread.
                    loop.close()

            thread = threading.Thread(target=run, name=THREAD_NAME, daemon=True)
            thread.start()
            if not started.wait(30):
                raise RuntimeError("the client's event-loop thread did not start")
            self._loop, self._thread, self._thread_ident = loop, thread, thread.ident
            # Debug mode checks that call_soon runs on the loop's thread: hand over there.
            self._direct = (_HANDOFF is not None and isinstance(loop, _HANDOFF)
                            and not loop.get_debug())
        return self._loop

    def in_loop_thread(self) -> bool:
        return self._thread_ident == get_ident()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the private loop and block until it is done.

        A call that ``close()`` (from any thread) interrupts raises ClientClosedError; a call
        that finished before keeps its result.
        """
        call: _Call[T] = _Call(coro)
        handed = False
        try:
            with self._lock:
                # Handing over under the lock orders every call before close()'s shutdown
                # step on the loop, so none is left queued behind a stopped loop.
                if self._closing:
                    raise ClientClosedError(_CLOSED)
                loop = self._loop or self._ensure_loop()
                if self._thread_ident == get_ident():
                    raise RuntimeError(
                        "a VoiceClient method was called from the client's own event-loop "
                        "thread (e.g. from a middleware); that would deadlock. Use "
                        "AsyncVoiceClient there.")
                handed = True
                # Debug mode checks that call_soon runs on the loop's thread, and a call may
                # turn it on at any time (loop.set_debug): read it each time.
                if self._direct and not loop._debug:  # type: ignore[attr-defined]
                    # Our loop: the task is created here, on the caller's thread. Creating it
                    # queues its first step with loop.call_soon, the same deque append that
                    # call_soon_threadsafe does (only debug mode adds a thread check, and a
                    # debug loop is not "direct"); the write then wakes the loop. The step is
                    # queued before the loop wakes, so it runs in the wake-up's own loop
                    # iteration; a task created by a callback on the loop would take its first
                    # step one iteration later. (Inline, not a method: one frame less.)
                    # A Ctrl-C inside Task() leaves call.task unset: the body then notes its
                    # own task, so abort() can still cancel it.
                    call.body = body = call._body()
                    call.task = asyncio.Task(body, loop=loop, name=TASK_NAME)
                    loop._write_to_self()  # type: ignore[attr-defined]
                else:
                    loop.call_soon_threadsafe(call.start, loop, self._calls)
        except BaseException:
            if handed and not loop.is_closed():
                # Ctrl-C while handing the call over: the loop may own the coroutine already,
                # so end it there (abort runs after the call's first step, if it has one).
                with contextlib.suppress(RuntimeError):  # the loop may be closed by now
                    loop.call_soon_threadsafe(call.abort)
            else:  # nothing was handed over, or nothing can run it any more
                call.discard()  # never leave a "coroutine was never awaited" behind
            raise
        done = call.done
        try:
            # The timeout is a safety net, not a poll: a call whose task close() could not
            # end within its grace period must not block its thread forever.
            while not done.acquire(True, SHUTDOWN_GRACE):
                if self._closed and not done.acquire(False):
                    raise ClientClosedError("the client was closed during this call")
        except KeyboardInterrupt:
            # Ctrl-C: cancel the work on the loop (its task exists by then), then let the
            # interrupt through promptly.
            with contextlib.suppress(RuntimeError):  # the loop may be closed by now
                loop.call_soon_threadsafe(call.abort)
            raise
        if call.error is None:
            return call.result  # type: ignore[return-value]  # set: no error, so a result
        return call.outcome(self._closing)

    def iterate(self, agen: AsyncIterator[T], owner: object = None) -> Iterator[T]:
        """A plain iterator over an async one; breaking out early closes the async generator.

        ``owner`` (the VoiceClient) is kept alive while the iterator is: a client that is
        garbage-collected is closed, and that would end the iteration half-way.
        """
        finished = failed = False
        #: The task of the latest __anext__: a Ctrl-C leaves it being cancelled on the loop.
        latest: list[asyncio.Task[Any] | None] = [None]
        try:
            while True:  # ends with StopAsyncIteration; the async iterators are bounded
                try:
                    item = self.run(_anext(agen, latest))
                except StopAsyncIteration:
                    finished = True
                    return
                yield item
        except GeneratorExit:  # closed early (break, or the iterator dropped)
            raise
        except BaseException:
            failed = True
            raise
        finally:
            if not finished and isinstance(agen, AsyncGenerator) and not self._closing \
                    and not self.in_loop_thread():
                try:
                    self.run(_aclose(agen, latest[0]))
                except ClientClosedError:
                    pass  # closed meanwhile: the loop's shutdown closes the generator
                except Exception:
                    if not failed:  # the error (a Ctrl-C above all) is what the caller
                        raise  # must see, not a failure to tidy up after it
            del owner

    def shutdown(self, final: Coroutine[Any, Any, None] | None = None) -> None:
        """Stop taking calls, cancel the ones in progress (they raise ClientClosedError), run
        ``final`` (closing the session), stop the loop and join its thread. Safe twice, from
        any thread, and from the loop thread itself (then without waiting).

        Like ``asyncio.run``'s exit: nothing is left pending, so nothing is "destroyed".
        """
        with self._lock:
            if self._closing:
                if final is not None:
                    final.close()
                thread = self._thread
                if thread is not None and thread is not threading.current_thread():
                    thread.join(SHUTDOWN_GRACE * 3)  # a second closer also waits for the end
                return
            self._closing = True
            loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            if final is not None:
                _finish_without_loop(final)
            self._closed = True
            return
        try:
            calls = self._calls
            stopping = self._stopping
            loop.call_soon_threadsafe(
                lambda: loop.create_task(_shutdown(loop, final, calls, stopping)))
        except RuntimeError:  # the loop is already closed (e.g. stopped from its own thread)
            if final is not None:
                final.close()
        if thread is not threading.current_thread():
            thread.join(SHUTDOWN_GRACE * 3)
        self._closed = True

    def _after_fork_in_child(self) -> None:
        """The parent's loop thread does not exist in a fork child; start afresh on next use.
        The old loop is kept alive untouched (see FORK_ORPHANS)."""
        self._lock = threading.Lock()  # it may have been held by another thread at fork time
        if self._loop is not None:
            FORK_ORPHANS.append(self._loop)
        self._loop = self._thread = self._thread_ident = None
        self._stopping = threading.Event()
        self._calls = set()  # the parent's calls: their threads do not exist here
        if self._on_fork is not None:
            FORK_ORPHANS.extend(self._on_fork())


if sys.platform != "win32":
    class _HandOffLoop(asyncio.SelectorEventLoop):
        """The private loop, woken through its self-pipe once per sync call.

        asyncio's wake-up handler reads its self-pipe until EAGAIN, so every wake-up also
        raises and catches a BlockingIOError: on the sync hop that is a large share of the
        instructions that are not the hand-off itself. One read is enough: the pipe is
        level-triggered, so any bytes left over wake the loop again at once.

        It is also the loop that lets LoopThread.run create a call's task from the caller's
        thread, and so stays quiet about a task that a Ctrl-C stopped on its way in.
        """

        def call_exception_handler(self, context: dict[str, Any]) -> None:
            task = context.get("task")
            if (isinstance(task, asyncio.Task) and task.get_name() == TASK_NAME
                    and context.get("message") == _DESTROYED_PENDING
                    and _never_started(task.get_coro())):
                # A Ctrl-C in the caller's thread stopped a call's Task() before it queued the
                # first step: the task never reached the loop, and run() ends the call (its
                # coroutines are closed). Nothing was lost, so nothing to report.
                return
            super().call_exception_handler(context)

        def _read_from_self(self) -> None:
            try:
                data = self._ssock.recv(4096)  # type: ignore[attr-defined]
            except (InterruptedError, BlockingIOError):
                return
            if data.strip(b"\0"):  # only wake-up bytes (no signal numbers): nothing to do
                self._process_self_data(data)  # type: ignore[attr-defined]

    def _new_loop() -> asyncio.AbstractEventLoop:
        return _HandOffLoop()

    _HANDOFF: type[asyncio.AbstractEventLoop] | None = _HandOffLoop
else:  # pragma: no cover - the proactor loop wakes differently
    def _new_loop() -> asyncio.AbstractEventLoop:
        return asyncio.new_event_loop()

    _HANDOFF = None


class _Call(Generic[T]):
    """One sync call's hand-off: the loop thread runs the coroutine and releases ``done``
    in the same step that finishes it (a done-callback would cost another loop iteration).

    The caller's thread builds the call and, on our own loop, its task (``LoopThread.run``);
    every other method runs on the loop thread, except ``outcome`` (after ``done``) and
    ``discard`` (for a call that was never handed over).
    """

    __slots__ = ("aborted", "body", "coro", "done", "error", "pending", "result", "started",
                 "task")

    def __init__(self, coro: Coroutine[Any, Any, T]) -> None:
        self.coro = coro
        self.done = done = _allocate_lock()
        done.acquire()
        self.task: asyncio.Task[None] | None = None
        self.body: Coroutine[Any, Any, None] | None = None
        self.pending: set[_Call[Any]] | None = None
        self.result: T | None = None
        self.error: BaseException | None = None
        self.started = self.aborted = False

    def start(self, loop: asyncio.AbstractEventLoop, pending: set[_Call[Any]]) -> None:
        """The hand-off on any other loop (or in debug mode): on the loop thread."""
        if self.aborted:  # aborted before it started (Ctrl-C during the hand-off)
            return
        self.pending = pending
        pending.add(self)
        self.body = body = self._body()
        # asyncio.Task directly rather than loop.create_task (a Python-level wrapper): the
        # private loop has no task factory, so the task is the same, one frame cheaper.
        self.task = asyncio.Task(body, loop=loop, name=TASK_NAME)

    async def _body(self) -> None:
        self.started = True
        if self.task is None:  # the caller was interrupted before it could note its task
            self.task = asyncio.current_task()
        try:
            self.result = await self.coro
        except BaseException as exc:  # handed to the calling thread, cancellation included
            self.error = exc
        finally:
            if self.pending is not None:
                self.pending.discard(self)
            self.done.release()

    def abort(self) -> None:
        """Cancel the call (Ctrl-C, close). A task cancelled before its first step never runs
        ``_body``, and a Ctrl-C may have stopped the hand-off before the task was queued: an
        unstarted call is ended here, its coroutines closed, its caller released."""
        task = self.task
        if task is not None:
            task.cancel()
        if self.started or self.aborted:
            return
        self.aborted = True
        self.discard()
        self.error = asyncio.CancelledError()
        if self.pending is not None:
            self.pending.discard(self)
        self.done.release()

    def discard(self) -> None:
        """Close the coroutines of a call that will never run (no "never awaited" warning).
        A body owned by a task is left to it: the task ends it."""
        self.coro.close()
        body = self.body
        if body is not None and self.task is None:
            # A Ctrl-C may have stopped Task() half-way: a task the loop never saw may still
            # hold this body, and asyncio reports it whenever that task is collected.
            _UNBORN.add(body)
            body.close()

    def outcome(self, closing: bool) -> T:
        error = self.error
        if error is None:
            return self.result  # type: ignore[return-value]  # set: no error, so a result
        self.error = None  # no reference cycle through the traceback
        if closing and isinstance(error, asyncio.CancelledError):
            raise ClientClosedError("the client was closed during this call")
        raise error


def _never_started(coro: object) -> bool:
    """A call body that never ran: still unstarted, or closed by ``_Call.discard``."""
    import inspect  # only on this rare path: a Ctrl-C during a hand-off

    if not inspect.iscoroutine(coro):
        return False
    return coro in _UNBORN or inspect.getcoroutinestate(coro) == inspect.CORO_CREATED


async def _anext(agen: AsyncIterator[T], latest: list[asyncio.Task[Any] | None]) -> T:
    latest[0] = asyncio.current_task()
    return await agen.__anext__()


async def _aclose(agen: AsyncGenerator[Any, Any], latest: asyncio.Task[Any] | None) -> None:
    """Close an async generator once the __anext__ that a Ctrl-C interrupted has unwound
    (its cancellation is queued before this call): closing a generator that is still
    running raises RuntimeError."""
    if latest is not None and not latest.done():
        await asyncio.wait({latest}, timeout=SHUTDOWN_GRACE)
    await agen.aclose()


async def _shutdown(loop: asyncio.AbstractEventLoop, final: Coroutine[Any, Any, None] | None,
                    calls: set[_Call[Any]], stopping: threading.Event) -> None:
    """On the loop: cancel every other task and wait (bounded) for them to unwind, run
    ``final``, close async generators and the default executor, then stop the loop."""
    try:
        for call in list(calls):
            call.abort()  # callers of calls that never started are released at once
        me = asyncio.current_task()
        others = [t for t in asyncio.all_tasks() if t is not me]
        for task in others:
            task.cancel()
        if others:
            await asyncio.wait(others, timeout=SHUTDOWN_GRACE)
        if final is not None:
            with contextlib.suppress(Exception):  # closing: best effort
                await asyncio.wait_for(final, SHUTDOWN_GRACE)
        await loop.shutdown_asyncgens()
        await loop.shutdown_default_executor()
        await _drain_late_tasks({me, *others})
    finally:
        stopping.set()
        loop.stop()


#: How many rounds of late tasks (each may start the next) the shutdown waits for.
_LATE_ROUNDS = 5


async def _drain_late_tasks(known: set[asyncio.Task[Any] | None]) -> None:
    """Wait (bounded) for tasks that began during the shutdown itself: an async generator
    finalized meanwhile (its last reference went in ``final``, say) has its ``aclose()``
    queued by asyncio to become a task on a later loop step. Stopping first would drop it:
    "coroutine ... was never awaited", or "Task was destroyed but it is pending!". The tasks
    cancelled at the start (``known``) had their grace period already."""
    for _ in range(_LATE_ROUNDS):
        await asyncio.sleep(0)  # the queued task creations run here
        late = [t for t in asyncio.all_tasks() if t not in known and not t.done()]
        if not late:
            return
        known.update(late)  # each late task gets one grace period, as the others did
        await asyncio.wait(late, timeout=SHUTDOWN_GRACE)


def _finish_without_loop(coro: Coroutine[Any, Any, None]) -> None:
    """Run a close coroutine that never started a loop. With no session yet it has nothing
    to await and finishes at its first step; one that would wait is dropped (no loop, no
    sockets to close)."""
    try:
        coro.send(None)
    except StopIteration:
        return
    except Exception:  # closing: best effort
        return
    coro.close()


def _after_fork_in_child() -> None:
    for runner in list(_runners):
        runner._after_fork_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
