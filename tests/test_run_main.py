"""``voiceapi._aio`` on every Python we support (3.10 has its own code paths).

``run_main``: one Ctrl-C gives one KeyboardInterrupt, after every ``finally`` ran. Each
scenario runs in a child process that sends itself SIGINT at a chosen point; on 3.10 a plain
``asyncio.run`` fails the first one ("Task exception was never retrieved" after the interrupt,
the CLI's old flaky Ctrl-C test), so the test proves the backport, and on 3.11+ it proves we
still get the standard runner's behaviour.
"""

from __future__ import annotations

import asyncio
import inspect
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from voiceapi._aio import run_main, within

CHILD = textwrap.dedent("""
    import asyncio, gc, os, signal, sys
    from voiceapi._aio import run_main

    async def inner():
        {inner}

    async def main():
        try:
            return await asyncio.wait_for(inner(), 30)
        finally:
            print("main unwound", flush=True)

    try:
        print("returned", run_main(main()))
    except KeyboardInterrupt:
        print("KeyboardInterrupt", flush=True)
    gc.collect()
    print("handler restored", signal.getsignal(signal.SIGINT) is signal.default_int_handler)
""")

# The signal lands while a task is running Python code (3.10 raised it inside that task) and
# while the loop sleeps in select() (the wake-up matters).
INTERRUPTED = {
    "inside a task": "os.kill(os.getpid(), signal.SIGINT)\n"
                     "    sum(range(100_000))\n    await asyncio.sleep(30)",
    "while the loop waits": "loop = asyncio.get_running_loop()\n"
                            "    loop.call_later(0.05, os.kill, os.getpid(), signal.SIGINT)\n"
                            "    await asyncio.sleep(30)",
}


def _child(inner: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", CHILD.format(inner=inner)], text=True,
                          capture_output=True, timeout=60, check=False)


@pytest.mark.parametrize("where", sorted(INTERRUPTED))
def test_one_ctrl_c_unwinds_main_then_raises_keyboard_interrupt_once(where: str) -> None:
    done = _child(INTERRUPTED[where])
    assert done.stdout.splitlines() == ["main unwound", "KeyboardInterrupt",
                                        "handler restored True"], done.stderr
    assert done.stderr == ""  # no "Task exception was never retrieved", no traceback


def test_a_result_and_a_plain_cancellation_pass_through_untouched() -> None:
    assert _child("return 7").stdout.splitlines() == ["main unwound", "returned 7",
                                                      "handler restored True"]
    # A cancellation that is not a Ctrl-C stays a CancelledError (not a KeyboardInterrupt).
    cancelled = _child("asyncio.current_task().cancel()\n    await asyncio.sleep(0)")
    assert "CancelledError" in cancelled.stderr and "KeyboardInterrupt" not in cancelled.stdout


async def test_within_raises_the_builtin_timeout_error_on_every_python() -> None:
    """Callers catch the builtin ``TimeoutError``; on 3.10 ``asyncio.TimeoutError`` is another
    class, and the Redis coordinator's slot wait caught only the builtin one."""
    never = asyncio.Event()
    with pytest.raises(TimeoutError) as caught:
        await within(never.wait(), 0.01)
    assert type(caught.value) is TimeoutError
    assert await within(asyncio.sleep(0, "done"), 5) == "done"


async def test_within_never_loses_a_cancel_that_arrives_with_the_result() -> None:
    """``asyncio.wait_for`` before 3.12 returns the result and drops the cancel when both
    arrive in one loop iteration: a cancelled ``wait()`` or batch would carry on."""
    answer: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    caller = asyncio.create_task(within(answer, 5))
    await asyncio.sleep(0)  # the caller is waiting on the answer
    answer.set_result("late")
    caller.cancel()  # in the same iteration as the answer
    with pytest.raises(asyncio.CancelledError):
        await caller


async def test_within_stops_the_inner_call_at_the_limit_and_on_cancel() -> None:
    started, inner_ended = asyncio.Event(), asyncio.Event()

    async def slow() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            inner_ended.set()

    with pytest.raises(TimeoutError):
        await within(slow(), 0.01)
    assert inner_ended.is_set()  # it does not outlive the call
    started.clear()
    inner_ended.clear()
    caller = asyncio.create_task(within(slow(), 5))
    await started.wait()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    assert inner_ended.is_set()


async def test_a_call_from_inside_a_running_loop_is_refused_untouched() -> None:
    """The same RuntimeError as asyncio.run on every Python (the 3.10 backport used to start
    its own loop first: another message, a pending task destroyed, the SIGINT handler swapped
    for the duration)."""
    async def never() -> None:
        raise AssertionError("must not run")

    coro = never()
    try:
        with pytest.raises(RuntimeError, match="cannot be called from a running event loop"):
            run_main(coro)
        assert inspect.getcoroutinestate(coro) == inspect.CORO_CREATED  # never started
    finally:
        coro.close()


def test_a_second_ctrl_c_while_main_unwinds_still_gives_one_keyboard_interrupt() -> None:
    """The user insists: the second Ctrl-C (main's clean-up still waiting) ends the run at once
    with one KeyboardInterrupt and the clean-up is cancelled, as 3.11's runner does."""
    done = _child("loop = asyncio.get_running_loop()\n"
                  "    loop.call_later(0.05, os.kill, os.getpid(), signal.SIGINT)\n"
                  "    try:\n        await asyncio.sleep(30)\n"
                  "    finally:\n"
                  "        loop.call_later(0.05, os.kill, os.getpid(), signal.SIGINT)\n"
                  "        await asyncio.sleep(30)")
    assert done.stdout.splitlines() == ["main unwound", "KeyboardInterrupt",
                                        "handler restored True"], done.stderr
    assert done.stderr == ""


def test_off_the_main_thread_it_runs_without_touching_the_signal_handler() -> None:
    async def answer() -> int:
        return 42

    results: list[int] = []
    thread = threading.Thread(target=lambda: results.append(run_main(answer())))
    before = signal.getsignal(signal.SIGINT)
    thread.start()
    thread.join(60)
    assert results == [42]
    assert signal.getsignal(signal.SIGINT) is before
