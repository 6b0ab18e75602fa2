"""voiceapi: the async-first Python SDK for the Kling AI Custom Voice API."""

from typing import TYPE_CHECKING, Any

from ._auth import APIKeyCredentials, JWTCredentials
from ._client import AsyncVoiceClient
from ._coordinator import Coordinator, CoordinatorError, Grant, JournalEntry
from ._errors import (
    AccountError,
    APIConnectionError,
    APIError,
    APITimeoutError,
    AuthenticationError,
    ClientClosedError,
    ConflictError,
    EventLoopError,
    InvalidRequestError,
    PermissionDeniedError,
    PolicyError,
    RateLimitError,
    ServerError,
    TaskFailedError,
    UnexpectedResponseError,
    ValidationError,
    VoiceAPIError,
    WaitTimeoutError,
    WebhookVerificationError,
)
from ._middlewares import Handler, Middleware, Request, Response
from ._models import BalanceDeduction, BatchResult, TaskStatus, Voice, VoiceTask
from ._retry import RetryPolicy
from ._sync import VoiceClient

if TYPE_CHECKING:  # for type checkers and IDEs; at run time these load on first use (below)
    from ._batch_models import (
        BatchItem,
        BatchProgress,
        JournalError,
        NotSubmittedError,
        VoiceGoneError,
    )
    from ._local_coordinator import LocalCoordinator
    from ._webhooks import CallbackReceiver, CallbackServer, parse_callback, verify_signature

# The batch scheduler and the webhook helpers are a third of the package: a service that only
# creates and reads voices should not pay for importing them (`import voiceapi` stays close to
# `import aiohttp`). Each name loads its module the first time it is read.
_LAZY = {
    "BatchItem": "._batch_models", "BatchProgress": "._batch_models",
    "JournalError": "._batch_models", "NotSubmittedError": "._batch_models",
    "VoiceGoneError": "._batch_models", "LocalCoordinator": "._local_coordinator",
    "CallbackReceiver": "._webhooks", "CallbackServer": "._webhooks",
    "parse_callback": "._webhooks", "verify_signature": "._webhooks",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is not None:
        import importlib

        value = getattr(importlib.import_module(module, __name__), name)
        globals()[name] = value  # later reads skip this hook
        return value
    # Looked up on first use: reading package metadata costs more than the rest of the import.
    if name == "__version__":
        from ._config import package_version

        return package_version()
    raise AttributeError(f"module 'voiceapi' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "APIConnectionError",
    "APIError",
    "APIKeyCredentials",
    "APITimeoutError",
    "AccountError",
    "AsyncVoiceClient",
    "AuthenticationError",
    "BalanceDeduction",
    "BatchItem",
    "BatchProgress",
    "BatchResult",
    "CallbackReceiver",
    "CallbackServer",
    "ClientClosedError",
    "ConflictError",
    "Coordinator",
    "CoordinatorError",
    "EventLoopError",
    "Grant",
    "Handler",
    "InvalidRequestError",
    "JWTCredentials",
    "JournalEntry",
    "JournalError",
    "LocalCoordinator",
    "Middleware",
    "NotSubmittedError",
    "PermissionDeniedError",
    "PolicyError",
    "RateLimitError",
    "Request",
    "Response",
    "RetryPolicy",
    "ServerError",
    "TaskFailedError",
    "TaskStatus",
    "UnexpectedResponseError",
    "ValidationError",
    "Voice",
    "VoiceAPIError",
    "VoiceClient",
    "VoiceGoneError",
    "VoiceTask",
    "WaitTimeoutError",
    "WebhookVerificationError",
    "__version__",
    "parse_callback",
    "verify_signature",
]
