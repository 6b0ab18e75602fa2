"""The sync facade's hand-off: how a call crosses from the caller's thread to the loop thread.

On the private loop the caller's thread creates the call's task itself (its first step then
runs in the wake-up's own loop iteration); in debug mode, or on any other loop, the loop
thread creates it. Both must keep the same promises: the caller's context, one task per call,
cancellation, and Ctrl-C at any point of the hand-off ending the call on the loop.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import inspect
import logging
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from voiceapi import ClientClosedError, _sync_runner
from voiceapi._sync_runner import TASK_NAME, LoopThread

if sys.platform == "win32":  # pragma: no cover
    pytest.skip("the private hand-off loop is POSIX only", allow_module_level=True)

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("VAR", default="unset")


class _CountingLoop(_sync_runner._HandOffLoop):
    """The private loop, counting its iterations (each processes the selector's events once)
    and raising KeyboardInterrupt once, in the calling thread, at a chosen point."""

    def __init__(self, interrupt_at: str = "") -> None:
        self.iterations = 0
        self.interrupt_at = interrupt_at
        self.armed = False
        self.fired = False
        self._debug_calls = 0
        super().__init__()

    def _process_events(self, event_list: list[Any]) -> None:
        self.iterations += 1
        super()._process_events(event_list)  # type: ignore[misc]

    def _on_loop_thread(self) -> bool:
        return bool(self._thread_id == threading.get_ident())  # type: ignore[attr-defined]

    def _interrupt(self, point: str) -> None:
        if self.armed and point == self.interrupt_at and not self._on_loop_thread():
            self.armed, self.fired = False, True
            raise KeyboardInterrupt

    def get_debug(self) -> bool:
        # Task() asks once (before it queues anything), then the step's Handle asks (before
        # call_soon appends it): two points before the call exists for the loop.
        if self.armed and not self._on_loop_thread():
            self._debug_calls += 1
            self._interrupt(f"get_debug#{self._debug_calls}")
        return bool(super().get_debug())

    def call_soon(self, callback: Any, *args: Any,  # type: ignore[override]
                  context: contextvars.Context | None = None) -> asyncio.Handle:
        handle = super().call_soon(callback, *args, context=context)
        self._interrupt("after call_soon")  # queued, the loop not yet woken
        return handle

    def _write_to_self(self) -> None:
        self._interrupt("wake-up")
        super()._write_to_self()  # type: ignore[misc]


@pytest.fixture
def loop(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> _CountingLoop:
    made = _CountingLoop(getattr(request, "param", ""))
    monkeypatch.setattr(_sync_runner, "_new_loop", lambda: made)
    return made


@pytest.fixture
def runner(loop: _CountingLoop) -> Iterator[LoopThread]:
    run = LoopThread()
    yield run
    run.shutdown()
    assert run._thread is not None and not run._thread.is_alive()


async def _answer() -> int:
    return 42


async def _slow(events: list[str]) -> None:
    events.append("started")
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        events.append("cancelled")
        raise
    events.append("finished")


async def _other_tasks() -> list[str]:
    me = asyncio.current_task()
    return [repr(t) for t in asyncio.all_tasks() if t is not me]


def test_the_first_step_runs_in_the_wake_up_iteration(runner: LoopThread,
                                                      loop: _CountingLoop) -> None:
    assert runner.run(_answer()) == 42
    assert runner._direct
    before = loop.iterations
    for _ in range(60):
        assert runner.run(_answer()) == 42
    # One iteration per call: the one the wake-up starts. A task created on the loop would
    # take its first step an iteration later (two per call).
    assert loop.iterations - before <= 66


@pytest.mark.parametrize("debug", [False, True], ids=["caller-creates", "loop-creates"])
def test_a_call_runs_in_a_copy_of_the_callers_context(runner: LoopThread, loop: _CountingLoop,
                                                      debug: bool) -> None:
    loop.set_debug(debug)

    async def read_then_set() -> tuple[str, str, bool]:
        seen = VAR.get()
        VAR.set("set inside the call")
        task = asyncio.current_task()
        assert task is not None
        return seen, task.get_name(), task.get_loop() is loop

    token = VAR.set("the caller's")
    try:
        assert runner.run(read_then_set()) == ("the caller's", TASK_NAME, True)
        assert runner._direct is not debug
        assert VAR.get() == "the caller's"  # nothing leaks back
        assert runner.run(read_then_set())[0] == "the caller's"  # nor into the next call
    finally:
        VAR.reset(token)


@pytest.mark.parametrize("debug", [False, True], ids=["caller-creates", "loop-creates"])
def test_each_call_is_its_own_cancellable_task(runner: LoopThread, loop: _CountingLoop,
                                               debug: bool) -> None:
    loop.set_debug(debug)

    async def me() -> asyncio.Task[Any]:
        task = asyncio.current_task()
        assert task is not None
        return task

    tasks = [runner.run(me()) for _ in range(3)]  # held: ids are not reused
    assert len({id(task) for task in tasks}) == 3
    with pytest.raises(asyncio.TimeoutError):  # wait_for cancels inside the call's task
        runner.run(asyncio.wait_for(asyncio.sleep(30), 0.01))

    async def fails() -> None:
        raise LookupError("from the loop")

    with pytest.raises(LookupError, match="from the loop"):
        runner.run(fails())
    assert runner.run(_other_tasks()) == []


def test_many_threads_hand_off_at_once(runner: LoopThread) -> None:
    async def echo(i: int) -> int:
        await asyncio.sleep(0)
        return i

    results: list[list[int]] = [[] for _ in range(8)]

    def work(slot: int) -> None:
        results[slot] = [runner.run(echo(slot * 1000 + i)) for i in range(100)]

    threads = [threading.Thread(target=work, args=(slot,)) for slot in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert results == [[slot * 1000 + i for i in range(100)] for slot in range(8)]


POINTS = ["get_debug#1", "get_debug#2", "after call_soon", "wake-up"]


@pytest.mark.parametrize("loop", POINTS, indirect=True)
def test_ctrl_c_anywhere_in_the_hand_off_ends_the_call_on_the_loop(
        runner: LoopThread, loop: _CountingLoop, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="asyncio")
    assert runner.run(_answer()) == 42  # the loop thread is up, the hand-off is direct
    assert runner._direct
    events: list[str] = []
    coro = _slow(events)
    loop.armed = True
    with pytest.raises(KeyboardInterrupt):
        runner.run(coro)
    assert loop.fired
    # The interrupted caller queued the abort before returning: later calls run after it.
    for _ in range(100):  # bounded; the cancelled call unwinds within a step or two
        if inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED:
            break
        runner.run(asyncio.sleep(0.01))
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED
    assert "finished" not in events
    assert events in ([], ["started", "cancelled"])
    assert runner.run(_other_tasks()) == []
    assert runner.run(_answer()) == 42  # the client keeps working
    gc.collect()  # a coroutine left unawaited would warn here (an error under -W error)
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []


#: Where Task() registers a new task, by Python version (3.14 keeps a linked list instead).
_REGISTRY = next((getattr(asyncio.tasks, name) for name in ("_all_tasks", "_scheduled_tasks")
                  if hasattr(asyncio.tasks, name)), None)


@pytest.mark.skipif(not hasattr(_REGISTRY, "add"), reason="tasks are not kept in a WeakSet")
def test_ctrl_c_after_the_step_is_queued_but_before_the_task_is_known(
        runner: LoopThread, monkeypatch: pytest.MonkeyPatch) -> None:
    """The task's first step is queued, but Task() raised: the caller never saw the task.
    The body finds its own task, so the abort still cancels it."""
    assert runner.run(_answer()) == 42
    registry: Any = _REGISTRY
    caller = threading.get_ident()
    fired: list[bool] = []

    def add(task: object) -> None:
        type(registry).add(registry, task)
        if threading.get_ident() == caller and not fired:
            fired.append(True)
            raise KeyboardInterrupt

    events: list[str] = []
    coro = _slow(events)
    monkeypatch.setattr(registry, "add", add, raising=False)
    with pytest.raises(KeyboardInterrupt):
        runner.run(coro)
    monkeypatch.undo()
    if not fired:
        pytest.skip("this Python's Task() does not register through WeakSet.add")
    for _ in range(100):  # bounded
        if inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED:
            break
        runner.run(asyncio.sleep(0.01))
    assert events == ["started", "cancelled"]
    assert runner.run(_answer()) == 42


def test_ctrl_c_in_debug_mode_ends_the_call_on_the_loop(runner: LoopThread,
                                                        loop: _CountingLoop) -> None:
    loop.set_debug(True)
    loop.interrupt_at = "wake-up"  # call_soon_threadsafe writes to wake the loop
    events: list[str] = []
    coro = _slow(events)
    loop.armed = True
    with pytest.raises(KeyboardInterrupt):
        runner.run(coro)
    assert loop.fired and not runner._direct
    for _ in range(100):  # bounded
        if inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED:
            break
        runner.run(asyncio.sleep(0.01))
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED
    assert "finished" not in events
    assert runner.run(_other_tasks()) == []


def test_close_from_another_thread_while_calls_are_handed_over(runner: LoopThread) -> None:
    outcomes: list[str] = []
    started = threading.Barrier(7)

    def caller() -> None:
        started.wait(10)
        for _ in range(100_000):  # bounded; ends at the close
            try:
                runner.run(asyncio.sleep(0))
            except ClientClosedError:
                outcomes.append("closed")
                return
            except BaseException as exc:  # the bug this test is about
                outcomes.append(repr(exc))
                return
        outcomes.append("never closed")

    threads = [threading.Thread(target=caller) for _ in range(6)]
    for t in threads:
        t.start()
    started.wait(10)
    runner.run(asyncio.sleep(0.05))  # the callers are in their loops by now
    runner.shutdown()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads)
    assert outcomes == ["closed"] * 6
