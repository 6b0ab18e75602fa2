"""Defaults of the Redis coordinator, on one screen.

They live here rather than in ``voiceapi/_constants.py`` because only this optional package
uses them; the shared batch figures (initial slots, ceiling) still come from there.
"""

from __future__ import annotations

from .._constants import DEFAULT_TIMEOUT

#: How long a slot stays held without renewal. A worker renews every third of it, so a worker
#: that misses two renewals in a row (a long GC pause, a stalled loop) still keeps its slots.
DEFAULT_LEASE_SECONDS = 30.0
#: Shorter leases would renew in a near busy loop (tests use a fraction of a second).
MIN_LEASE_SECONDS = 0.1
#: An orphan (a dead worker's slot) that Kling does not know is freed only after this long: the
#: dead worker's create may still be on the wire. At least the SDK's per-attempt timeout.
DEFAULT_ORPHAN_GRACE_SECONDS = DEFAULT_TIMEOUT
#: Orphans looked up at Kling at once when a dead worker left many.
ORPHAN_LOOKUPS_AT_ONCE = 8
#: A poller (leader) whose last observations are older than this is presumed gone, and the
#: next worker that wants fresh observations takes over.
DEFAULT_STALE_SECONDS = 5.0
#: ...but a worker that observes more often takes over sooner: after this many of its own
#: observe intervals without fresh observations (and never sooner than MIN_STALE_SECONDS).
STALE_INTERVALS = 3.0
MIN_STALE_SECONDS = 0.1
#: The longest ``wait_for_slot`` sleeps without a pub/sub wake-up: polling is the safety net
#: for a lost message (pub/sub is at-most-once).
WAKE_POLL_SECONDS = 1.0
#: A learned shared cap probes one step up after this many accepts per slot since the last
#: 1303 (the in-process scheduler probes sooner; here 1303s cost every worker).
PROBE_ACCEPTS_PER_SLOT = 12
#: How long the shared cap, journal and observations outlive their last use (seconds).
STATE_TTL_SECONDS = 7 * 24 * 3600
#: A tracked task id that no worker re-registers for this many leases is dropped from polling.
TRACKED_TTL_LEASES = 2
#: Jitter added to a 1303 backoff, as a fraction of the backoff.
BACKOFF_JITTER = 0.5
#: redis-py connection attempts (with exponential backoff) before we call Redis unreachable.
CONNECT_RETRIES = 3
SOCKET_TIMEOUT_SECONDS = 5.0
#: The longest one ``before_request`` waits in total for the shared rate and backoff.
MAX_REQUEST_WAIT_SECONDS = 120.0
