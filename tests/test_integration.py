"""The SDK against the emulator over real loopback HTTP; every scenario runs async and sync."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

import voiceapi
from tests.conftest import FAST_RETRY
from voiceapi.testing import KlingEmulator


class Api:
    """Runs the same call on AsyncVoiceClient or (in a worker thread) on VoiceClient."""

    def __init__(self, client: voiceapi.AsyncVoiceClient | voiceapi.VoiceClient) -> None:
        self.client = client
        self.is_sync = isinstance(client, voiceapi.VoiceClient)

    async def __call__(self, resource: str, method: str, *args: Any, **kw: Any) -> Any:
        fn = getattr(getattr(self.client, resource), method)
        if self.is_sync:
            return await asyncio.to_thread(fn, *args, **kw)
        return await fn(*args, **kw)

    async def collect(self, resource: str, **kw: Any) -> list[Any]:
        it = getattr(self.client, resource).iter_all(**kw)
        if self.is_sync:
            return await asyncio.to_thread(list, it)
        return [x async for x in it]


def make_client(kind: str, emu: KlingEmulator, *, auth: str = "jwt", **kw: Any) -> Any:
    cls = voiceapi.VoiceClient if kind == "sync" else voiceapi.AsyncVoiceClient
    kw.setdefault("retry_policy", FAST_RETRY)
    kw.setdefault("timeout", 5)
    if auth == "jwt":
        return cls(emu.access_key, emu.secret_key, base_url=emu.base_url, **kw)
    return cls(api_key=emu.api_key, base_url=emu.base_url, **kw)


@pytest.fixture(params=["async", "sync"])
async def api(request: pytest.FixtureRequest, emu: KlingEmulator) -> AsyncIterator[Api]:
    client = make_client(request.param, emu)
    yield Api(client)
    if isinstance(client, voiceapi.VoiceClient):
        await asyncio.to_thread(client.close)
    else:
        await client.aclose()


async def test_create_wait_and_read_back(api: Api, emu: KlingEmulator) -> None:
    task = await api("custom_voices", "create", voice_name="旁白声音", voice_url=emu.sample_url(12),
                     external_task_id="ext-1")
    assert task.task_status is voiceapi.TaskStatus.SUBMITTED and task.external_task_id == "ext-1"
    done = await api("custom_voices", "wait", task.task_id, timeout=10, poll_interval=0.02)
    assert done.task_status is voiceapi.TaskStatus.SUCCEED
    assert done.voice is not None and done.voice.voice_name == "旁白声音"
    assert done.voice.owned_by == emu.account_id
    by_ext = await api("custom_voices", "get", external_task_id="ext-1")
    assert by_ext.task_id == task.task_id and by_ext.voice_id == done.voice_id


async def test_failed_sample_raises_task_failed(api: Api, emu: KlingEmulator) -> None:
    task = await api("custom_voices", "create", voice_name="short",
                     voice_url=emu.sample_url(3))
    with pytest.raises(voiceapi.TaskFailedError) as info:
        await api("custom_voices", "wait", task, timeout=10, poll_interval=0.02)
    assert info.value.task.task_status is voiceapi.TaskStatus.FAILED
    assert "between 5s and 30s" in str(info.value)


async def test_wait_times_out_with_the_last_task(api: Api, emu: KlingEmulator) -> None:
    emu.task_seconds = 3600
    task = await api("custom_voices", "create", voice_name="slow", voice_url=emu.sample_url())
    start = time.monotonic()
    with pytest.raises(voiceapi.WaitTimeoutError) as info:
        await api("custom_voices", "wait", task.task_id, timeout=0.3, poll_interval=0.05)
    # Ends at its timeout, not with the hour-long task: a bound far from both (3 s could be
    # hit by a loaded machine).
    assert time.monotonic() - start < 60
    assert info.value.task is not None and info.value.task.task_id == task.task_id


async def test_unknown_task_is_invalid_request(api: Api) -> None:
    with pytest.raises(voiceapi.InvalidRequestError) as info:
        await api("custom_voices", "get", "123456789012345678")
    assert info.value.code == 1201 and info.value.http_status == 400
    assert "Task not found" in str(info.value) and info.value.request_id


async def test_list_pages_and_iter_all(api: Api, emu: KlingEmulator) -> None:
    emu.concurrency = 50
    for i in range(7):
        await api("custom_voices", "create", voice_name=f"v{i}", voice_url=emu.sample_url())
    page = await api("custom_voices", "list", page_num=1, page_size=3)
    assert len(page) == 3
    everything = await api.collect("custom_voices", page_size=3)
    assert len(everything) == 7 == len({t.task_id for t in everything})
    presets = await api.collect("preset_voices", page_size=10)
    assert len(presets) == 48 and all(v.is_preset for v in presets)
    assert len(await api("preset_voices", "list", page_num=2, page_size=30)) == 18


async def test_delete_custom_but_not_preset(api: Api, emu: KlingEmulator) -> None:
    task = await api("custom_voices", "create", voice_name="gone", voice_url=emu.sample_url())
    done = await api("custom_voices", "wait", task.task_id, timeout=10, poll_interval=0.02)
    assert await api("custom_voices", "delete", done.voice_id) is None
    # The emulator's default reading: a deleted voice stays on its task, marked "deleted".
    [after] = (await api("custom_voices", "get", task.task_id)).voices
    assert after.voice_id == done.voice_id and after.is_deleted
    with pytest.raises(voiceapi.InvalidRequestError):
        await api("custom_voices", "delete", done.voice_id)
    with pytest.raises(voiceapi.InvalidRequestError):
        await api("custom_voices", "delete", emu.preset_ids()[0])


@pytest.mark.parametrize("fault", ["5000", "5001", "5002", "reset", "garbage", "truncated",
                                   "html502", "1302"])
async def test_reads_survive_one_fault(api: Api, emu: KlingEmulator, fault: str) -> None:
    emu.inject("list", fault, retry_after=0.01)
    assert await api("custom_voices", "list") == []
    assert emu.count("list") == 2


@pytest.mark.parametrize(("fault", "error"), [
    ("5000", voiceapi.ServerError), ("reset", voiceapi.APIConnectionError),
    ("garbage", voiceapi.UnexpectedResponseError), ("html502", voiceapi.ServerError),
    ("1102", voiceapi.AccountError), ("1301", voiceapi.PolicyError),
])
async def test_persistent_faults_become_typed_errors(emu: KlingEmulator, fault: str,
                                                     error: type) -> None:
    emu.inject("presets", fault, times=10)
    async with make_client("async", emu, max_retries=2) as client:
        with pytest.raises(error):
            await client.preset_voices.list()


async def test_slow_answer_times_out_then_retry_succeeds(emu: KlingEmulator) -> None:
    emu.inject("get", "slow", delay=1.0)
    task_id = (await _create(emu)).task_id
    timeouts = 0

    async def count_timeouts(request: voiceapi.Request,
                             call_next: voiceapi.Handler) -> voiceapi.Response:
        nonlocal timeouts
        try:
            return await call_next(request)
        except voiceapi.APITimeoutError:
            timeouts += 1
            raise

    async with make_client("async", emu, timeout=0.2, middlewares=[count_timeouts]) as client:
        got = await client.custom_voices.get(task_id)
    # The slow answer timed out and was retried; a loaded machine may time a retry out too
    # (0.2 s), which is one more retry and nothing else.
    assert timeouts >= 1
    assert got.task_id == task_id and emu.count("get") == 1 + timeouts
    emu.inject("get", "slow", delay=1.0)
    async with make_client("async", emu, timeout=0.2, max_retries=0) as client:
        with pytest.raises(voiceapi.APITimeoutError):
            await client.custom_voices.get(task_id)


async def _create(emu: KlingEmulator, **kw: Any) -> voiceapi.VoiceTask:
    client: voiceapi.AsyncVoiceClient
    async with make_client("async", emu) as client:
        return await client.custom_voices.create(voice_name="x", voice_url=emu.sample_url(),
                                                 **kw)


@pytest.mark.parametrize("kind", ["async", "sync"])
@pytest.mark.parametrize(("fault", "creates", "lookups"), [
    # The create landed but the answer was lost: one lookup finds it, nothing is resent.
    ("commit_then_5000", 1, 1), ("truncated", 1, 1), ("slow", 1, 1),
    # It did not land: the lookup finds nothing, then the same create is resent.
    ("reset", 2, 1), ("5000", 2, 1), ("5002", 2, 1), ("html502", 2, 1),
    # Refused before queueing: resent without a lookup.
    ("1303", 2, 0),
])
async def test_creates_are_never_duplicated(emu: KlingEmulator, fault: str, kind: str,
                                            creates: int, lookups: int) -> None:
    emu.inject("create", fault, delay=0.6, retry_after=0.01)
    timed_out: collections.Counter[str] = collections.Counter()  # attempts the client gave up on

    async def note_timeouts(request: voiceapi.Request,
                            call_next: voiceapi.Handler) -> voiceapi.Response:
        try:
            return await call_next(request)
        except voiceapi.APITimeoutError:
            timed_out[request.method] += 1
            raise

    api = Api(make_client(kind, emu, timeout=0.3, middlewares=[note_timeouts]))
    try:
        task = await api("custom_voices", "create", voice_name="once",
                         voice_url=emu.sample_url())
    finally:
        if isinstance(api.client, voiceapi.VoiceClient):
            await asyncio.to_thread(api.client.close)
        else:
            await api.client.aclose()
    assert [t["task_id"] for t in emu.tasks_by_name("once")] == [task.task_id]
    # The 0.3 s timeout is what makes the `slow` create's answer lost; on a loaded machine it
    # may also cut a lookup or another create short. Each such attempt is one more lookup (a
    # timed-out create is looked up, never resent), never one more create.
    extra = timed_out["GET"] + timed_out["POST"] - (fault == "slow")
    assert (emu.count("create"), emu.count("get")) == (creates, lookups + extra), timed_out


async def test_concurrency_limit_surfaces_or_is_waited_out(emu: KlingEmulator) -> None:
    emu.concurrency, emu.task_seconds = 2, 0.3
    async with make_client("async", emu, max_retries=0) as client:
        for i in range(2):
            await client.custom_voices.create(voice_name=f"v{i}", voice_url=emu.sample_url())
        with pytest.raises(voiceapi.RateLimitError) as info:
            await client.custom_voices.create(voice_name="v2", voice_url=emu.sample_url())
        assert info.value.code == 1303
    patient = voiceapi.RetryPolicy(initial_delay=0.05, max_delay=0.2, rate_limit_min_delay=0.05)
    async with make_client("async", emu, max_retries=30, retry_policy=patient) as client:
        task = await client.custom_voices.create(voice_name="v2", voice_url=emu.sample_url())
    assert len(emu.tasks_by_name("v2")) == 1 and task.task_id


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_api_key_auth(emu: KlingEmulator, kind: str) -> None:
    api = Api(make_client(kind, emu, auth="key"))
    assert len(await api("preset_voices", "list", page_size=5)) == 5
    if api.is_sync:
        api.client.close()  # type: ignore[union-attr]
    else:
        await api.client.aclose()  # type: ignore[union-attr]


async def test_bad_credentials(emu: KlingEmulator) -> None:
    async with voiceapi.AsyncVoiceClient(api_key="wrong", base_url=emu.base_url) as client:
        with pytest.raises(voiceapi.AuthenticationError) as info:
            await client.preset_voices.list()
    assert info.value.code == 1002 and info.value.http_status == 401
    async with voiceapi.AsyncVoiceClient(emu.access_key, "x" * 32,
                                         base_url=emu.base_url) as client:
        with pytest.raises(voiceapi.AuthenticationError):
            await client.preset_voices.list()


@pytest.mark.parametrize(("offset", "code"), [(-4000.0, 1004), (600.0, 1003)])
async def test_a_skewed_clock_is_corrected_from_the_server_date(
        emu: KlingEmulator, offset: float, code: int) -> None:
    async with make_client("async", emu) as client:
        client._config.credentials._clock = lambda: time.time() + offset
        assert len(await client.preset_voices.list(page_size=1)) == 1
        assert len(await client.preset_voices.list(page_size=1)) == 1  # the fix sticks
    assert emu.count("presets", code=code) == 1 and emu.count("presets", code=0) == 2


async def test_expired_token_is_resigned(emu: KlingEmulator) -> None:
    async with make_client("async", emu) as client:
        creds = client._config.credentials
        real = time.time
        calls = iter([real() - 4000])  # the first token is signed "an hour ago"
        creds._clock = lambda: next(calls, None) or real()
        assert len(await client.preset_voices.list(page_size=1)) == 1
    assert emu.count("presets", code=1004) == 1 and emu.count("presets", code=0) == 1


async def test_create_get_wait_list_under_each_reading(reading_emu: KlingEmulator) -> None:
    """create/get/wait, list and iter_all under every reading of the API (issue 10)."""
    emu = reading_emu
    emu.concurrency = 100
    async with make_client("async", emu, auth="api_key") as client:
        emu.inject("create", "commit_then_drop")
        first = await client.custom_voices.create(voice_name="r0", voice_url=emu.sample_url(),
                                                  external_task_id="reading-0")
        rest = await asyncio.gather(*(client.custom_voices.create(
            voice_name=f"r{i}", voice_url=emu.sample_url()) for i in range(1, 36)))
        created = [first, *rest]
        done = await client.custom_voices.wait(first, timeout=10, poll_interval=0.02)
        assert done.voice is not None and done.voice.status in (None, "succeed")
        by_ext = await client.custom_voices.get(external_task_id="reading-0")
        assert by_ext.task_id == first.task_id
        if emu.unique_external_ids:  # your own id, already used: a conflict, never a resend
            with pytest.raises(voiceapi.ConflictError) as info:
                await client.custom_voices.create(voice_name="x", voice_url=emu.sample_url(),
                                                  external_task_id="reading-0")
            assert info.value.existing_task_id == first.task_id
        page = await client.custom_voices.list(page_size=30)
        everything = [t async for t in client.custom_voices.iter_all(page_size=1000)]
        again = [t async for t in client.custom_voices.iter_all(page_size=1000)]
    assert len(page) == 30
    ids = {t.task_id for t in created}
    assert {t.task_id for t in everything} >= ids and len(everything) == emu.task_count
    assert {t.task_id for t in again} == {t.task_id for t in everything}
    assert len(emu.tasks_by_external_id("reading-0")) == 1

