"""The sync facade: generated surface, threads, running loops, iteration and lifecycle."""

from __future__ import annotations

import asyncio
import inspect
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import voiceapi
from tests.conftest import FAST_RETRY
from tools import gen_sync
from voiceapi._custom_voices import AsyncCustomVoices
from voiceapi._preset_voices import AsyncPresetVoices
from voiceapi._sync_resources import CustomVoices, PresetVoices
from voiceapi.testing import KlingEmulator


@pytest.fixture
def temu() -> Iterator[KlingEmulator]:
    with KlingEmulator(concurrency=50, task_seconds=0.1) as emu:
        yield emu


@pytest.fixture
def sclient(temu: KlingEmulator) -> Iterator[voiceapi.VoiceClient]:
    with voiceapi.VoiceClient(temu.access_key, temu.secret_key, base_url=temu.base_url,
                              retry_policy=FAST_RETRY) as client:
        yield client


def test_generated_file_is_fresh() -> None:
    committed = Path(gen_sync.TARGET).read_text()
    assert committed == gen_sync.generate(), "run: python -m tools.gen_sync"


@pytest.mark.parametrize(("async_cls", "sync_cls"), [(AsyncCustomVoices, CustomVoices),
                                                     (AsyncPresetVoices, PresetVoices)])
def test_every_async_method_has_a_sync_twin(async_cls: type, sync_cls: type) -> None:
    for name, fn in inspect.getmembers(async_cls, inspect.isfunction):
        if name.startswith("_"):
            continue
        assert inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn)
        twin = getattr(sync_cls, name, None)
        assert twin is not None, f"{sync_cls.__name__}.{name} is missing"
        a, s = inspect.signature(fn), inspect.signature(twin)
        assert list(a.parameters.values()) == list(s.parameters.values()), name
        assert not inspect.iscoroutinefunction(twin) and not inspect.isasyncgenfunction(twin)


def test_constructors_match() -> None:
    a = inspect.signature(voiceapi.AsyncVoiceClient.__init__)
    s = inspect.signature(voiceapi.VoiceClient.__init__)
    assert list(a.parameters.values()) == list(s.parameters.values())


def test_many_threads_share_one_client(sclient: voiceapi.VoiceClient,
                                       temu: KlingEmulator) -> None:
    def work(i: int) -> str:
        task = sclient.custom_voices.create(voice_name=f"t{i}", voice_url=temu.sample_url())
        return sclient.custom_voices.get(task.task_id).task_id

    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(work, range(24)))
    assert len(set(ids)) == 24 == temu.task_count


def test_works_inside_a_running_event_loop(sclient: voiceapi.VoiceClient) -> None:
    async def notebook_cell() -> int:
        return len(sclient.preset_voices.list(page_size=7))

    assert asyncio.run(notebook_cell()) == 7


def test_early_break_closes_the_async_generator(sclient: voiceapi.VoiceClient,
                                                temu: KlingEmulator) -> None:
    closed = threading.Event()
    original = AsyncPresetVoices.iter_all

    async def watched(self: AsyncPresetVoices, *, page_size: int = 100):  # type: ignore[no-untyped-def]
        try:
            async for v in original(self, page_size=page_size):
                yield v
        finally:
            closed.set()

    sclient.preset_voices._resource.iter_all = watched.__get__(  # type: ignore[method-assign]
        sclient.preset_voices._resource)
    for i, _voice in enumerate(sclient.preset_voices.iter_all(page_size=5)):
        if i == 6:
            break
    assert closed.is_set()
    assert temu.count("presets") == 2  # stopped after the second page


def test_errors_are_the_same_classes(sclient: voiceapi.VoiceClient) -> None:
    with pytest.raises(voiceapi.InvalidRequestError) as info:
        sclient.custom_voices.get("123456789012345678")
    assert info.value.code == 1201
    with pytest.raises(voiceapi.ValidationError):
        sclient.custom_voices.create(voice_name="", voice_url="https://x/a.mp3")


def test_close_is_idempotent_and_final(temu: KlingEmulator) -> None:
    client = voiceapi.VoiceClient(api_key=temu.api_key, base_url=temu.base_url)
    client.preset_voices.list()
    thread = client._runner._thread
    assert thread is not None and thread.is_alive()
    client.close()
    client.close()
    assert not thread.is_alive() and client.closed
    with pytest.raises(voiceapi.ClientClosedError):
        client.preset_voices.list()


def test_calling_from_the_loop_thread_is_a_clear_error(temu: KlingEmulator) -> None:
    holder: list[voiceapi.VoiceClient] = []

    async def reentrant(request: voiceapi.Request,
                        call_next: voiceapi.Handler) -> voiceapi.Response:
        if request.path.endswith("presets-voices"):
            holder[0].custom_voices.list()  # a sync call from inside the client's own loop
        return await call_next(request)

    with voiceapi.VoiceClient(api_key=temu.api_key, base_url=temu.base_url,
                              middlewares=[reentrant]) as client:
        holder.append(client)
        with pytest.raises(RuntimeError, match="deadlock"):
            client.preset_voices.list()


SCRIPT = """
import sys, voiceapi
c = voiceapi.VoiceClient(api_key=sys.argv[1], base_url=sys.argv[2])
print(len(c.preset_voices.list(page_size=3)))
"""


def test_unclosed_client_exits_quietly(temu: KlingEmulator) -> None:
    out = subprocess.run([sys.executable, "-W", "error", "-X", "dev", "-c", SCRIPT,
                          temu.api_key, temu.base_url], capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "3"
    assert "Unclosed" not in out.stderr and "Event loop is closed" not in out.stderr
    # -X dev also reports callbacks slower than 0.1 s, which a loaded machine produces.
    noise = re.compile(r"Executing <.*> took [0-9.]+ seconds")
    assert [line for line in out.stderr.splitlines() if not noise.fullmatch(line)] == []


FORK_SCRIPT = """
import os, sys, voiceapi
c = voiceapi.VoiceClient(api_key=sys.argv[1], base_url=sys.argv[2])
c.preset_voices.list(page_size=1)
pid = os.fork()
if pid == 0:
    n = len(c.preset_voices.list(page_size=2))
    c.close()
    os._exit(0 if n == 2 else 3)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status), len(c.preset_voices.list(page_size=4)))
c.close()
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_fork_child_gets_a_fresh_loop(temu: KlingEmulator) -> None:
    out = subprocess.run([sys.executable, "-c", FORK_SCRIPT, temu.api_key, temu.base_url],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "4"]


CTRL_C_SCRIPT = """
import sys, time, voiceapi
c = voiceapi.VoiceClient(api_key=sys.argv[1], base_url=sys.argv[2])
task = c.custom_voices.create(voice_name="slow", voice_url=sys.argv[3])
try:
    print("waiting", flush=True)
    c.custom_voices.wait(task.task_id, timeout=120, poll_interval=0.05)
except KeyboardInterrupt:
    print("interrupted", flush=True)
c.close()
print("closed", flush=True)
"""


def test_ctrl_c_interrupts_a_blocking_call_promptly(temu: KlingEmulator) -> None:
    temu.task_seconds = 3600
    proc = subprocess.Popen([sys.executable, "-W", "error", "-c", CTRL_C_SCRIPT, temu.api_key,
                             temu.base_url, temu.sample_url()], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "waiting"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert out.split() == ["interrupted", "closed"]
    assert err == ""  # the polling task was cancelled: nothing pending or destroyed at exit
