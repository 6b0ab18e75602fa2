"""The README's runnable examples stay true."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _blocks(section: str) -> list[str]:
    body = README.split(f"## {section}", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def test_emulator_example_runs() -> None:
    namespace: dict[str, Any] = {}
    exec(_blocks("Testing your code with the emulator")[0], namespace)
    asyncio.run(namespace["test_my_uploader"]())


def test_fixture_example_runs(kling_emulator: Any) -> None:
    namespace: dict[str, Any] = {}
    exec("from voiceapi import VoiceClient\n" + _blocks("Testing your code with the emulator")[1],
         namespace)
    namespace["test_sync_code"](kling_emulator)


def test_top_commands_match_ci() -> None:
    commands = re.findall(r"^python3 -m venv .*$", README, flags=re.M)
    assert len(commands) == 2
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert commands[1] in ci.splitlines()


@pytest.mark.parametrize("name", ["AsyncVoiceClient", "VoiceClient", "KlingEmulator",
                                  "create_many", "parse_callback", "CallbackReceiver"])
def test_documented_names_exist(name: str) -> None:
    import voiceapi
    import voiceapi.testing

    assert hasattr(voiceapi, name) or hasattr(voiceapi.testing, name) or \
        hasattr(voiceapi.AsyncVoiceClient(api_key="k").custom_voices, name)
