"""Credentials: AK/SK signed into a cached HS256 JWT, or a static API key.

Neither class ever shows its secret in ``repr``/``str``; tokens are built per attempt by the auth
middleware, so a retried request after a 1004 carries a freshly signed token.
"""

from __future__ import annotations

import functools
import json
import re
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from ._constants import JWT_NBF_SKEW_SECONDS, JWT_REFRESH_MARGIN_SECONDS, JWT_TTL_SECONDS
from ._errors import ValidationError

if TYPE_CHECKING:
    from jwt.api_jws import PyJWS


# Control characters (C0, DEL, C1) and lone surrogates: in a key they are a paste or file-reading
# accident (an inner newline, a NUL), and each would fail every call deep in the transport
# (aiohttp refuses them in headers; UTF-8 cannot encode a surrogate for the HMAC key).
_UNUSABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def check_key(value: object, name: str) -> str:
    """``value`` as a usable key string, or a ValidationError that never quotes it (it is a
    secret): only its type, or the position of the first unusable character, is shown."""
    if not isinstance(value, str):
        raise ValidationError(f"{name} must be a string, got {type(value).__name__}")
    bad = _UNUSABLE.search(value)
    if bad is not None:
        raise ValidationError(
            f"{name} contains a control character or invalid text at position {bad.start()} "
            f"(U+{ord(bad.group()):04X}); check how it was read (an inner line break, a NUL)")
    return value


@functools.cache
def _jws() -> PyJWS:
    """PyJWT's signer, built on first use (PyJWT pulls in http.client & co: keep imports light).

    HS256 is registered without PyJWT's short-key warning: Kling issues the secret key, so its
    length is not the user's to choose, and a warning per signature would only be noise (or an
    error under ``-W error``).
    """
    from jwt.algorithms import HMACAlgorithm
    from jwt.api_jws import PyJWS

    class VendorKeyHMAC(HMACAlgorithm):
        def check_key_length(self, key: bytes) -> str | None:
            return None

    jws = PyJWS(algorithms=[])
    jws.register_algorithm("HS256", VendorKeyHMAC(HMACAlgorithm.SHA256))
    return jws


class Credentials(Protocol):
    """What the transport needs from a credential."""

    def authorization(self) -> str:
        """The full ``Authorization`` header value."""

    def invalidate(self, header_value: str, server_time: float | None = None) -> bool:
        """The server refused the token as expired or not yet valid (1004/1003); return True
        when a new one can be made. ``server_time``: the server's clock, if it told us."""


class APIKeyCredentials:
    """A static API key, sent as-is (kling-api.md §2.1)."""

    __slots__ = ("_header",)

    def __init__(self, api_key: str) -> None:
        self._header = f"Bearer {check_key(api_key, 'api_key')}"

    def authorization(self) -> str:
        return self._header

    def invalidate(self, header_value: str, server_time: float | None = None) -> bool:
        return False  # a static key cannot be refreshed

    def __repr__(self) -> str:
        return "APIKeyCredentials(api_key=***)"


class JWTCredentials:
    """AK/SK → HS256 JWT (``iss``=AK, ``exp``=now+ttl, ``nbf``=now−5), cached and re-signed
    ``refresh_margin`` seconds before it expires.

    Thread-safe: the sync facade and many threads may share one client.
    """

    __slots__ = ("_access_key", "_clock", "_expires", "_header", "_lock", "_margin",
                 "_refused_second", "_secret_key", "_signed_second", "_skew", "_ttl")

    def __init__(
        self,
        access_key: str,
        secret_key: str,
        *,
        ttl: int = JWT_TTL_SECONDS,
        refresh_margin: int = JWT_REFRESH_MARGIN_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._access_key = check_key(access_key, "access_key")
        self._secret_key = check_key(secret_key, "secret_key")
        self._ttl = ttl
        self._margin = min(refresh_margin, ttl // 2)
        self._clock = clock
        self._lock = threading.Lock()
        self._header: str | None = None
        self._expires = 0.0
        # Seconds to add to our clock for the token's claims, learned when the server
        # refuses a token on time grounds (our clock is off from Kling's).
        self._skew = 0.0
        # The whole second the current token's claims are built on, and that of the last token
        # the server refused: claims have 1 s resolution, so a re-sign within the same second
        # would produce the very bytes that were refused.
        self._signed_second: int | None = None
        self._refused_second: int | None = None

    @property
    def access_key(self) -> str:
        return self._access_key

    def sign(self, now: float | None = None) -> str:
        """A new token; only ``iss``, ``exp`` and ``nbf`` like the official samples."""
        now_i = int(self._clock() if now is None else now)
        payload = {"iss": self._access_key, "exp": now_i + self._ttl,
                   "nbf": now_i - JWT_NBF_SKEW_SECONDS}
        body = json.dumps(payload, separators=(",", ":")).encode()
        return _jws().encode(body, self._secret_key, algorithm="HS256",
                           headers={"alg": "HS256", "typ": "JWT"})

    def authorization(self) -> str:
        now = self._clock()
        header = self._header
        if header is not None and now < self._expires - self._margin:
            return header
        with self._lock:
            if self._header is None or now >= self._expires - self._margin:
                second = int(now + self._skew)
                if second == self._refused_second:
                    second += 1  # still within nbf's allowance, and a token of its own
                self._header = f"Bearer {self.sign(second)}"
                self._signed_second = second
                self._expires = int(now) + self._ttl
            return self._header

    def after_fork(self) -> None:
        """In a fork child: the lock may have been held by a parent thread that is gone."""
        self._lock = threading.Lock()

    def invalidate(self, header_value: str, server_time: float | None = None) -> bool:
        with self._lock:
            # Only drop the token that failed: concurrent 1004s must not each re-sign.
            if self._header == header_value:
                self._header = None
                self._refused_second = self._signed_second
                if server_time is not None:
                    skew = server_time - self._clock()
                    # The Date header has 1 s resolution; below the nbf allowance, ignore it.
                    self._skew = skew if abs(skew) > JWT_NBF_SKEW_SECONDS else 0.0
        return True

    def __repr__(self) -> str:
        return f"JWTCredentials(access_key={self._access_key!r}, secret_key=***)"
