"""voiceapi: the async-first Python SDK for the Kling AI Custom Voice API."""

from ._auth import APIKeyCredentials, JWTCredentials
from ._batch import BatchItem, BatchProgress
from ._batch_models import JournalError, NotSubmittedError, VoiceGoneError
from ._client import AsyncVoiceClient
from ._coordinator import Coordinator, Grant, JournalEntry
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
from ._local_coordinator import LocalCoordinator
from ._middlewares import Handler, Middleware, Request, Response
from ._models import BalanceDeduction, BatchResult, TaskStatus, Voice, VoiceTask
from ._retry import RetryPolicy
from ._sync import VoiceClient
from ._webhooks import CallbackReceiver, CallbackServer, parse_callback, verify_signature


def __getattr__(name: str) -> str:
    # Looked up on first use: reading package metadata costs more than the rest of the import.
    if name == "__version__":
        from ._config import package_version

        return package_version()
    raise AttributeError(f"module 'voiceapi' has no attribute {name!r}")


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
