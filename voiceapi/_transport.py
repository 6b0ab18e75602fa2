"""The transport: one aiohttp session per client, the middleware chain, and envelope decoding.

``send`` is the single place that calls ``session.request``; everything else is a middleware.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import aiohttp

from . import _constants
from ._config import ClientConfig, user_agent
from ._decode import decode_envelope
from ._errors import (
    APIConnectionError,
    APITimeoutError,
    ClientClosedError,
    EventLoopError,
    SentCredential,
    UnexpectedResponseError,
    ValidationError,
    VoiceAPIError,
    printable,
)
from ._logs import configure_from_env
from ._middlewares import (
    AuthMiddleware,
    CoordinatorMiddleware,
    Limits,
    Middleware,
    Request,
    Response,
    build_chain,
    logging_middleware,
    wait_turn,
)
from ._retry import RetryMiddleware, RetryPolicy

if TYPE_CHECKING:
    from ._coordinator import Coordinator

_CLOSED = "this client is closed; create a new one"

#: Sessions inherited from the parent across fork, kept alive untouched in the child (see
#: ``Transport.forget_loop``): collecting one would close the parent's connections there.
FORK_ORPHANS: list[object] = []
#: Every transport with a session of its own, for the fork hook at the end of this module.
_OWNERS: weakref.WeakSet[Transport] = weakref.WeakSet()


async def _read_streamed(resp: aiohttp.ClientResponse) -> bytes:
    """The body, refused once it passes MAX_RESPONSE_BYTES (answers that large come from a
    broken or hostile proxy, never from Kling). Counted as read: ``iter_any`` yields the
    decompressed bytes, so a small gzip answer cannot expand without limit in memory."""
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


async def _read(resp: aiohttp.ClientResponse) -> bytes:
    # Content-Length (the size on the wire, compressed or not) refuses the obvious case unread.
    size = resp.content_length
    if size is not None:
        if size > _constants.MAX_RESPONSE_BYTES:
            raise UnexpectedResponseError(
                f"HTTP {resp.status} answer of {size} bytes is too large",
                http_status=resp.status)
        headers = resp.headers
        if "Content-Encoding" not in headers and "Transfer-Encoding" not in headers:
            # Plain bytes of a declared size (Kling's usual answer): the parser delivers exactly
            # that many, so one read is bounded too; the chunk loop guards the other cases.
            return await resp.read()
    return await _read_streamed(resp)


class Transport:
    """Owns (or borrows) the aiohttp session and runs every request through the chain."""

    def __init__(
        self,
        config: ClientConfig,
        *,
        session: aiohttp.ClientSession | None = None,
        middlewares: Sequence[Middleware] = (),
        retry_policy: RetryPolicy | None = None,
        coordinator: Coordinator | None = None,
    ) -> None:
        configure_from_env()
        self.config = config
        middlewares = _check_parts(session, middlewares, retry_policy, coordinator)
        self.retry_policy = retry_policy or RetryPolicy()
        self._session = session
        self._owns_session = session is None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._timeout = aiohttp.ClientTimeout(total=config.timeout)
        self._base_url = config.base_url
        # Our own session sends these as defaults; a borrowed one gets them on each call.
        self._call_headers: dict[str, str] | None = (
            None if self._owns_session
            else {"User-Agent": user_agent(), "Accept": "application/json"})
        #: Shares request rate and 1302/1303 backoff across workers; ``create_many`` also uses
        #: it when it is given no coordinator of its own. None: no extra middleware at all.
        self.coordinator = coordinator
        chain: list[Middleware] = [
            RetryMiddleware(max_retries=config.max_retries, budget=config.retry_budget,
                            policy=self.retry_policy, credentials=config.credentials)]
        if coordinator is not None:
            chain.append(CoordinatorMiddleware(coordinator))
        self._limits = Limits(max_concurrent=config.max_concurrent_requests,
                              per_second=config.max_requests_per_second)
        chain += [AuthMiddleware(config.credentials), *middlewares, logging_middleware]
        self._handler = build_chain(chain, self._send)
        if self._owns_session:
            _OWNERS.add(self)

    @property
    def closed(self) -> bool:
        return self._closed

    def _get_session(self) -> aiohttp.ClientSession:
        if self._closed:
            raise ClientClosedError(_CLOSED)
        loop = asyncio.get_running_loop()
        session = self._session
        if session is None:
            # The pool itself is unbounded: Limits caps concurrency in one place,
            # before the attempt's timeout starts (a pool wait would count against it).
            connector = aiohttp.TCPConnector(
                limit=0, ssl=True if self.config.ssl is None else self.config.ssl)
            session = self._session = aiohttp.ClientSession(
                connector=connector, timeout=self._timeout,
                headers={"User-Agent": user_agent(), "Accept": "application/json"})
            self._loop = loop
        elif self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise EventLoopError(
                "this client's HTTP session belongs to another event loop; create one client "
                "per event loop (or use VoiceClient from threads)")
        if session.closed:
            raise ClientClosedError(
                "the aiohttp session passed as session= was closed by its owner; keep it open "
                "while the client is in use, or let the client create its own")
        return session

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
            raise ClientClosedError(_CLOSED)
        # The headers dict is the call's own: auth adds the token to it, and nothing else
        # (User-Agent and Accept are session defaults).
        headers = {} if self._call_headers is None else dict(self._call_headers)
        # Positional: keyword matching in attrs' __init__ is a measurable share of a call.
        req = Request(method, path, params, json_body, headers, idempotent, reconcile,
                      retry_rate_limits)
        return self._handler(req)

    def _attempt_timeout(self, request: Request) -> aiohttp.ClientTimeout | None:
        """None: the session's own timeout applies. Otherwise the per-attempt timeout, clipped
        to what is left of the call's retry budget (so the budget is a hard cap)."""
        left = request.deadline - time.monotonic()
        if left >= self.config.timeout:
            return None if self._owns_session else self._timeout
        if left <= 0:
            raise APITimeoutError(
                f"{request.method} {request.path}: retry budget of "
                f"{self.config.retry_budget:g}s used up before this attempt")
        return aiohttp.ClientTimeout(total=left)

    async def _send(self, request: Request) -> Response:
        session = self._get_session()
        data = None
        if request.json is not None:
            data = json.dumps(request.json, separators=(",", ":"), ensure_ascii=False).encode()
            request.headers["Content-Type"] = "application/json"
        url = self._base_url + request.path
        if request.params:
            url += _query(request.params)
        # Errors are built inside the except blocks but raised after them: raising there would
        # chain aiohttp's exception as __context__, and some (ClientResponseError) carry the
        # request's headers, token included.
        error: VoiceAPIError | None = None
        timeout: aiohttp.ClientTimeout | None = None
        limits = self._limits
        if not limits.try_enter():  # the common case: a free slot, no pacing, no extra frame
            await wait_turn(request, limits.enter,
                            "a request slot (max_concurrent_requests, max_requests_per_second)",
                            release=limits.leave)
        try:
            # After the wait (a turn is not a timeout); the common case, a budget longer than
            # the timeout, inline: the session's own timeout applies.
            if request.deadline - time.monotonic() < self.config.timeout or \
                    not self._owns_session:
                timeout = self._attempt_timeout(request)
            # Kling never redirects; a redirect must not carry a token (or a create) elsewhere.
            ctx = (session.request(request.method, url, data=data,
                                   headers=request.headers, proxy=self.config.proxy,
                                   allow_redirects=False)
                   if timeout is None else
                   session.request(request.method, url, data=data,
                                   headers=request.headers, proxy=self.config.proxy,
                                   allow_redirects=False, timeout=timeout))
            async with ctx as resp:
                status, headers = resp.status, resp.headers
                body = await _read(resp)
        except (asyncio.TimeoutError, TimeoutError):
            seconds = timeout.total if timeout is not None else self.config.timeout
            error = APITimeoutError(
                f"{request.method} {request.path}: no answer within {seconds:g}s")
        except aiohttp.ClientHttpProxyError as exc:
            # The proxy refused the CONNECT tunnel (407: proxy credentials; 5xx: it could not
            # reach Kling): nothing reached the API, so even a create needs no lookup.
            error = APIConnectionError(
                f"{request.method} {request.path}: the proxy refused the connection: HTTP "
                f"{exc.status} {printable(exc.message, 200, self._sent(request))}",
                maybe_sent=False,
                http_status=exc.status)
        except aiohttp.ClientConnectorError as exc:
            error = APIConnectionError(
                f"{request.method} {request.path}: cannot connect: {exc.os_error}",
                maybe_sent=False)
        except aiohttp.ClientError as exc:
            error = APIConnectionError(
                f"{request.method} {request.path}: connection failed: {type(exc).__name__}: "
                f"{_describe(exc, self._sent(request))}")
        except RuntimeError:
            if not session.closed:
                raise
            error = ClientClosedError("the aiohttp session passed as session= was closed by "
                                      "its owner during the call")
        finally:
            limits.leave()
        if error is not None:
            if self._closed:
                error = ClientClosedError("the client was closed during this call")
            try:
                raise error
            finally:
                # Python 3.10 can still count aiohttp's own exception as being handled here
                # (one thrown into its coroutine) and chain it as __context__: it quotes the
                # answer's bytes, maybe our token. The error says all there is to say.
                error.__context__ = None
        data_out, request_id = decode_envelope(
            status, headers, body, retry_after_max=self.retry_policy.retry_after_max,
            sent=self._sent(request))
        return Response(status=status, headers=headers, data=data_out, request_id=request_id)

    def credential_mask(self) -> SentCredential:
        """This client's credential, to mask in server text quoted outside an answer's own
        decoding (a failed task's message in a TaskFailedError). Never fails: a credentials
        object of the user's own that cannot sign now must not replace the error being built."""
        try:
            return SentCredential(self.config.credentials.authorization())
        except Exception:  # the JWT pattern still masks any token
            return SentCredential(None)

    @staticmethod
    def _sent(request: Request) -> SentCredential:
        """The credential the request carried, to mask wherever the answer repeats it."""
        return SentCredential(request.headers.get("Authorization"))

    def holds_open_session(self) -> bool:
        """A session of our own was opened and not closed (a client dropped without aclose)."""
        session = self._session
        return (not self._closed and self._owns_session and session is not None
                and not session.closed)

    async def aclose(self) -> None:
        """Close the session we own (safe to call twice); a borrowed session stays open."""
        if self._closed:
            return
        self._closed = True
        session, self._session = self._session, None
        if session is not None and self._owns_session and not session.closed:
            await session.close()

    def forget_loop(self) -> list[object]:
        """In a fork child (the hook below, and the sync runner's): drop everything bound to
        the parent's event loop (session, limiter queues, locks) so the next call starts
        afresh. Returns what must be kept alive *untouched*: closing or collecting the parent's
        session would unregister the parent's sockets from the epoll instance that parent
        and child share after fork, and hang the parent. Safe to call twice.
        """
        keep: list[object] = []
        if self._owns_session and self._session is not None:
            keep.append(self._session)
            self._session = None
        self._loop = None
        self._limits.reset()
        after_fork = getattr(self.config.credentials, "after_fork", None)
        if after_fork is not None:
            after_fork()
        return keep


def _check_parts(session: object, middlewares: object, retry_policy: object,
                 coordinator: object) -> list[Middleware]:
    """The client's pluggable parts, checked at construction: a wrong one would otherwise
    fail every call as a bare TypeError or AttributeError deep in the chain. Returns the
    middlewares as a list (None counts as none)."""
    if session is not None and not isinstance(session, aiohttp.ClientSession):
        raise ValidationError(f"session must be an aiohttp.ClientSession, got "
                              f"{type(session).__name__}")
    if retry_policy is not None and not isinstance(retry_policy, RetryPolicy):
        raise ValidationError(f"retry_policy must be a voiceapi.RetryPolicy, got "
                              f"{type(retry_policy).__name__}")
    if coordinator is not None and not all(
            callable(getattr(coordinator, name, None))
            for name in ("before_request", "rate_limited")):
        raise ValidationError(f"coordinator must implement voiceapi's Coordinator protocol "
                              f"(before_request, rate_limited, ...), got "
                              f"{type(coordinator).__name__}")
    if middlewares is None:
        return []
    if isinstance(middlewares, (str, bytes)) or not isinstance(middlewares, Iterable):
        raise ValidationError(f"middlewares must be a sequence of middlewares, got "
                              f"{type(middlewares).__name__}")
    parts = list(middlewares)
    for part in parts:
        if not callable(part):
            raise ValidationError(f"each middleware must be callable as "
                                  f"mw(request, call_next), got {type(part).__name__}")
    return parts


def _after_fork_in_child() -> None:
    """An AsyncVoiceClient the child drops (or uses on a loop of its own) must not touch the
    parent's connections: its session is set aside for good, and the child gets a new one."""
    for transport in list(_OWNERS):
        FORK_ORPHANS.extend(transport.forget_loop())


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _query(params: dict[str, str]) -> str:
    """``?k=v&...`` built here: aiohttp would rebuild the URL through yarl for a params dict,
    a measurable share of a list call. Keys are the SDK's own names; digit values (page
    numbers) need no encoding."""
    return "?" + "&".join([
        f"{k}={v if v.isdigit() and v.isascii() else quote(v, safe='')}"
        for k, v in params.items()])


def _describe(exc: aiohttp.ClientError, sent: SentCredential) -> str:
    """A short text for an aiohttp error, never its request_info (which holds the headers).

    Made printable and masked like any server text: aiohttp quotes the bytes it could not
    parse (a status line, a header, a chunk size), and a broken proxy that reflects the
    request into its answer puts our token there.
    """
    if isinstance(exc, aiohttp.ClientResponseError):
        return printable(f"HTTP {exc.status} {exc.message}", 300, sent)
    return printable(str(exc), 300, sent)


__all__ = ["Transport"]
