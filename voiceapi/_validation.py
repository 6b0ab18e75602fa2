"""Client-side validation: bad input is a ValidationError before any request is sent."""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from typing import Any

from . import _constants as C
from ._errors import ValidationError

_CONTROL_CHARS = re.compile("[\x00-\x1f\x7f-\x9f]")
# A lone surrogate (e.g. from a filename decoded with "surrogateescape") cannot be encoded as
# UTF-8: it would fail deep in the transport as a bare UnicodeEncodeError, after validation.
_SURROGATES = re.compile("[\ud800-\udfff]")
_PLAIN_SEGMENT = re.compile(r"[A-Za-z0-9_.~-]+")  # RFC 3986 unreserved: safe as-is
# An int id with more bits than this has more than MAX_ID_CHARS digits (log10(2) < 0.302).
_MAX_ID_BITS = int(C.MAX_ID_CHARS / 0.302) + 1


def _has_control_chars(value: str) -> bool:
    return _CONTROL_CHARS.search(value) is not None


def _check_text(value: str, what: str) -> None:
    """Characters nothing can carry: control characters (they would corrupt logs and
    terminals, and headers refuse them) and lone surrogates (not encodable as UTF-8)."""
    if _has_control_chars(value):
        raise ValidationError(f"{what} must not contain control characters")
    if _SURROGATES.search(value) is not None:
        raise ValidationError(f"{what} must be valid Unicode text (it holds a lone surrogate, "
                              "e.g. from a wrongly decoded file name)")


def voice_name(value: Any) -> str:
    if not isinstance(value, str):
        raise ValidationError(f"voice_name must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValidationError("voice_name must not be empty")
    if len(value) > C.VOICE_NAME_MAX_CHARS:  # code points, so 20 CJK characters are fine
        raise ValidationError(
            f"voice_name is {len(value)} characters; at most {C.VOICE_NAME_MAX_CHARS} allowed")
    _check_text(value, "voice_name")
    return value


def _http_url(value: str, what: str) -> str:
    """The checks that are certain for any URL we send: http(s), a host, a valid port."""
    try:
        parsed = urllib.parse.urlsplit(value)
        parsed.port  # noqa: B018 -- raises for a port that is not a number or out of range
    except ValueError:  # e.g. "http://[::1/x": urllib's own error is not a VoiceAPIError
        raise ValidationError(f"{what} is not a valid URL") from None
    if parsed.scheme.lower() not in ("http", "https") or not parsed.netloc:
        raise ValidationError(f"{what} must be an http(s) URL")
    if not parsed.hostname:
        raise ValidationError(f"{what} must name a host")
    if "[" in parsed.netloc and not _ipv6_literal(parsed.hostname):
        # Python 3.11.4+ refuses these in urlsplit itself; older versions let them through.
        raise ValidationError(f"{what} is not a valid URL")
    return value


def _ipv6_literal(host: str) -> bool:
    """A bracketed host is an IPv6 address (or an IPvFuture ``v…`` literal), never a name."""
    if host.startswith("v"):
        return True
    try:
        ipaddress.IPv6Address(host)
    except ValueError:
        return False
    return True


def voice_url(value: Any) -> str:
    """Only what is certain about a URL: http(s), a host, a sane length, no spaces/controls.

    The documented .mp3/.wav/.mp4/.mov rule is about the media, not the URL: signed and CDN
    URLs often have no extension (kling-api.md §11.1), so the server judges the media.
    """
    if not isinstance(value, str):
        raise ValidationError(f"voice_url must be a string, got {type(value).__name__}")
    if len(value) > C.MAX_URL_CHARS or _has_control_chars(value) or " " in value.strip():
        raise ValidationError("voice_url is not a valid URL (too long, spaces or control "
                              "characters)")
    _check_text(value, "voice_url")
    return _http_url(value.strip(), "voice_url")


def identifier(value: Any, what: str) -> str:
    """An id that goes into a path or body: a non-empty printable string of sane length."""
    # Fast path: Kling's ids are ASCII digit strings, which pass every check below.
    if type(value) is str and value.isdigit() and value.isascii() \
            and len(value) <= C.MAX_ID_CHARS:
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        # Checked before str(): an int of more than 4300 digits cannot even be printed
        # (sys.get_int_max_str_digits) and would raise a bare ValueError.
        if value.bit_length() > _MAX_ID_BITS:
            raise ValidationError(f"{what} is longer than {C.MAX_ID_CHARS} characters")
        value = str(value)
    if not isinstance(value, str):
        raise ValidationError(f"{what} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValidationError(f"{what} must not be empty")
    if len(value) > C.MAX_ID_CHARS:
        raise ValidationError(f"{what} is longer than {C.MAX_ID_CHARS} characters")
    _check_text(value, what)
    return value


def optional_identifier(value: Any, what: str) -> str | None:
    # The official example sends "" for absent fields; we send nothing instead.
    if value is None or (isinstance(value, str) and value == ""):
        return None
    return identifier(value, what)


def video_id(value: Any) -> str | None:
    vid = optional_identifier(value, "video_id")
    # isdigit() alone accepts "١٢٣" or "²": Kling's ids are ASCII digits.
    if vid is not None and not (vid.isascii() and vid.isdigit()):
        raise ValidationError("video_id must be a Kling video id (digits only)")
    return vid


def callback_url(value: Any) -> str | None:
    if value is None or (isinstance(value, str) and value == ""):
        return None
    if not isinstance(value, str):
        raise ValidationError(f"callback_url must be a string, got {type(value).__name__}")
    # The same certain checks as voice_url: Kling cannot call back a URL with a space in it.
    if _has_control_chars(value) or len(value) > C.MAX_URL_CHARS or any(
            ch.isspace() for ch in value):
        raise ValidationError("callback_url must be an http(s) URL (no spaces or control "
                              f"characters, at most {C.MAX_URL_CHARS} characters)")
    _check_text(value, "callback_url")
    return _http_url(value, "callback_url")


def page(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"{what} must be an integer, got {type(value).__name__}")
    if not C.PAGE_MIN <= value <= C.PAGE_MAX:
        raise ValidationError(f"{what} must be between {C.PAGE_MIN} and {C.PAGE_MAX}, got {value}")
    return value


def page_params(page_num: Any, page_size: Any) -> dict[str, str]:
    """The list endpoints' query (camelCase on the wire)."""
    return {"pageNum": str(page(page_num, "page_num")),
            "pageSize": str(page(page_size, "page_size"))}


def path_segment(value: str) -> str:
    """Percent-encode an id for use as one path segment: ``../x`` never changes the path."""
    if value.isdigit() and value.isascii():
        return value  # the common case (Kling's digit ids): nothing to encode, nothing to check
    # "." and ".." would be normalised away by URL handling (and %2E is decoded back to ".").
    if _PLAIN_SEGMENT.fullmatch(value) and value not in (".", ".."):
        return value  # unreserved characters only: nothing to encode
    if value.strip() in (".", ".."):
        raise ValidationError(f"{value!r} is not a valid id")
    if _SURROGATES.search(value) is not None:  # quote() would raise UnicodeEncodeError
        raise ValidationError("an id must be valid Unicode text (it holds a lone surrogate)")
    return urllib.parse.quote(value, safe="")
