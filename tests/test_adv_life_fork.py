"""Adversarial tests (session 5, advlife): os.fork() with a live AsyncVoiceClient."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from voiceapi.testing import KlingEmulator

#: The parent runs its client on a loop in a background thread (the main thread forks, as a
#: worker pool would); the child drops the client, or uses it on a loop of its own. The
#: parent's next calls must be answered: before, the child's garbage collection closed the
#: parent's pooled connection through the epoll instance they share, and the parent's call
#: waited for an answer that could no longer arrive.
FORK_SCRIPT = """
import asyncio, gc, os, sys, threading, voiceapi
loop = asyncio.new_event_loop()
threading.Thread(target=loop.run_forever, daemon=True).start()
def run(coro):
    return asyncio.run_coroutine_threadsafe(coro, loop).result(60)
c = voiceapi.AsyncVoiceClient(api_key=sys.argv[1], base_url=sys.argv[2], timeout=20,
                              max_retries=0)
run(c.preset_voices.list(page_size=1))  # a pooled keep-alive connection
pid = os.fork()
if pid == 0:
    if sys.argv[3] == "drop":
        del c
        gc.collect()
        os._exit(0)
    async def use():  # a loop of the child's own: a session of its own
        async with c:
            return len(await c.preset_voices.list(page_size=2))
    os._exit(0 if asyncio.run(use()) == 2 else 3)
_, status = os.waitpid(pid, 0)
sizes = [len(run(c.preset_voices.list(page_size=n))) for n in (3, 4)]
run(c.aclose())
print(os.waitstatus_to_exitcode(status), *sizes)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("child", ["drop", "use"])
def test_a_fork_child_never_touches_the_parents_async_connections(
        kling_emulator: KlingEmulator, child: str) -> None:
    out = subprocess.run([sys.executable, "-W", "error", "-W",
                          "ignore:This process:DeprecationWarning", "-c", FORK_SCRIPT,
                          kling_emulator.api_key, kling_emulator.base_url, child],
                         capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "3", "4"], out.stderr
    assert out.stderr == ""
