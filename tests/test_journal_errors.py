"""A journal that cannot be written (disk full, I/O error) ends the batch with a JournalError:
a batch that went on would report success with a journal that cannot resume it."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest

import voiceapi
from tests.conftest import FAST_RETRY
from voiceapi._batch_models import JournalError
from voiceapi._local_coordinator import FileJournal
from voiceapi.testing import KlingEmulator


class FullDisk:
    """A file whose writes fail once ``after`` lines were written, like a disk filling up."""

    def __init__(self, fh: Any, after: int) -> None:
        self._fh, self._left = fh, after

    def write(self, text: str) -> int:
        if self._left <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._left -= 1
        return int(self._fh.write(text))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)


@pytest.mark.parametrize("after", [0, 3])
async def test_a_journal_write_failure_ends_the_batch_with_a_journal_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, after: int) -> None:
    opened = FileJournal.__init__

    def failing(self: FileJournal, path: Any) -> None:
        opened(self, path)
        self._fh = FullDisk(self._fh, after)  # type: ignore[assignment]

    monkeypatch.setattr(FileJournal, "__init__", failing)
    journal = tmp_path / "run.journal"
    async with KlingEmulator(concurrency=4, task_seconds=0.05) as emu, \
            voiceapi.AsyncVoiceClient(api_key=emu.api_key, base_url=emu.base_url, timeout=5,
                                      retry_policy=FAST_RETRY) as client:
        items = [{"voice_name": f"v{i}", "voice_url": emu.sample_url()} for i in range(8)]
        with pytest.raises(JournalError, match=r"cannot write journal .*No space left"):
            await client.custom_voices.create_many(items, journal=str(journal),
                                                   poll_interval=0.02)
