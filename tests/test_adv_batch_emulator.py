"""Adversarial inputs to the emulator the batch attacks run on (advbatch). Each test here
failed before its fix."""

from __future__ import annotations

import pytest

from voiceapi.testing import KlingEmulator
from voiceapi.testing import main as run_emulator_main


@pytest.mark.parametrize("port", [65536, 99999, -1, 1.5, True])
def test_a_port_out_of_range_is_a_usage_error_not_a_traceback(
        port: object, capsys: pytest.CaptureFixture[str]) -> None:
    """``python -m voiceapi.testing --port 99999`` died with an OverflowError traceback from
    bind(); ``KlingEmulator(port=99999)`` raised it at start."""
    with pytest.raises(ValueError, match="port"):
        KlingEmulator(port=port)  # type: ignore[arg-type]
    if isinstance(port, int) and not isinstance(port, bool):
        assert run_emulator_main(["--port", str(port)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: port must be") and err.count("\n") == 1


@pytest.mark.parametrize("bad", [{"times": 0}, {"times": -1}, {"times": 1.5},
                                 {"delay": -1.0}, {"delay": float("nan")},
                                 {"delay": float("inf")}, {"retry_after": -1.0}])
def test_a_fault_with_a_bad_count_or_delay_is_refused(bad: dict[str, object]) -> None:
    """``times=0`` still fired once (a test meaning "never" got one fault), and a NaN delay
    was accepted, to fail inside the handler it was meant to slow."""
    with pytest.raises(ValueError):
        KlingEmulator().inject("create", "slow", **bad)  # type: ignore[arg-type]
