"""Every default the SDK uses, on one screen.

Values are documented where they come from ``kling-api.md``; the rest are our choices and say why.
"""

from __future__ import annotations

# --- where and who -------------------------------------------------------------------------
DEFAULT_BASE_URL = "https://api-singapore.klingai.com"
ENV_ACCESS_KEY = "KLING_ACCESS_KEY"
ENV_SECRET_KEY = "KLING_SECRET_KEY"
ENV_API_KEY = "KLING_API_KEY"
ENV_BASE_URL = "KLING_BASE_URL"
ENV_LOG = "VOICEAPI_LOG"
LOGGER_NAME = "voiceapi"

# --- API paths (legacy design standard, kling-api.md §0) -----------------------------------
PATH_CUSTOM_VOICES = "/v1/general/custom-voices"
PATH_PRESET_VOICES = "/v1/general/presets-voices"
PATH_DELETE_VOICES = "/v1/general/delete-voices"

# --- JWT (kling-api.md §2.2) ----------------------------------------------------------------
JWT_TTL_SECONDS = 1800  # the docs' example lifetime
JWT_NBF_SKEW_SECONDS = 5  # the docs' example clock-skew allowance
# Re-sign this long before `exp`, so a token never expires while a slow request is in flight.
JWT_REFRESH_MARGIN_SECONDS = 300

# --- time budgets ---------------------------------------------------------------------------
DEFAULT_TIMEOUT = 60.0  # seconds, per attempt (connect + send + read)
DEFAULT_MAX_RETRIES = 3  # retries after the first attempt
# A whole logical call (all attempts and backoff) never takes longer than this.
DEFAULT_RETRY_BUDGET = 180.0
RETRY_INITIAL_DELAY = 0.5
RETRY_MAX_DELAY = 20.0
# Kling asks for a first delay of at least 1 s after 1303 (kling-api.md §7.1).
RATE_LIMIT_MIN_DELAY = 1.0
# A server may ask for any Retry-After; we never sleep longer than this for one retry.
RETRY_AFTER_MAX = 60.0

# --- waiting for a task -----------------------------------------------------------------------
DEFAULT_WAIT_TIMEOUT = 300.0
DEFAULT_POLL_INTERVAL = 1.0
POLL_BACKOFF_FACTOR = 1.5
POLL_INTERVAL_MAX = 10.0

# --- pagination (kling-api.md §4.3) -------------------------------------------------------------
PAGE_MIN = 1
PAGE_MAX = 1000
DEFAULT_PAGE_SIZE = 30  # the API's own default
DEFAULT_ITER_PAGE_SIZE = 100
# Safety bound for iter_all: 1000 pages of 1000 tasks is far beyond any real account.
MAX_PAGES = 1000
# The voice docs say pageSize ≤ 1000, every other list endpoint 500 (kling-api.md §11.1):
# pages the SDK asks for by itself stay at or below this, and a refused size steps down.
AUTO_PAGE_SIZE_MAX = 500
PAGE_SIZE_STEPS = (1000, 500, 100)

# --- validation (kling-api.md §4.1) -------------------------------------------------------------
VOICE_NAME_MAX_CHARS = 20
MEDIA_EXTENSIONS = (".mp3", ".wav", ".mp4", ".mov")
MAX_ID_CHARS = 128
MAX_URL_CHARS = 2048

# --- creates whose outcome is unknown (one flow for create() and the batch) -------------------
# Lookups by external id after an ambiguous create, each with the transport's own retries;
# only a lookup that answers "not found" allows a resend.
CREATE_LOOKUP_TRIES = 5
CREATE_MAX_RESENDS = 3

# --- batch uploads ----------------------------------------------------------------------------
BATCH_INITIAL_SLOTS = 2  # a learned cap starts small and grows while creates are accepted
BATCH_MAX_SLOTS = 100
# After the first 1303, probe one slot up only after this many accepted creates per slot.
BATCH_PROBE_EVERY = 4
# Poll interval: an eighth of a typical successful task, within [floor, max], unless the user
# sets poll_interval. The floor keeps fast failures from driving a poll storm.
BATCH_POLL_INTERVAL = 1.0
BATCH_POLL_FLOOR = 0.5
BATCH_POLL_FRACTION = 1 / 8
# While polls are due at the expected end of running tasks (their start plus a typical task),
# the interval poll only backs them up, at this many intervals.
BATCH_POLL_SCHEDULED_STRETCH = 2.0
# Polls never come closer than this many times the duration of the previous poll.
BATCH_POLL_SPACING_FACTOR = 4.0
# With callbacks, polling is only the safety net for a lost callback.
BATCH_CALLBACK_POLL_FACTOR = 5.0
# Polls triggered by events (1303, callbacks) are at most this frequent.
BATCH_MIN_POLL_GAP = 0.2
# A callback saying a task ended is checked this much later: callbacks arriving together
# share one poll.
BATCH_CALLBACK_COALESCE = 0.05
BATCH_LIST_PAGE_SIZE = AUTO_PAGE_SIZE_MAX
BATCH_MAX_POLL_PAGES = 20  # one poll reads at most this many list pages
# Tasks not seen on the list pages are looked up one by one, at most this many per poll.
BATCH_MAX_LOOKUPS_PER_POLL = 10
# A tracked task that lookups answer "not found" this many times in a row is dropped.
BATCH_GONE_AFTER = 2
# Creates being sent at once: slots may be thousands, open requests should not be.
BATCH_MAX_CONCURRENT_SUBMITS = 32
# Journal re-attach: lookups at once.
BATCH_REATTACH_CONCURRENCY = 20
# At the batch deadline, in-flight creates are cancelled and looked up within this long.
BATCH_DEADLINE_GRACE = 0.8
# on_progress is called on change, at most this often (plus the first and the last report).
BATCH_PROGRESS_INTERVAL = 0.05
# A task holding a slot that no batch has asked about for this long is an orphan (its batch
# returned with wait=False or timed-out items): the next poll of any batch follows it.
BATCH_ORPHAN_AFTER = 10.0
# An abandoned create (cancelled unanswered) that Kling did not know is asked again after this:
# batches poll far more often, and each look is a request against the account's rate.
BATCH_DOUBT_LOOKUP_GAP = 1.0
# Retries of a failed item under a fresh id (retry_failed=True) per rerun chain.
BATCH_MAX_RETRY_GENERATIONS = 8

# --- callbacks (webhooks) ---------------------------------------------------------------------
DEFAULT_TOLERANCE = 300  # seconds either side, as the Standard Webhooks spec recommends
MAX_CALLBACK_BYTES = 1024 * 1024
# Longest wait for a callback's body: Kling sends a few hundred bytes at once, while a sender
# that trickles (or stalls) would otherwise hold a connection and a handler open for ever.
CALLBACK_READ_TIMEOUT = 30.0
# How long ``CallbackServer.stop()`` lets callbacks being handled finish before cancelling
# them (aiohttp's own default, 60 s, let one stalled sender hold every shutdown for a minute).
CALLBACK_SHUTDOWN_GRACE = 1.0

# An answer larger than this (by Content-Length) is refused unread: a list page of 1000 tasks
# is under 1 MB, so anything near this is a misbehaving proxy, not Kling.
MAX_RESPONSE_BYTES = 64 * 1024 * 1024

USER_AGENT = "voiceapi-python/0.1.0"
# Requests one client sends at once (max_concurrent_requests): enough for any batch, few
# enough that a gather() of thousands of calls does not open thousands of sockets.
DEFAULT_MAX_CONCURRENT_REQUESTS = 100

# --- command line (voiceapi[cli]) --------------------------------------------------------------
CLI_INSTALL_HINT = "pip install 'voiceapi[cli]'"
CLI_REDIS_INSTALL_HINT = "pip install 'voiceapi[redis]'"
# Exit codes: 130 is what shells report for Ctrl-C (128 + SIGINT).
CLI_EXIT_API_ERROR = 1
CLI_EXIT_USAGE = 2
CLI_EXIT_INTERRUPTED = 130
# A table cell longer than this ends in "…": status messages can be paragraphs.
CLI_MESSAGE_MAX_WIDTH = 40
CLI_NAME_MAX_WIDTH = 24
# Table width when stdout is not a terminal (and COLUMNS is unset): wide enough for every id.
CLI_PIPE_WIDTH = 200
CLI_JOURNAL_SUFFIX = ".journal"
# A manifest is read whole; past this it is refused instead of filling the memory (a runaway
# FIFO, /dev/zero, the wrong file). A million rows of ~200 bytes fit with room to spare.
CLI_MANIFEST_MAX_BYTES = 256 << 20
CLI_EMULATOR_PORT = 8787
CLI_EMULATOR_SECRET_KEY = "local-secret-key-0123456789abcdef"
CLI_EMULATOR_API_KEY = "local-api-key"
BEIJING_BASE_URL = "https://api-beijing.klingai.com"
