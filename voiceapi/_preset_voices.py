"""Preset voices: Kling's official voice library (``owned_by == "kling"``)."""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import TYPE_CHECKING, Any

from . import _validation as V
from ._constants import DEFAULT_ITER_PAGE_SIZE, DEFAULT_PAGE_SIZE, PATH_PRESET_VOICES
from ._decode import parse_voices
from ._models import Voice
from ._pages import PageLimit, records_of, walk_pages

if TYPE_CHECKING:
    from ._transport import Transport


class AsyncPresetVoices:
    """``client.preset_voices``: read-only, paginated like custom voices."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport
        self._page_limit = PageLimit()  # the page size this server accepts, learned once

    async def list(
        self, *, page_num: int = 1, page_size: int = DEFAULT_PAGE_SIZE
    ) -> builtins.list[Voice]:
        """One page of preset voices."""
        params = V.page_params(page_num, page_size)
        response = await self._transport.request("GET", PATH_PRESET_VOICES, params=params)
        return parse_voices(response.data, request_id=response.request_id)

    async def _list_raw(self, page_num: int, page_size: int) -> builtins.list[Any]:
        response = await self._transport.request(
            "GET", PATH_PRESET_VOICES, params=V.page_params(page_num, page_size))
        return records_of(response.data, response.request_id)

    async def iter_all(self, *, page_size: int = DEFAULT_ITER_PAGE_SIZE) -> AsyncIterator[Voice]:
        """Every preset voice, page after page, until a short or empty page.

        A page is short by tasks, not voices (a task may hold several voices); a page size the
        server refuses steps down (1000 → 500 → 100), remembered per client.
        """
        V.page(page_size, "page_size")
        seen: set[str] = set()
        # aclosing: closing this iteration closes the page walker on the spot (see
        # AsyncCustomVoices.iter_all).
        async with aclosing(walk_pages(self._list_raw, page_size=page_size,
                                       limit=self._page_limit)) as pages:
            async for records in pages:
                for voice in parse_voices(records):
                    if voice.voice_id not in seen:
                        seen.add(voice.voice_id)
                        yield voice
