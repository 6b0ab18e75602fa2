"""Share one Kling account between processes and hosts (extra ``voiceapi[redis]``).

``import voiceapi`` never needs Redis; importing this package does, and says how to get it.
"""

from __future__ import annotations

try:
    import redis.asyncio  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "voiceapi.coordination needs the redis extra: pip install 'voiceapi[redis]'") from exc

from ._errors import CoordinationError
from ._redis import RedisCoordinator

__all__ = ["CoordinationError", "RedisCoordinator"]
