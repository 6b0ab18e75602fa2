"""Opt-in logging from the ``VOICEAPI_LOG`` environment variable, configured once per process.

Libraries should not configure logging; this is the one exception users ask for (a quick
``VOICEAPI_LOG=info python script.py``), so it only ever touches the ``voiceapi`` logger, only
when the variable is set, and only the first time a client is built.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings

from ._constants import ENV_LOG, LOGGER_NAME

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR, "off": None, "": None}

_lock = threading.Lock()
_done = False


def configure_from_env() -> None:
    """Read ``VOICEAPI_LOG`` once; later calls cost one flag check."""
    global _done
    if _done:
        return
    with _lock:
        if _done:
            return
        _done = True
        raw = os.environ.get(ENV_LOG, "")
        value = raw.strip().lower()
        if value not in LEVELS:
            # A typo would otherwise silently log nothing, which is the one thing a user who
            # set the variable did not want.
            warnings.warn(f"{ENV_LOG}={raw!r} is not one of {', '.join(k for k in LEVELS if k)}; "
                          "logging stays off", RuntimeWarning, stacklevel=2)
            return
        level = LEVELS[value]
        if level is None:
            return
        logger = logging.getLogger(LOGGER_NAME)
        if not logger.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(
                logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
            logger.addHandler(handler)
        logger.setLevel(level)


def _reset_for_tests() -> None:
    global _done
    with _lock:
        _done = False
