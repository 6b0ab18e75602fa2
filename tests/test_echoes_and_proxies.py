"""What a server or proxy sends back about our own request: an echoed API key is masked
(finding R1), and a proxy refusing its tunnel is "not sent", retried only when it may help
(finding R5)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator

import pytest

import voiceapi
from tests._raw_server import fixed, raw_server
from tests.conftest import FAST_RETRY

API_KEY = "sk-live-0123456789abcdef"
URL = "https://cdn.example.com/sample.mp3"


@contextlib.asynccontextmanager
async def raw(answer: bytes) -> AsyncIterator[tuple[str, list[str]]]:
    """A loopback server giving every request the same raw answer; yields its URL and the
    request lines it saw."""
    async with raw_server(fixed(answer)) as (base, seen):
        yield base, seen.lines


def http(status: int, body: bytes) -> bytes:
    return (f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


@pytest.mark.parametrize("message", [
    f"invalid key: {API_KEY}",  # no "Bearer" in front: no pattern can see it
    "x" * 990 + API_KEY,  # split by the 1000-character cut
    f"header was 'Authorization: Bearer {API_KEY}'",
])
async def test_an_api_key_the_server_echoes_is_masked(message: str) -> None:
    body = json.dumps({"code": 1000, "message": message, "request_id": f"rid-{API_KEY}"})
    async with raw(http(401, body.encode())) as (base, _), voiceapi.AsyncVoiceClient(
            api_key=API_KEY, base_url=base, retry_policy=FAST_RETRY) as client:
        with pytest.raises(voiceapi.AuthenticationError) as info:
            await client.custom_voices.get("1")
    err = info.value
    for text in (str(err), repr(err), err.message, str(err.request_id)):
        assert API_KEY not in text and API_KEY[:12] not in text
    assert "***" in err.message and err.request_id == "rid-***"


async def test_a_short_key_is_not_masked_inside_ordinary_words() -> None:
    body = json.dumps({"code": 1000, "message": "bad key"})
    async with raw(http(401, body.encode())) as (base, _), voiceapi.AsyncVoiceClient(
            api_key="key", base_url=base, retry_policy=FAST_RETRY) as client:
        with pytest.raises(voiceapi.AuthenticationError, match="bad key"):
            await client.custom_voices.get("1")


PROXY_407 = (b"HTTP/1.1 407 Proxy Authentication Required\r\n"
             b"Proxy-Authenticate: Basic realm=\"p\"\r\nContent-Length: 0\r\n\r\n")
PROXY_503 = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"


async def test_a_proxy_demanding_credentials_is_not_retried_and_not_looked_up() -> None:
    async with raw(PROXY_407) as (proxy, lines), voiceapi.AsyncVoiceClient(
            api_key=API_KEY, base_url="https://kling.test", proxy=proxy, max_retries=3,
            retry_policy=FAST_RETRY) as client:
        with pytest.raises(voiceapi.APIConnectionError, match="proxy refused") as info:
            await client.custom_voices.create(voice_name="n", voice_url=URL)
    assert info.value.maybe_sent is False and info.value.http_status == 407
    assert lines == ["CONNECT kling.test:443 HTTP/1.1"]  # one try, no lookup


async def test_a_proxy_that_cannot_reach_kling_is_retried_without_lookups() -> None:
    async with raw(PROXY_503) as (proxy, lines), voiceapi.AsyncVoiceClient(
            api_key=API_KEY, base_url="https://kling.test", proxy=proxy, max_retries=2,
            retry_policy=FAST_RETRY) as client:
        with pytest.raises(voiceapi.APIConnectionError) as info:
            await client.custom_voices.create(voice_name="n", voice_url=URL)
    assert info.value.maybe_sent is False and info.value.http_status == 503
    # Three tunnels for the one create: nothing reached Kling, so it is resent, never looked up.
    assert lines == ["CONNECT kling.test:443 HTTP/1.1"] * 3


def test_the_credential_kept_for_masking_never_shows_itself() -> None:
    from voiceapi._errors import SentCredential

    sent = SentCredential(f"Bearer {API_KEY}")
    assert API_KEY not in repr(sent) and API_KEY not in str(sent)
    assert sent.mask(f"a {API_KEY} b") == "a *** b"
