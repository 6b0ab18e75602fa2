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


def test_base_url_is_parsed_and_normalised() -> None:
    config = make_config(api_key="k", base_url=" HTTPS://Gateway.example:8443/kling/ ", env={})
    assert config.base_url == "https://Gateway.example:8443/kling"


@pytest.mark.parametrize(("env", "needle"), [
    ({"KLING_BASE_URL": "http://h?tenant=a"}, "KLING_BASE_URL must not have a query"),
    ({"KLING_BASE_URL": "http://:8080"}, "KLING_BASE_URL must name a host"),
    ({"KLING_BASE_URL": "http://h:99999"}, "KLING_BASE_URL is not a valid URL"),
    ({"KLING_BASE_URL": "http://h ost"}, "KLING_BASE_URL must not contain spaces"),
])
def test_a_bad_base_url_from_the_environment_is_named_as_such(
        env: dict[str, str], needle: str) -> None:
    with pytest.raises(voiceapi.ValidationError, match=needle):
        make_config(api_key="k", env=env)


@pytest.mark.parametrize(("kwargs", "password"), [
    ({"base_url": "https://me:hunter2@api.example"}, "hunter2"),
    ({"proxy": "http://me:hunter2@"}, "hunter2"),  # no host
    ({"proxy": "socks5://me:hunter2@proxy:1080"}, "hunter2"),  # aiohttp's proxy= is HTTP only
])
def test_url_errors_never_quote_a_password(kwargs: dict[str, str], password: str) -> None:
    with pytest.raises(voiceapi.ValidationError) as info:
        make_config(api_key="k", env={}, **kwargs)  # type: ignore[arg-type]
    assert password not in str(info.value)


def test_a_proxy_with_credentials_and_a_host_is_kept() -> None:
    proxy = "http://me:pw@proxy.local:3128"
    assert make_config(api_key="k", proxy=f" {proxy}\n", env={}).proxy == proxy


@pytest.mark.parametrize("kwargs", [
    {"max_retries": 10**400}, {"timeout": float("nan")}, {"retry_budget": float("inf")},
    {"max_requests_per_second": 0}, {"timeout": True}, {"max_retries": 2.5},
    {"ssl": "yes"},
], ids=str)
def test_numbers_out_of_any_use_are_validation_errors(kwargs: dict[str, object]) -> None:
    with pytest.raises(voiceapi.ValidationError):
        make_config(api_key="k", env={}, **kwargs)  # type: ignore[arg-type]


def test_any_real_number_type_is_accepted() -> None:
    from fractions import Fraction

    config = make_config(api_key="k", timeout=Fraction(3, 2),  # type: ignore[arg-type]
                         max_requests_per_second=2, env={})
    assert config.timeout == 1.5 and config.max_requests_per_second == 2.0


@pytest.mark.parametrize(("kwargs", "env", "needle"), [
    ({"api_key": "key\nrest"}, {}, "api_key"),
    ({}, {"KLING_API_KEY": "key\x00rest"}, "KLING_API_KEY"),
    ({"access_key": "ak", "secret_key": "sk\r\nX: 1"}, {}, "secret_key"),
    ({"access_key": "ak\ud800", "secret_key": "sk"}, {}, "access_key"),
])
def test_a_key_with_control_characters_is_refused_without_quoting_it(
        kwargs: dict[str, str], env: dict[str, str], needle: str) -> None:
    with pytest.raises(voiceapi.ValidationError, match=needle) as info:
        make_config(env=env, **kwargs)  # type: ignore[arg-type]
    assert "rest" not in str(info.value) and "X: 1" not in str(info.value)


def test_credentials_built_directly_check_their_keys_too() -> None:
    with pytest.raises(voiceapi.ValidationError, match="secret_key"):
        JWTCredentials("ak", "s\x00k")
    with pytest.raises(voiceapi.ValidationError, match="api_key must be a string"):
        APIKeyCredentials(5)  # type: ignore[arg-type]


def test_a_token_re_signed_after_a_refusal_is_never_the_refused_one() -> None:
    clock = FakeClock()
    creds = JWTCredentials("ak", SECRET, clock=clock)
    refused = creds.authorization()
    assert creds.invalidate(refused)  # 1004, no Date: nothing to learn about the clock
    fresh = creds.authorization()  # the same second
    assert fresh != refused
    assert _claims(fresh)["nbf"] == int(clock.now) - 5 + 1
    # Other calls that were refused the old token do not re-sign again: one new token for all.
    for _ in range(5):
        assert creds.invalidate(refused)
        assert creds.authorization() == fresh


def test_a_pinned_certificate_fingerprint_is_accepted_as_ssl() -> None:
    """Not in the annotation, but aiohttp takes it and it worked before settings were checked."""
    import hashlib
    from typing import Any

    import aiohttp

    pin: Any = aiohttp.Fingerprint(hashlib.sha256(b"cert").digest())
    assert make_config(api_key="k", ssl=pin, env={}).ssl is pin


def test_keys_read_with_a_trailing_newline_are_stripped_not_refused() -> None:
    config = make_config(api_key=" key-from-file\r\n", env={})
    assert config.credentials.authorization() == "Bearer key-from-file"
    config = make_config(env={"KLING_ACCESS_KEY": "ak\n", "KLING_SECRET_KEY": "\tsk\n"})
    assert isinstance(config.credentials, JWTCredentials)
    assert config.credentials.access_key == "ak"
