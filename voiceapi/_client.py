"""AsyncVoiceClient: configuration, one transport, and the resources."""

from __future__ import annotations

import logging
import ssl as _ssl
import warnings
import weakref
from collections.abc import Sequence
from types import TracebackType
from typing import TYPE_CHECKING

import aiohttp

from . import _constants as C
from ._config import ClientConfig, make_config
from ._custom_voices import AsyncCustomVoices
from ._middlewares import Middleware
from ._preset_voices import AsyncPresetVoices
from ._retry import RetryPolicy
from ._transport import Transport

if TYPE_CHECKING:
    from ._coordinator import Coordinator

logger = logging.getLogger(C.LOGGER_NAME)


def concurrency_limit(max_concurrent_requests: int | None, max_in_flight: int | None, *,
                      stacklevel: int) -> int | None:
    """The client's old ``max_in_flight=`` still works, with a DeprecationWarning: it shared a
    name with ``create_many(max_in_flight=...)``, which limits tasks in progress at Kling."""
    if max_in_flight is None:
        return max_concurrent_requests
    warnings.warn("AsyncVoiceClient/VoiceClient(max_in_flight=...) is renamed "
                  "max_concurrent_requests=...; create_many(max_in_flight=...) is unchanged",
                  DeprecationWarning, stacklevel=stacklevel + 1)
    return max_in_flight if max_concurrent_requests is None else max_concurrent_requests


class AsyncVoiceClient:
    """The asyncio client for the Kling Custom Voice API.

    Credentials: ``access_key`` + ``secret_key`` (signed into a JWT) or ``api_key``; each falls
    back to ``KLING_ACCESS_KEY``/``KLING_SECRET_KEY``/``KLING_API_KEY``. The constructor does no
    I/O: the HTTP session is created on first use, on the running loop, and closed by
    ``async with`` or :meth:`aclose`. A ``session`` you pass in is used and never closed by us.
    A ``coordinator`` (e.g. ``voiceapi.coordination.RedisCoordinator``) shares the account's
    request rate and 1302/1303 backoff with other processes, for plain calls and batches alike.
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
        max_concurrent_requests = concurrency_limit(max_concurrent_requests, max_in_flight,
                                                    stacklevel=2)
        self._config: ClientConfig = make_config(
            access_key, secret_key, api_key=api_key, base_url=base_url, timeout=timeout,
            max_retries=max_retries, retry_budget=retry_budget,
            max_requests_per_second=max_requests_per_second,
            max_concurrent_requests=max_concurrent_requests, ssl=ssl, proxy=proxy)
        self._transport = Transport(self._config, session=session, middlewares=middlewares,
                                    retry_policy=retry_policy, coordinator=coordinator)
        # A client dropped with its session open gets aiohttp's raw "Unclosed connector"
        # report; this says which object it was and how to close it. Not at exit: leaving a
        # script without closing is aiohttp's to report, once.
        self._finalizer = weakref.finalize(self, _dropped_open, self._transport)
        self._finalizer.atexit = False
        self.custom_voices = AsyncCustomVoices(self._transport)
        self.preset_voices = AsyncPresetVoices(self._transport)
        # A shared coordinator learns which Kling account it serves from us (its namespace is
        # a hash of our key), so users need not repeat it; ``bind`` is an optional extra.
        bind = getattr(coordinator, "bind", None)
        if callable(bind):
            bind(self)

    @property
    def base_url(self) -> str:
        return self._config.base_url

    @property
    def transport(self) -> Transport:
        """The request pipeline (advanced use: ``transport.coordinator``,
        ``transport.retry_policy``; the sync facade uses its fork hook)."""
        return self._transport

    @property
    def closed(self) -> bool:
        return self._transport.closed

    async def aclose(self) -> None:
        """Close the HTTP session (safe to call twice). The client is unusable afterwards.

        A coordinator bound to this client hears of it (``client_closed``): one the user never
        opened with ``async with`` closes with its last client, on the loop it ran on."""
        self._finalizer.detach()
        await self._transport.aclose()
        closed = getattr(self._transport.coordinator, "client_closed", None)
        if callable(closed):
            await closed(self)

    async def __aenter__(self) -> AsyncVoiceClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return (f"AsyncVoiceClient(base_url={self._config.base_url!r}, "
                f"credentials={self._config.credentials!r})")


_DROPPED = ("an AsyncVoiceClient was garbage-collected with its HTTP session open; close it with "
            "`async with AsyncVoiceClient(...) as client:` or `await client.aclose()`")


def _dropped_open(transport: Transport) -> None:
    """The finalizer of an AsyncVoiceClient (it must not reference the client itself)."""
    if transport.holds_open_session():
        logger.warning(_DROPPED)  # shown even with logging unconfigured (stderr)
        warnings.warn(_DROPPED, ResourceWarning, stacklevel=2)
