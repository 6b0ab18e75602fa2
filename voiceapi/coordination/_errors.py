"""The coordinator's one error type."""

from __future__ import annotations

from .._errors import VoiceAPIError


class CoordinationError(VoiceAPIError):
    """Redis could not be reached or answered wrongly, so the shared guarantees (cap, journal,
    one task per external id) cannot be kept. The batch stops rather than guess: carrying on
    alone could create duplicates or exceed the account's cap. Rerun when Redis is back: the
    journal in Redis and the lookups by ``external_task_id`` pick up where it stopped."""
