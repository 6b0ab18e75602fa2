"""JWT claims and refresh, API keys, configuration precedence, and secrets never shown."""

from __future__ import annotations

import threading

import jwt
import pytest

import voiceapi
from voiceapi._auth import APIKeyCredentials, JWTCredentials
from voiceapi._config import make_config

SECRET = "sk-very-secret-0123456789-abcdefghijkl"


class FakeClock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _claims(header: str) -> dict[str, object]:
    token = header.removeprefix("Bearer ")
    return jwt.decode(token, SECRET, algorithms=["HS256"],
                      options={"verify_exp": False, "verify_nbf": False})


def test_jwt_has_exactly_the_documented_claims() -> None:
    clock = FakeClock()
    header = JWTCredentials("my-ak", SECRET, clock=clock).authorization()
    assert header.startswith("Bearer ")
    token = header.removeprefix("Bearer ")
    assert jwt.get_unverified_header(token) == {"alg": "HS256", "typ": "JWT"}
    assert _claims(header) == {"iss": "my-ak", "exp": 1_800_001_800, "nbf": 1_799_999_995}


def test_jwt_is_cached_then_resigned_before_expiry() -> None:
    clock = FakeClock()
    creds = JWTCredentials("ak", SECRET, clock=clock)
    first = creds.authorization()
    clock.now += 1200  # 20 minutes: still well inside the 30-minute token
    assert creds.authorization() == first
    clock.now += 301  # now within the 5-minute refresh margin
    second = creds.authorization()
    assert second != first
    assert _claims(second)["exp"] == int(clock.now) + 1800


def test_invalidate_drops_only_the_failed_token() -> None:
    clock = FakeClock()
    creds = JWTCredentials("ak", SECRET, clock=clock)
    old = creds.authorization()
    clock.now += 1
    assert creds.invalidate("Bearer some-other-token")
    assert creds.authorization() == old  # a stale 1004 report does not force a re-sign
    assert creds.invalidate(old)
    assert creds.authorization() != old


def test_jwt_is_safe_under_many_threads() -> None:
    creds = JWTCredentials("ak", SECRET)
    seen: set[str] = set()
    lock = threading.Lock()

    def work() -> None:
        for _ in range(200):
            value = creds.authorization()
            with lock:
                seen.add(value)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(seen) == 1


def test_api_key_is_sent_as_is_and_never_refreshed() -> None:
    creds = APIKeyCredentials("key-123")
    assert creds.authorization() == "Bearer key-123"
    assert creds.invalidate("Bearer key-123") is False


def test_reprs_hide_every_secret() -> None:
    client = voiceapi.AsyncVoiceClient("ak", SECRET)
    key_client = voiceapi.AsyncVoiceClient(api_key="api-key-secret-987")
    config = make_config("ak", SECRET)
    for text in (repr(client), str(client), repr(key_client), repr(config),
                 repr(config.credentials), repr(JWTCredentials("ak", SECRET))):
        assert SECRET not in text and "api-key-secret-987" not in text


ENV = {"KLING_ACCESS_KEY": "env-ak", "KLING_SECRET_KEY": "env-sk",
       "KLING_BASE_URL": "https://api-beijing.klingai.com/"}


def test_env_vars_fill_in_when_no_arguments() -> None:
    config = make_config(env=ENV)
    assert isinstance(config.credentials, JWTCredentials)
    assert config.credentials.access_key == "env-ak"
    assert config.base_url == "https://api-beijing.klingai.com"


def test_arguments_beat_env_vars() -> None:
    config = make_config(api_key="arg-key", base_url="http://127.0.0.1:1", env=ENV)
    assert isinstance(config.credentials, APIKeyCredentials)
    assert config.base_url == "http://127.0.0.1:1"


def test_default_base_url_is_singapore() -> None:
    assert make_config(api_key="k", env={}).base_url == "https://api-singapore.klingai.com"


def test_api_key_from_env() -> None:
    config = make_config(env={"KLING_API_KEY": "k"})
    assert config.credentials.authorization() == "Bearer k"


@pytest.mark.parametrize(("kwargs", "needle"), [
    ({}, "KLING_ACCESS_KEY"),
    ({"access_key": "ak"}, "KLING_SECRET_KEY"),
    ({"secret_key": "sk"}, "KLING_ACCESS_KEY"),
    ({"api_key": "k", "base_url": "ftp://x"}, "base_url"),
    ({"api_key": "k", "timeout": 0}, "timeout"),
    ({"api_key": "k", "max_retries": -1}, "max_retries"),
    ({"api_key": "k", "max_concurrent_requests": 0}, "max_concurrent_requests"),
    ({"api_key": "k", "max_concurrent_requests": 2.5}, "max_concurrent_requests"),
    ({"api_key": "k", "retry_budget": 0}, "retry_budget"),
])
def test_bad_configuration_is_a_validation_error(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(voiceapi.ValidationError, match=needle):
        make_config(env={}, **kwargs)  # type: ignore[arg-type]


def test_missing_secret_error_never_echoes_the_other_key() -> None:
    with pytest.raises(voiceapi.ValidationError) as info:
        make_config(secret_key=SECRET, env={})
    assert SECRET not in str(info.value)


def test_short_vendor_secret_signs_without_warnings() -> None:
    # pytest runs with warnings as errors: a key-length warning would fail this test.
    header = JWTCredentials("ak", "short").authorization()
    token = header.removeprefix("Bearer ")
    assert jwt.get_unverified_header(token)["alg"] == "HS256"


def test_server_time_corrects_the_token_clock() -> None:
    clock = FakeClock()
    creds = JWTCredentials("ak", SECRET, clock=clock)
    first = creds.authorization()
    assert creds.invalidate(first, server_time=clock.now + 3600)
    assert _claims(creds.authorization())["nbf"] == int(clock.now + 3600) - 5
    again = creds.authorization()
    assert creds.invalidate(again, server_time=clock.now + 1)  # within the allowance: no skew
    assert _claims(creds.authorization())["nbf"] == int(clock.now) - 5
