"""The ``voiceapi`` command line (``python -m voiceapi`` too): the ``[cli]`` extra.

This module imports nothing beyond the standard library until click and rich are known to be
installed, so that ``pip install voiceapi`` (the SDK alone) still gives a console script that
says in one line how to get the command line instead of a traceback.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Iterable
from typing import Any

from .. import _constants as C


def _missing_extra() -> str | None:
    """The first package of the extra that cannot be imported, or None when all can."""
    for name in ("click", "rich"):
        try:
            importlib.import_module(name)
        except ImportError:
            return name
    return None


def main(argv: Iterable[str] | None = None) -> None:
    """Console-script entry point."""
    warnings.formatwarning = _one_line_warning
    try:
        _main(argv)
    except KeyboardInterrupt:  # before the commands' own handling is in place (imports)
        sys.stderr.write("interrupted\n")
        raise SystemExit(C.CLI_EXIT_INTERRUPTED) from None


def _main(argv: Iterable[str] | None) -> None:
    missing = _missing_extra()
    if missing is not None:
        sys.stderr.write(f"voiceapi: the command line needs the cli extra ({missing} is not "
                         f"installed): {C.CLI_INSTALL_HINT}\n")
        raise SystemExit(C.CLI_EXIT_USAGE)
    from ._app import cli

    cli.main(args=list(argv) if argv is not None else None, prog_name="voiceapi")


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str,
                      lineno: int, line: str | None = None) -> str:
    """``warning: <message>``: a command-line user needs the message, not the SDK's source
    file and line that the default format shows (e.g. for an unknown VOICEAPI_LOG)."""
    return f"warning: {message}\n"


def __getattr__(name: str) -> Any:
    # `from voiceapi._cli import cli` keeps working without importing click at package import.
    if name == "cli":
        from ._app import cli

        return cli
    if name == "read_manifest":
        from ._manifest import read_manifest

        return read_manifest
    raise AttributeError(name)


__all__ = ["main"]
