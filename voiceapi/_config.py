"""Client configuration: explicit arguments, then environment variables, then defaults."""

from __future__ import annotations

import functools
import math
import numbers
import os
import re
import ssl
import ssl as _ssl
import urllib.parse
from collections.abc import Mapping

import attrs

from . import _constants as C
from ._auth import APIKeyCredentials, Credentials, JWTCredentials, check_key
from ._errors import ValidationError

# Whitespace or control characters inside a URL: yarl would quote or refuse them per call.
_UNSAFE_URL_CHARS = re.compile(r"[\s\x00-\x1f\x7f-\x9f]")


@attrs.frozen(repr=False)
class ClientConfig:
    base_url: str
    credentials: Credentials
    timeout: float = C.DEFAULT_TIMEOUT
    max_retries: int = C.DEFAULT_MAX_RETRIES
    retry_budget: float = C.DEFAULT_RETRY_BUDGET
    max_requests_per_second: float | None = None
    max_concurrent_requests: int = C.DEFAULT_MAX_CONCURRENT_REQUESTS
    ssl: ssl.SSLContext | bool | None = None
    proxy: str | None = None

    def __repr__(self) -> str:  # credentials repr already hides secrets; say so explicitly anyway
        return (f"ClientConfig(base_url={self.base_url!r}, credentials={self.credentials!r}, "
                f"timeout={self.timeout!r}, max_retries={self.max_retries!r})")


@functools.cache
def package_version() -> str:
    """The installed distribution's version: one source of truth, ``pyproject.toml``.

    Read on first use, not at import (importlib.metadata costs a few ms); a source tree that
    was never installed reports ``0+unknown`` rather than a made-up number.
    """
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("voiceapi")
    except PackageNotFoundError:
        return "0+unknown"


def user_agent() -> str:
    return f"voiceapi-python/{package_version()}"


def _clean(value: object, name: str) -> str | None:
    """A setting stripped of surrounding whitespace (values read from files often end in a
    newline); empty means unset. Never quotes the value: it may be a secret."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValidationError(f"{name} must be a string, got {type(value).__name__}")
    return value.strip() or None


def _key(value: object, name: str, env_name: str, env: Mapping[str, str]) -> str | None:
    """An explicit key argument, or (``value`` None) the environment's: stripped (a key read
    from a file often ends in a newline), then checked for characters that would fail every
    call; the error says where the bad value came from."""
    if value is None:
        value, name = env.get(env_name), env_name
    key = _clean(value, name)
    return None if key is None else check_key(key, name)


def resolve_credentials(
    access_key: str | None, secret_key: str | None, api_key: str | None,
    env: Mapping[str, str],
) -> Credentials:
    """Explicit arguments win as a whole; the environment fills in only when none were given."""
    no_env: Mapping[str, str] = {}
    ak = _key(access_key, "access_key", C.ENV_ACCESS_KEY, no_env)
    sk = _key(secret_key, "secret_key", C.ENV_SECRET_KEY, no_env)
    key = _key(api_key, "api_key", C.ENV_API_KEY, no_env)
    if ak is None and sk is None and key is None:
        ak = _key(None, "access_key", C.ENV_ACCESS_KEY, env)
        sk = _key(None, "secret_key", C.ENV_SECRET_KEY, env)
        key = _key(None, "api_key", C.ENV_API_KEY, env)
    if key is not None and (ak is None or sk is None):
        return APIKeyCredentials(key)
    if ak is not None and sk is not None:
        return JWTCredentials(ak, sk)
    if ak is not None or sk is not None:
        missing = C.ENV_SECRET_KEY if sk is None else C.ENV_ACCESS_KEY
        raise ValidationError(
            f"AK/SK authentication needs both keys; the {missing.split('_', 1)[1].lower()} is "
            f"missing (pass it or set {missing})")
    raise ValidationError(
        f"no credentials: pass access_key and secret_key, or api_key, or set {C.ENV_ACCESS_KEY} "
        f"and {C.ENV_SECRET_KEY}, or {C.ENV_API_KEY}")


def _split_url(url: str, name: str, schemes: tuple[str, ...]) -> urllib.parse.SplitResult:
    """``url`` parsed, with a scheme from ``schemes`` (any case) and a host; the error never
    quotes the URL (a proxy URL may carry a password)."""
    if _UNSAFE_URL_CHARS.search(url) is not None:
        raise ValidationError(f"{name} must not contain spaces or control characters")
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 -- raises for a port that is not a number or out of range
    except ValueError:  # e.g. "http://[::1" or "http://h:99999"
        raise ValidationError(f"{name} is not a valid URL") from None
    if parts.scheme.lower() not in schemes:
        wanted = " or ".join(f"{scheme}://" for scheme in schemes)
        raise ValidationError(f"{name} must start with {wanted}")
    if not parts.hostname:
        raise ValidationError(f"{name} must name a host (e.g. {schemes[0]}://host:port)")
    return parts


def _base_url(value: str | None, env: Mapping[str, str]) -> str:
    """The API root: scheme lower-cased, no trailing slash. A query or fragment would swallow
    every request path appended to it, and user:password@ would clash with our Authorization
    header, so those are refused."""
    url = _clean(value, "base_url")
    name = "base_url"
    if url is None:
        url, name = _clean(env.get(C.ENV_BASE_URL), C.ENV_BASE_URL), C.ENV_BASE_URL
    if url is None:
        return C.DEFAULT_BASE_URL
    parts = _split_url(url, name, ("https", "http"))
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise ValidationError(f"{name} must not have a query (?) or fragment (#): request "
                              "paths are appended to it")
    if parts.username is not None or parts.password is not None:
        raise ValidationError(f"{name} must not carry user:password@ (credentials go in "
                              "access_key/secret_key or api_key)")
    return f"{parts.scheme.lower()}://{parts.netloc}{parts.path}".rstrip("/")


def _proxy(value: object) -> str | None:
    """aiohttp's ``proxy=`` speaks HTTP(S) proxies only (SOCKS needs a connector on a
    ``session`` of your own)."""
    url = _clean(value, "proxy")
    if url is not None:
        _split_url(url, "proxy", ("http", "https"))
    return url


def checked_number(value: object, name: str, *, minimum: float = 0.0,
                   exclusive: bool = True, integer: bool = False) -> float:
    """A finite real number above (or at) ``minimum``. Strings from env/config files, bools,
    None, NaN and infinities are refused by name rather than failing later as TypeError."""
    # The numbers ABCs, so numpy scalars and Fractions pass; bool is an int but never meant.
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        wanted = "an integer" if integer else "a number"
        raise ValidationError(f"{name} must be {wanted}, got {type(value).__name__}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond any float
        number = math.inf
    if not math.isfinite(number):
        raise ValidationError(f"{name} must be a finite number")
    if number <= minimum if exclusive else number < minimum:
        raise ValidationError(f"{name} must be {'>' if exclusive else '>='} {minimum:g}, "
                              f"got {number:g}")
    return number


def make_config(
    access_key: str | None = None,
    secret_key: str | None = None,
    *,
    api_key: str | None = None,
    base_url: str | None = None,
    timeout: float = C.DEFAULT_TIMEOUT,
    max_retries: int = C.DEFAULT_MAX_RETRIES,
    retry_budget: float = C.DEFAULT_RETRY_BUDGET,
    max_requests_per_second: float | None = None,
    max_concurrent_requests: int | None = None,
    ssl: ssl.SSLContext | bool | None = None,
    proxy: str | None = None,
    env: Mapping[str, str] | None = None,
) -> ClientConfig:
    """Every setting checked here, at construction: a wrong one (often a string read from an
    env var or config file) is a ValidationError naming it, never a failure on every call."""
    env = os.environ if env is None else env
    creds = resolve_credentials(access_key, secret_key, api_key, env)
    url = _base_url(base_url, env)
    timeout = checked_number(timeout, "timeout")
    checked_number(max_retries, "max_retries", exclusive=False, integer=True)
    retry_budget = checked_number(retry_budget, "retry_budget")
    if max_requests_per_second is not None:
        max_requests_per_second = checked_number(max_requests_per_second,
                                                 "max_requests_per_second")
    if max_concurrent_requests is None:
        max_concurrent_requests = C.DEFAULT_MAX_CONCURRENT_REQUESTS
    elif isinstance(max_concurrent_requests, bool) or not isinstance(
            max_concurrent_requests, int) or max_concurrent_requests < 1:
        raise ValidationError("max_concurrent_requests must be an integer >= 1")
    if ssl is not None and not isinstance(ssl, (bool, _ssl.SSLContext)) and \
            type(ssl).__name__ != "Fingerprint":  # aiohttp.Fingerprint (pinning) works too
        raise ValidationError(f"ssl must be an ssl.SSLContext, True, False or None, got "
                              f"{type(ssl).__name__}")
    return ClientConfig(
        base_url=url, credentials=creds, timeout=timeout, max_retries=int(max_retries),
        retry_budget=retry_budget, max_requests_per_second=max_requests_per_second,
        max_concurrent_requests=max_concurrent_requests, ssl=ssl, proxy=_proxy(proxy))
