"""VoiceClient: the blocking facade. Same constructor, resources, models and errors as
AsyncVoiceClient; each call runs the async code on the client's private loop thread.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import ssl as _ssl
import weakref
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING

import aiohttp

from . import _constants as C
from ._client import AsyncVoiceClient
from ._middlewares import Middleware
from ._retry import RetryPolicy
from ._sync_resources import CustomVoices, PresetVoices
from ._sync_runner import LoopThread

if TYPE_CHECKING:
    from ._coordinator import Coordinator

_open_clients: weakref.WeakSet[VoiceClient] = weakref.WeakSet()


class VoiceClient:
    """The blocking client for scripts, notebooks and threads.

    Safe to share between threads, and usable inside a running event loop (Jupyter). Close it
    with ``with`` or :meth:`close`; one left open is closed cleanly at interpreter exit.
    """

    def __init__(
        self,
        access_key: str | None = None,
        secret_key: str | None = None,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        timeout: float = C.DEFAULT_TIMEOUT,
        max_retries: int = C.DEFAULT_MAX_RETRIES,
        retry_budget: float = C.DEFAULT_RETRY_BUDGET,
        retry_policy: RetryPolicy | None = None,
        max_requests_per_second: float | None = None,
        max_in_flight: int | None = None,
        middlewares: Sequence[Middleware] = (),
        session: aiohttp.ClientSession | None = None,
        ssl: _ssl.SSLContext | bool | None = None,
        proxy: str | None = None,
        coordinator: Coordinator | None = None,
    ) -> None:
        self._async = AsyncVoiceClient(
            access_key, secret_key, api_key=api_key, base_url=base_url, timeout=timeout,
            max_retries=max_retries, retry_budget=retry_budget, retry_policy=retry_policy,
            max_requests_per_second=max_requests_per_second, max_in_flight=max_in_flight,
            middlewares=middlewares, session=session, ssl=ssl, proxy=proxy,
            coordinator=coordinator)
        self._runner = LoopThread()
        self.custom_voices = CustomVoices(self._runner, self._async.custom_voices)
        self.preset_voices = PresetVoices(self._runner, self._async.preset_voices)
        _open_clients.add(self)

    @property
    def async_client(self) -> AsyncVoiceClient:
        """The underlying async client (for code that mixes both styles)."""
        return self._async

    @property
    def base_url(self) -> str:
        return self._async.base_url

    @property
    def closed(self) -> bool:
        return self._runner.closed

    def close(self) -> None:
        """Close the HTTP session on its own loop, then stop the loop thread. Safe twice."""
        if self._runner.closed:
            return
        _open_clients.discard(self)
        if not self._async.closed:
            try:
                self._runner.run(self._async.aclose())
            finally:
                self._runner.stop()
        else:
            self._runner.stop()

    def __enter__(self) -> VoiceClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"VoiceClient({self._async!r})"

    def _after_fork(self) -> None:
        self._async._transport.detach_after_fork()
        self._runner.forget_after_fork()


@atexit.register
def _close_open_clients() -> None:
    for client in list(_open_clients):
        with contextlib.suppress(Exception):  # interpreter exit: best effort, never noisy
            client.close()


def _after_fork_in_child() -> None:
    for client in list(_open_clients):
        client._after_fork()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
