"""The client core under faults and its lifecycle: coordinator hook, close races, dropped clients,
fork, cancelled waiters, hard budgets, closed sessions, secrets in exception chains, logging."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import pytest

import voiceapi
from tests.conftest import FAST_RETRY
from voiceapi._coordinator import (
    Coordinator,
    Grant,
    JournalEntry,
    LookupFunction,
    PollFunction,
)
from voiceapi._models import VoiceTask
from voiceapi.testing import KlingEmulator


class FakeCoordinator:
    """Implements the Coordinator protocol; records what a plain client asks of it.

    The batch-only methods fail loudly: a client must never call them.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, object, object]] = []

    async def before_request(self, *, create: bool) -> None:
        self.calls.append(("before", create, None))

    async def rate_limited(self, code: int | None, retry_after: float | None) -> None:
        self.calls.append(("limited", code, retry_after))

    def _batch_only(self) -> AssertionError:
        return AssertionError("a plain client call used a batch-only coordinator method")

    async def known(self, keys: Sequence[str]) -> Mapping[str, JournalEntry]:
        raise self._batch_only()

    async def record(self, key: str, task_id: str, status: str) -> None:
        raise self._batch_only()

    async def acquire(self, key: str) -> Grant:
        raise self._batch_only()

    async def wait_for_slot(self, timeout: float) -> None:
        raise self._batch_only()

    async def accepted(self, key: str, task_id: str, status: str) -> None:
        raise self._batch_only()

    async def refused(self, key: str) -> float:
        raise self._batch_only()

    async def release(self, key: str) -> None:
        raise self._batch_only()

    async def finished(self, key: str, task_id: str, status: str) -> None:
        raise self._batch_only()

    cap = 1  # snapshots for progress reports; harmless to read
    in_flight = 0

    async def observe(self, mine: Collection[str], poll: PollFunction,
                      lookup: LookupFunction) -> Mapping[str, VoiceTask]:
        raise self._batch_only()


def test_fake_coordinator_implements_the_protocol() -> None:
    assert isinstance(FakeCoordinator(), Coordinator)


async def test_coordinator_is_asked_before_every_attempt_and_told_of_rate_limits(
        emu: KlingEmulator) -> None:
    coord = FakeCoordinator()
    emu.inject("create", 1303, times=2, retry_after=0.01)
    async with voiceapi.AsyncVoiceClient(
            api_key=emu.api_key, base_url=emu.base_url, retry_policy=FAST_RETRY,
            coordinator=coord) as client:
        assert client._transport.coordinator is coord
        await client.preset_voices.list(page_size=1)
        task = await client.custom_voices.create(voice_name="c", voice_url=emu.sample_url())
    assert task.task_id
    assert emu.count("create") == 3  # two refusals, then accepted
    assert coord.calls == [
        ("before", False, None),  # the list: not a create
        ("before", True, None), ("limited", 1303, pytest.approx(0.01)),
        ("before", True, None), ("limited", 1303, pytest.approx(0.01)),
        ("before", True, None),
    ]


def test_sync_client_passes_the_coordinator_through(kling_emulator: KlingEmulator) -> None:
    coord = FakeCoordinator()
    with voiceapi.VoiceClient(api_key=kling_emulator.api_key, base_url=kling_emulator.base_url,
                              retry_policy=FAST_RETRY,
                              coordinator=coord) as client:
        assert client.async_client._transport.coordinator is coord
        client.preset_voices.list(page_size=1)
    assert coord.calls == [("before", False, None)]


def test_no_coordinator_adds_no_middleware() -> None:
    from voiceapi._middlewares import CoordinatorMiddleware, _Layer

    def layers(client: voiceapi.AsyncVoiceClient) -> list[object]:
        out: list[object] = []
        handler = client._transport._handler
        while isinstance(handler, _Layer):
            out.append(handler._mw)
            handler = handler._call_next
        return out

    plain = voiceapi.AsyncVoiceClient(api_key="k", base_url="http://127.0.0.1:9")
    assert plain._transport.coordinator is None
    assert not any(isinstance(m, CoordinatorMiddleware) for m in layers(plain))
    shared = voiceapi.AsyncVoiceClient(api_key="k", base_url="http://127.0.0.1:9",
                                       coordinator=FakeCoordinator())
    assert sum(isinstance(m, CoordinatorMiddleware) for m in layers(shared)) == 1
