"""Preset voices: Kling's official voice library (``owned_by == "kling"``)."""

from __future__ import annotations

import builtins
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from . import _validation as V
from ._constants import DEFAULT_ITER_PAGE_SIZE, DEFAULT_PAGE_SIZE, MAX_PAGES, PATH_PRESET_VOICES
from ._decode import parse_voices
from ._models import Voice

if TYPE_CHECKING:
    from ._transport import Transport


class AsyncPresetVoices:
    """``client.preset_voices``: read-only, paginated like custom voices."""

    def __init__(self, transport: Transport) -> None:
        self._transport = transport

    async def list(
        self, *, page_num: int = 1, page_size: int = DEFAULT_PAGE_SIZE
    ) -> builtins.list[Voice]:
        """One page of preset voices."""
        params = V.page_params(page_num, page_size)
        response = await self._transport.request("GET", PATH_PRESET_VOICES, params=params)
        return parse_voices(response.data, request_id=response.request_id)

    async def iter_all(self, *, page_size: int = DEFAULT_ITER_PAGE_SIZE) -> AsyncIterator[Voice]:
        """Every preset voice, page after page, until a short or empty page."""
        V.page(page_size, "page_size")
        seen: set[str] = set()
        for page_num in range(1, MAX_PAGES + 1):
            response = await self._transport.request(
                "GET", PATH_PRESET_VOICES, params=V.page_params(page_num, page_size))
            data = response.data
            voices = parse_voices(data, request_id=response.request_id)
            for voice in voices:
                if voice.voice_id not in seen:
                    seen.add(voice.voice_id)
                    yield voice
            # A page is short by tasks, not voices (a task may hold several voices).
            if not isinstance(data, builtins.list) or len(data) < page_size:
                return
