"""VoiceClient: the blocking facade. Same constructor, resources, models and errors as
AsyncVoiceClient; each call runs the async code on the client's private loop thread.
"""

from __future__ import annotations

import atexit
import contextlib
import ssl as _ssl
import warnings
import weakref
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING

import aiohttp

from . import _constants as C
from ._client import AsyncVoiceClient, concurrency_limit
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
    with ``with`` or :meth:`close`. One left open is closed quietly at interpreter exit; one
    dropped while open is closed when it is garbage-collected, with a ResourceWarning.
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
        max_concurrent_requests: int | None = None,
        middlewares: Sequence[Middleware] = (),
        session: aiohttp.ClientSession | None = None,
        ssl: _ssl.SSLContext | bool | None = None,
        proxy: str | None = None,
        coordinator: Coordinator | None = None,
        max_in_flight: int | None = None,
    ) -> None:
        self._async = AsyncVoiceClient(
            access_key, secret_key, api_key=api_key, base_url=base_url, timeout=timeout,
            max_retries=max_retries, retry_budget=retry_budget, retry_policy=retry_policy,
            max_requests_per_second=max_requests_per_second,
            max_concurrent_requests=concurrency_limit(max_concurrent_requests, max_in_flight,
                                                      stacklevel=2),
            middlewares=middlewares, session=session, ssl=ssl, proxy=proxy,
            coordinator=coordinator)
        self._runner = LoopThread(on_fork=self._async.transport.forget_loop)
        self.custom_voices = CustomVoices(self._runner, self._async.custom_voices, self)
        self.preset_voices = PresetVoices(self._runner, self._async.preset_voices, self)
        # The finalizer must not reference self (that would keep the client alive forever).
        self._finalizer = weakref.finalize(self, _collected, self._runner, self._async,
                                           repr(self))
        self._finalizer.atexit = False  # interpreter exit closes quietly instead (below)
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
        """Stop taking calls, end the ones in progress in other threads (they raise
        ClientClosedError), close the HTTP session on its own loop, then stop the loop thread.
        Safe twice and from any thread."""
        self._finalizer.detach()
        _open_clients.discard(self)
        self._runner.shutdown(self._async.aclose())

    def __enter__(self) -> VoiceClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"VoiceClient({self._async!r})"


def _collected(runner: LoopThread, client: AsyncVoiceClient, name: str) -> None:
    """A VoiceClient was garbage-collected without close(): close it, and say so."""
    if runner.closed:
        return
    try:
        warnings.warn(f"unclosed {name}: close it with `with` or .close()", ResourceWarning,
                      stacklevel=2)
    finally:
        runner.shutdown(client.aclose())


@atexit.register
def _close_open_clients() -> None:
    for client in list(_open_clients):
        with contextlib.suppress(Exception):  # interpreter exit: best effort, never noisy
            client.close()
