"""The transport: one aiohttp session per client, the middleware chain, and envelope decoding.

``send`` is the single place that calls ``session.request``; everything else is a middleware.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import aiohttp

from . import _constants
from ._config import ClientConfig
from ._constants import ENV_LOG, LOGGER_NAME
from ._decode import decode_envelope
from ._errors import (
    APIConnectionError,
    APITimeoutError,
    ClientClosedError,
    EventLoopError,
    UnexpectedResponseError,
)
from ._middlewares import (
    AuthMiddleware,
    CoordinatorMiddleware,
    Middleware,
    RateLimitMiddleware,
    Request,
    Response,
    build_chain,
    logging_middleware,
)
from ._retry import RetryMiddleware, RetryPolicy

if TYPE_CHECKING:
    from ._coordinator import Coordinator

#: Objects inherited from the parent across fork; kept alive, never closed (see below).
FORK_ORPHANS: list[object] = []

_JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}


async def _read_streamed(resp: aiohttp.ClientResponse) -> bytes:
    """A body without Content-Length, refused once it passes MAX_RESPONSE_BYTES (answers
    that large come from a broken or hostile proxy, never from Kling)."""
    limit = _constants.MAX_RESPONSE_BYTES
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise UnexpectedResponseError(
                f"HTTP {resp.status} answer is larger than {limit} bytes", http_status=resp.status)
        chunks.append(chunk)
    return b"".join(chunks)


def _setup_logging_from_env() -> None:
    level = os.environ.get(ENV_LOG, "").strip().lower()
    if level not in ("debug", "info"):
        return
    logger = logging.getLogger(LOGGER_NAME)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if level == "debug" else logging.INFO)


class Transport:
    """Owns (or borrows) the aiohttp session and runs every request through the chain."""

    def __init__(
        self,
        config: ClientConfig,
        *,
        session: aiohttp.ClientSession | None = None,
        middlewares: Sequence[Middleware] = (),
        retry_policy: RetryPolicy | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        coordinator: Coordinator | None = None,
    ) -> None:
        _setup_logging_from_env()
        self.config = config
        self.retry_policy = retry_policy or RetryPolicy()
        self._session = session
        self._owns_session = session is None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._timeout = aiohttp.ClientTimeout(total=config.timeout)
        self._base_url = config.base_url
        #: Shares request rate and 1302/1303 backoff across workers; ``create_many`` also uses
        #: it when it is given no coordinator of its own. None: no extra middleware at all.
        self.coordinator = coordinator
        chain: list[Middleware] = [
            RetryMiddleware(max_retries=config.max_retries, budget=config.retry_budget,
                            policy=self.retry_policy, credentials=config.credentials,
                            sleep=sleep)]
        if coordinator is not None:
            chain.append(CoordinatorMiddleware(coordinator))
        chain += [AuthMiddleware(config.credentials), *middlewares]
        if config.max_requests_per_second or config.max_in_flight:
            chain.append(RateLimitMiddleware(per_second=config.max_requests_per_second,
                                             max_in_flight=config.max_in_flight))
        chain.append(logging_middleware)
        self._handler = build_chain(chain, self._send)

    @property
    def closed(self) -> bool:
        return self._closed

    def _get_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise ClientClosedError("this client is closed; create a new one")
        loop = asyncio.get_running_loop()
        if self._session is None:
            connector = aiohttp.TCPConnector(
                limit=self.config.max_in_flight or 100,
                ssl=True if self.config.ssl is None else self.config.ssl)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=self._timeout,
                headers={"User-Agent": self.config.user_agent})
            self._loop = loop
        elif self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise EventLoopError(
                "this client's HTTP session belongs to another event loop; create one client "
                "per event loop (or use VoiceClient from threads)")
        return self._session

    def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        json_body: dict[str, Any] | None = None,
        idempotent: bool = True,
        reconcile: Callable[[], Awaitable[Response | None]] | None = None,
        retry_rate_limits: bool = True,
    ) -> Awaitable[Response]:
        """Start one logical call through the chain (await the result)."""
        if self._closed:
            raise ClientClosedError("this client is closed; create a new one")
        # No local alias of the headers: they will hold the token, and frame locals show up in
        # some tracebacks.
        req = Request(method=method, path=path, params=params, json=json_body,
                      headers=dict(_JSON_HEADERS), idempotent=idempotent, reconcile=reconcile,
                      retry_rate_limits=retry_rate_limits)
        return self._handler(req)

    async def _send(self, request: Request) -> Response:
        session = self._get_session()
        data = (json.dumps(request.json, separators=(",", ":"), ensure_ascii=False).encode()
                if request.json is not None else None)
        start = time.monotonic()
        try:
            async with session.request(
                request.method, self._base_url + request.path, params=request.params,
                data=data, headers=request.headers, timeout=self._timeout,
                proxy=self.config.proxy,
            ) as resp:
                status, headers = resp.status, resp.headers
                size = resp.content_length
                if size is None:
                    body = await _read_streamed(resp)
                elif size > _constants.MAX_RESPONSE_BYTES:
                    raise UnexpectedResponseError(
                        f"HTTP {status} answer of {size} bytes is too large", http_status=status)
                else:
                    body = await resp.read()
        except (asyncio.TimeoutError, TimeoutError):
            raise APITimeoutError(
                f"{request.method} {request.path}: no answer within {self.config.timeout:g}s"
            ) from None
        except aiohttp.ClientConnectorError as exc:
            raise APIConnectionError(
                f"{request.method} {request.path}: cannot connect: {exc.os_error}",
                maybe_sent=False) from None
        except aiohttp.ClientError as exc:
            raise APIConnectionError(
                f"{request.method} {request.path}: connection failed: {type(exc).__name__}: {exc}"
            ) from None
        data_out, request_id = decode_envelope(
            status, headers, body, retry_after_max=self.retry_policy.retry_after_max)
        return Response(status=status, headers=headers, data=data_out, request_id=request_id,
                        elapsed=time.monotonic() - start)

    async def aclose(self) -> None:
        """Close the session we own (safe to call twice); a borrowed session stays open."""
        if self._closed:
            return
        self._closed = True
        session, self._session = self._session, None
        if session is not None and self._owns_session and not session.closed:
            await session.close()

    def detach_after_fork(self) -> None:
        """In a fork child the parent's session is unusable: forget it without touching it.

        Closing it (or letting it be collected) would unregister the parent's sockets from the
        epoll instance that parent and child share after fork, and hang the parent.
        """
        if self._session is not None:
            FORK_ORPHANS.append(self._session)
        self._session, self._loop = None, None


__all__ = ["Transport", "decode_envelope"]
