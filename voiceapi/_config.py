"""Client configuration: explicit arguments, then environment variables, then defaults."""

from __future__ import annotations

import functools
import os
import ssl
from collections.abc import Mapping

import attrs

from . import _constants as C
from ._auth import APIKeyCredentials, Credentials, JWTCredentials
from ._errors import ValidationError


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


def _clean(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    return value or None


def resolve_credentials(
    access_key: str | None, secret_key: str | None, api_key: str | None,
    env: Mapping[str, str],
) -> Credentials:
    """Explicit arguments win as a whole; the environment fills in only when none were given."""
    ak, sk, key = _clean(access_key), _clean(secret_key), _clean(api_key)
    if ak is None and sk is None and key is None:
        ak, sk = _clean(env.get(C.ENV_ACCESS_KEY)), _clean(env.get(C.ENV_SECRET_KEY))
        key = _clean(env.get(C.ENV_API_KEY))
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
    env = os.environ if env is None else env
    creds = resolve_credentials(access_key, secret_key, api_key, env)
    url = _clean(base_url) or _clean(env.get(C.ENV_BASE_URL)) or C.DEFAULT_BASE_URL
    if not url.startswith(("http://", "https://")):
        raise ValidationError(f"base_url must start with http:// or https://, got {url!r}")
    if not timeout > 0:
        raise ValidationError("timeout must be > 0")
    if max_retries < 0:
        raise ValidationError("max_retries must be >= 0")
    if max_requests_per_second is not None and not max_requests_per_second > 0:
        raise ValidationError("max_requests_per_second must be > 0")
    if not retry_budget > 0:
        raise ValidationError("retry_budget must be > 0")
    if max_concurrent_requests is None:
        max_concurrent_requests = C.DEFAULT_MAX_CONCURRENT_REQUESTS
    elif isinstance(max_concurrent_requests, bool) or not isinstance(
            max_concurrent_requests, int) or max_concurrent_requests < 1:
        raise ValidationError("max_concurrent_requests must be an integer >= 1")
    return ClientConfig(
        base_url=url.rstrip("/"), credentials=creds, timeout=float(timeout),
        max_retries=int(max_retries), retry_budget=float(retry_budget),
        max_requests_per_second=max_requests_per_second,
        max_concurrent_requests=max_concurrent_requests, ssl=ssl, proxy=proxy)
