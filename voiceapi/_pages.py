"""The one page-walker: ``custom_voices.iter_all``, ``preset_voices.iter_all`` and the batch
tracker all read list pages through it.

Page size is the one thing the servers disagree on (1000 in the voice docs, 500 everywhere
else, kling-api.md §11.1). Whatever the SDK asks for by itself stays at or below 500; when the
server still refuses a size (400/1201 about the page size, never a not-found) the walker steps
down 1000 → 500 → 100 and remembers the size that works in a ``PageLimit`` that lives as long as
the client's resource.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any

from . import _constants as C
from ._decode import is_not_found
from ._errors import InvalidRequestError, UnexpectedResponseError

#: Fetches one page: (page_num, page_size) → the raw records of ``data`` (a list).
FetchPage = Callable[[int, int], Awaitable[list[Any]]]

_PAGE_SIZE_MESSAGE = re.compile(r"page[\s_-]?size", re.IGNORECASE)


def is_page_size_refusal(exc: BaseException) -> bool:
    """True when the server refused the page size (a 1200/1201 that names it)."""
    return (isinstance(exc, InvalidRequestError) and exc.code in (1200, 1201)
            and not is_not_found(exc) and bool(_PAGE_SIZE_MESSAGE.search(exc.message or "")))


def smaller_page_size(refused: int) -> int | None:
    """The next step below a refused size (1000 → 500 → 100), or None at the bottom."""
    for step in C.PAGE_SIZE_STEPS:
        if step < refused:
            return step
    return None


class PageLimit:
    """The largest page size this server has not refused (per endpoint, per client)."""

    def __init__(self, limit: int = C.PAGE_MAX) -> None:
        self.limit = limit

    def clamp(self, size: int) -> int:
        return min(size, self.limit)

    def refused(self, size: int) -> int | None:
        """``size`` was refused: lower the limit; the next size to try (None: give up)."""
        lower = smaller_page_size(size)
        if lower is not None:
            self.limit = min(self.limit, lower)
        return lower


def records_of(data: Any, request_id: str | None) -> list[Any]:
    """The ``data`` of a list answer as a list of raw records (``null`` is an empty page)."""
    if data is None:
        return []
    if not isinstance(data, list):
        raise UnexpectedResponseError(
            f"expected an array of tasks, got {type(data).__name__}", request_id=request_id)
    return data


async def fetch_page(fetch: FetchPage, page_num: int, size: int,
                     limit: PageLimit) -> tuple[list[Any], int, int]:
    """One page at the largest size the server accepts (≤ ``size``).

    Returns ``(records, page_num, size)``: after a step down the same records start at
    ``(page_num - 1) * size`` of the new size (rounded down, so nothing is skipped).
    """
    start = (page_num - 1) * size
    size = limit.clamp(size)
    while True:
        page_num = start // size + 1
        try:
            return await fetch(page_num, size), page_num, size
        except InvalidRequestError as exc:
            lower = limit.refused(size) if is_page_size_refusal(exc) else None
            if lower is None:
                raise
            size = lower


async def walk_pages(fetch: FetchPage, *, page_size: int, limit: PageLimit,
                     max_pages: int = C.MAX_PAGES) -> AsyncGenerator[list[Any], None]:
    """Raw pages from the first until a short or empty one (at most ``max_pages``).

    A full page that brings no record not seen before also ends the walk: the server ignores
    ``pageNum`` (or the list stopped moving), and reading on would only repeat it to the bound.
    """
    page_num, size = 1, page_size
    seen: set[Any] = set()
    for _ in range(max_pages):
        records, page_num, size = await fetch_page(fetch, page_num, size, limit)
        keys = {_key(r) for r in records}
        if records and keys <= seen:
            return
        seen |= keys
        yield records
        if len(records) < size:
            return
        page_num += 1


def _key(record: Any) -> Any:
    """What tells records apart: the task id, else the record itself as text."""
    if isinstance(record, dict):
        tid = record.get("task_id")
        if isinstance(tid, (str, int)) and not isinstance(tid, bool):
            return str(tid)
    return repr(record)


__all__ = ["FetchPage", "PageLimit", "fetch_page", "is_page_size_refusal", "records_of",
           "smaller_page_size", "walk_pages"]
