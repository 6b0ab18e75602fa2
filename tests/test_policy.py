"""Pure policy tables: error classes per code, retry classification, Retry-After, backoff."""

from __future__ import annotations

import email.utils

import pytest

import voiceapi
from voiceapi._decode import error_class_for, parse_retry_after
from voiceapi._retry import RetryPolicy, backoff_delay, classify, next_delay

CODE_TABLE = [
    *[(c, 401, voiceapi.AuthenticationError) for c in range(1000, 1005)],
    *[(c, 429, voiceapi.AccountError) for c in (1100, 1101, 1102)],
    (1103, 403, voiceapi.PermissionDeniedError),
    *[(c, 400, voiceapi.InvalidRequestError) for c in (1200, 1201)],
    *[(c, 404, voiceapi.InvalidRequestError) for c in (1202, 1203)],
    *[(c, 400, voiceapi.PolicyError) for c in (1300, 1301)],
    (1304, 429, voiceapi.PolicyError),
    *[(c, 429, voiceapi.RateLimitError) for c in (1302, 1303)],
    (5000, 500, voiceapi.ServerError), (5001, 503, voiceapi.ServerError),
    (5002, 504, voiceapi.ServerError),
]


@pytest.mark.parametrize(("code", "status", "cls"), CODE_TABLE)
def test_every_documented_code_maps_to_its_class(code: int, status: int, cls: type) -> None:
    assert error_class_for(code, status) is cls
    # The business code wins over a surprising HTTP status.
    assert error_class_for(code, 200) is cls


@pytest.mark.parametrize(("status", "cls"), [
    (401, voiceapi.AuthenticationError), (403, voiceapi.PermissionDeniedError),
    (429, voiceapi.RateLimitError), (502, voiceapi.ServerError), (500, voiceapi.ServerError),
    (404, voiceapi.InvalidRequestError), (418, voiceapi.InvalidRequestError),
])
def test_unknown_codes_fall_back_to_http_status(status: int, cls: type) -> None:
    assert error_class_for(9999, status) is cls
    assert error_class_for(None, status) is cls


def _api(cls: type[voiceapi.APIError], code: int | None, status: int) -> voiceapi.APIError:
    return cls("x", code=code, http_status=status)


RETRY_TABLE = [
    # (error, retry?, ambiguous?, reauth?)
    (_api(voiceapi.RateLimitError, 1302, 429), True, False, False),
    (_api(voiceapi.RateLimitError, 1303, 429), True, False, False),
    (_api(voiceapi.ServerError, 5000, 500), True, True, False),
    (_api(voiceapi.ServerError, 5001, 503), True, True, False),
    (_api(voiceapi.ServerError, 5002, 504), True, True, False),
    (_api(voiceapi.ServerError, None, 502), True, True, False),
    (_api(voiceapi.ServerError, None, 503), True, True, False),
    (_api(voiceapi.ServerError, None, 504), True, True, False),
    (_api(voiceapi.ServerError, None, 500), False, False, False),
    (_api(voiceapi.AuthenticationError, 1004, 401), True, False, True),
    (_api(voiceapi.AuthenticationError, 1003, 401), True, False, True),
    (_api(voiceapi.AuthenticationError, 1002, 401), False, False, False),
    (_api(voiceapi.AccountError, 1102, 429), False, False, False),
    (_api(voiceapi.InvalidRequestError, 1201, 400), False, False, False),
    (_api(voiceapi.PolicyError, 1301, 400), False, False, False),
    (_api(voiceapi.PermissionDeniedError, 1103, 403), False, False, False),
    (voiceapi.APITimeoutError("t"), True, True, False),
    (voiceapi.APIConnectionError("reset"), True, True, False),
    (voiceapi.APIConnectionError("refused", maybe_sent=False), True, False, False),
    (voiceapi.UnexpectedResponseError("garbage", http_status=200), True, True, False),
    (voiceapi.ValidationError("bad"), False, False, False),
]


@pytest.mark.parametrize(("exc", "retry", "ambiguous", "reauth"), RETRY_TABLE)
def test_retry_classification(exc: Exception, retry: bool, ambiguous: bool, reauth: bool) -> None:
    d = classify(exc)
    assert (d.retry, d.ambiguous, d.reauth) == (retry, ambiguous, reauth)


def test_1303_waits_at_least_the_documented_second() -> None:
    exc = _api(voiceapi.RateLimitError, 1303, 429)
    assert next_delay(exc, 1, RetryPolicy(), rng=lambda a, b: a) == 1.0
    assert next_delay(exc, 1, RetryPolicy(), rng=lambda a, b: b) == 1.0  # 0.5 ceiling < floor


NOW = 1_800_000_000.0


@pytest.mark.parametrize(("headers", "expected"), [
    ({"Retry-After": "3"}, 3.0),
    ({"Retry-After": "2.5"}, 2.5),
    ({"retry-after-ms": "1500"}, 1.5),
    ({"retry-after-ms": "junk", "Retry-After": "4"}, 4.0),
    ({"Retry-After": email.utils.formatdate(NOW + 7, usegmt=True)}, 7.0),
    ({"Retry-After": email.utils.formatdate(NOW - 7, usegmt=True)}, 0.0),
    ({"Retry-After": "-5"}, 0.0),
    ({"Retry-After": "100000"}, 60.0),
    ({"Retry-After": "nan"}, None),
    ({"Retry-After": "inf"}, None),
    ({"Retry-After": "soon"}, None),
    ({"Retry-After": ""}, None),
    ({}, None),
])
def test_parse_retry_after(headers: dict[str, str], expected: float | None) -> None:
    got = parse_retry_after(headers, now=NOW, maximum=60.0)
    assert got == (pytest.approx(expected, abs=1.0) if expected else expected)


def test_backoff_is_full_jitter_with_a_cap() -> None:
    policy = RetryPolicy(initial_delay=0.5, max_delay=4.0)
    ceilings = [backoff_delay(n, policy, rng=lambda a, b: b) for n in range(1, 8)]
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0]
    assert all(backoff_delay(n, policy, rng=lambda a, b: a) == 0.0 for n in range(1, 8))


def test_server_retry_after_is_honoured_over_backoff() -> None:
    exc = voiceapi.RateLimitError("slow down", code=1302, http_status=429, retry_after=7.0)
    assert next_delay(exc, 1, RetryPolicy(), rng=lambda a, b: b) == 7.0


def test_error_text_carries_code_message_and_request_id() -> None:
    exc = voiceapi.InvalidRequestError("Task not found", code=1201, http_status=400,
                                       request_id="abc-123")
    text = str(exc)
    assert "Task not found" in text and "1201" in text and "abc-123" in text
    assert isinstance(voiceapi.ValidationError("x"), ValueError)
    assert isinstance(voiceapi.WaitTimeoutError("1", 1.0, None), TimeoutError)
    assert issubclass(voiceapi.APITimeoutError, voiceapi.APIConnectionError)
