"""The Lua scripts that keep the shared state consistent.

Every script reads the clock with ``TIME`` inside Redis, so leases and the request rate follow
ONE clock (the server's) whatever the workers' clocks say. Every key a script touches is passed
in ``KEYS`` and shares the hash tag ``{voiceapi:<namespace>}``, so the scripts run on Redis
Cluster as well. Scripts are run with redis-py's ``register_script``, which reloads a script
the server forgot (NOSCRIPT after ``SCRIPT FLUSH`` or a restart).
"""

from __future__ import annotations

# Milliseconds of server time; a lapsed lease moves from the slots to the orphans, where it
# still counts against the cap until a live worker has looked its key up at Kling.
_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function sweep(slots, orphans)
  local lapsed = redis.call('ZRANGEBYSCORE', slots, '-inf', now)
  for _, k in ipairs(lapsed) do
    redis.call('ZREM', slots, k)
    redis.call('ZADD', orphans, now, k)
  end
end
local function used(slots, orphans)
  return redis.call('ZCARD', slots) + redis.call('ZCARD', orphans)
end
"""

# The state's epoch: a token set when the first worker starts on an empty namespace. A Redis
# restart without persistence, a FLUSHDB or an eviction takes it with the journal and the
# slots; a worker whose token is no longer there knows the state it trusted is gone.
# KEYS: epoch  ARGV: token ttl_ms  -> the token in force (ours, or the one already there)
JOIN_EPOCH = """
redis.call('SET', KEYS[1], ARGV[1], 'NX')
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return redis.call('GET', KEYS[1])
"""

# KEYS: slots orphans owners journal cap backoff_create epoch
# ARGV: key me lease_ms ceiling initial state_ttl_ms epoch_token fresh_token
# -> {grant, cap, backoff_ms, state_lost(0/1), key_unresolved(0/1)}
# state_lost: the epoch is not the caller's (the journal it relied on is gone): the grant stands,
# but its key may exist at Kling, so the caller must look it up before creating. A missing
# epoch gets a FRESH token, never the caller's: writing the caller's old token back made every
# other worker of the old state find its own token in place and miss the loss.
ACQUIRE = _PRELUDE + """
local key, me, lease = ARGV[1], ARGV[2], tonumber(ARGV[3])
local ceiling, initial = tonumber(ARGV[4]), tonumber(ARGV[5])
local lost = 0
local epoch = redis.call('GET', KEYS[7])
if epoch ~= ARGV[7] then
  lost = 1
  if not epoch then redis.call('SET', KEYS[7], ARGV[8]) end
end
redis.call('PEXPIRE', KEYS[7], ARGV[6])
sweep(KEYS[1], KEYS[2])
local cap = tonumber(redis.call('HGET', KEYS[5], 'value'))
if not cap then
  cap = initial
  redis.call('HSET', KEYS[5], 'value', cap, 'since', 0, 'learned', 0)
end
redis.call('PEXPIRE', KEYS[5], ARGV[6])
local eff = math.min(cap, ceiling)
if redis.call('HEXISTS', KEYS[4], key) == 1 then return {'follow', eff, 0, lost, 0} end
if redis.call('ZSCORE', KEYS[1], key) then
  if redis.call('HGET', KEYS[3], key) == me then
    redis.call('ZADD', KEYS[1], now + lease, key)
    return {'create', eff, 0, lost, 0}
  end
  return {'follow', eff, 0, lost, 0}
end
-- an orphan may or may not exist at Kling: nobody creates it until it is resolved (the
-- last 1: this key waits, not the caller's other keys)
if redis.call('ZSCORE', KEYS[2], key) then return {'wait', eff, 0, lost, 1} end
local until_ms = tonumber(redis.call('GET', KEYS[6]) or '0')
if until_ms > now then return {'wait', eff, until_ms - now, lost, 0} end
if used(KEYS[1], KEYS[2]) >= eff then return {'wait', eff, 0, lost, 0} end
redis.call('ZADD', KEYS[1], now + lease, key)
redis.call('HSET', KEYS[3], key, me)
return {'create', eff, 0, lost, 0}
"""

# KEYS: slots orphans owners journal cap
# ARGV: key me lease_ms journal_value ceiling probe_per_slot state_ttl_ms initial
# -> cap
ACCEPTED = _PRELUDE + """
local key, me, lease = ARGV[1], ARGV[2], tonumber(ARGV[3])
local ceiling, probe = tonumber(ARGV[5]), tonumber(ARGV[6])
redis.call('HSET', KEYS[4], key, ARGV[4])
redis.call('PEXPIRE', KEYS[4], ARGV[7])
if redis.call('HGET', KEYS[3], key) == me then
  -- still ours: a lease that lapsed while the create was on the wire is taken back
  redis.call('ZREM', KEYS[2], key)
  redis.call('ZADD', KEYS[1], now + lease, key)
end
local cap = tonumber(redis.call('HGET', KEYS[5], 'value')) or tonumber(ARGV[8])
local learned = redis.call('HGET', KEYS[5], 'learned') == '1'
local since = redis.call('HINCRBY', KEYS[5], 'since', 1)
if cap < ceiling and used(KEYS[1], KEYS[2]) >= cap
   and ((not learned) or since >= probe * cap) then
  cap = cap + 1
  redis.call('HSET', KEYS[5], 'value', cap, 'since', 0)
end
redis.call('PEXPIRE', KEYS[5], ARGV[7])
return cap
"""

# KEYS: slots orphans owners cap backoff_create
# ARGV: key me delay_ms
# -> {cap, used}
REFUSED = _PRELUDE + """
local key, me = ARGV[1], ARGV[2]
if redis.call('HGET', KEYS[3], key) == me then
  redis.call('ZREM', KEYS[1], key)
  redis.call('ZREM', KEYS[2], key)
  redis.call('HDEL', KEYS[3], key)
end
local n = used(KEYS[1], KEYS[2])
local cap = tonumber(redis.call('HGET', KEYS[4], 'value')) or n
cap = math.max(1, math.min(cap, n))
redis.call('HSET', KEYS[4], 'value', cap, 'learned', 1, 'since', 0)
if n == 0 then
  -- nothing of ours runs at Kling, so no release will wake anyone: back off account-wide
  local until_ms = now + tonumber(ARGV[3])
  if until_ms > tonumber(redis.call('GET', KEYS[5]) or '0') then
    redis.call('SET', KEYS[5], until_ms, 'PX', tonumber(ARGV[3]) + 1000)
  end
end
return {cap, n}
"""

# KEYS: slots orphans owners journal
# ARGV: key me mode('release'|'finish') journal_value('' = none) channel state_ttl_ms
# -> slots freed (0/1)
FREE = """
local key, me, mode = ARGV[1], ARGV[2], ARGV[3]
local freed = 0
if mode == 'finish' or redis.call('HGET', KEYS[3], key) == me then
  freed = redis.call('ZREM', KEYS[1], key) + redis.call('ZREM', KEYS[2], key)
  redis.call('HDEL', KEYS[3], key)
end
if ARGV[4] ~= '' then
  redis.call('HSET', KEYS[4], key, ARGV[4])
  redis.call('PEXPIRE', KEYS[4], ARGV[6])
end
if freed > 0 then redis.call('PUBLISH', ARGV[5], 'free') end
return freed
"""

# KEYS: slots orphans owners epoch
# ARGV: me lease_ms state_ttl_ms key...
# -> keys this worker no longer holds (adopted or finished by another worker)
# The epoch lives as long as a worker does (never reset here: only ACQUIRE may notice a loss).
RENEW = _PRELUDE + """
local me, lease = ARGV[1], tonumber(ARGV[2])
local lost = {}
redis.call('PEXPIRE', KEYS[4], ARGV[3])
for i = 4, #ARGV do
  local k = ARGV[i]
  if redis.call('HGET', KEYS[3], k) == me then
    if redis.call('ZSCORE', KEYS[2], k) then redis.call('ZREM', KEYS[2], k) end
    redis.call('ZADD', KEYS[1], now + lease, k)
  else
    table.insert(lost, k)
  end
end
sweep(KEYS[1], KEYS[2])
return lost
"""

# KEYS: slots orphans
# ARGV: (none) -> {orphan, orphaned_at_ms, ...} and the server time last
ORPHANS = _PRELUDE + """
sweep(KEYS[1], KEYS[2])
local out = redis.call('ZRANGE', KEYS[2], 0, -1, 'WITHSCORES')
table.insert(out, tostring(now))
return out
"""

# KEYS: slots orphans owners journal
# ARGV: key me lease_ms journal_value state_ttl_ms
# -> 1 when adopted (the orphan was still there)
ADOPT = _PRELUDE + """
local key, me = ARGV[1], ARGV[2]
if not redis.call('ZSCORE', KEYS[2], key) then return 0 end
redis.call('ZREM', KEYS[2], key)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), key)
redis.call('HSET', KEYS[3], key, me)
redis.call('HSET', KEYS[4], key, ARGV[4])
redis.call('PEXPIRE', KEYS[4], ARGV[5])
return 1
"""

# A task found running (a rerun re-attaching to it) already holds a slot at Kling: count it.
# KEYS: slots orphans owners journal
# ARGV: key me lease_ms journal_value state_ttl_ms
# -> 1 when this worker now holds it, 0 when another live worker already does
HOLD_RUNNING = _PRELUDE + """
local key, me = ARGV[1], ARGV[2]
redis.call('HSET', KEYS[4], key, ARGV[4])
redis.call('PEXPIRE', KEYS[4], ARGV[5])
local owner = redis.call('HGET', KEYS[3], key)
if redis.call('ZSCORE', KEYS[1], key) and owner and owner ~= me then return 0 end
redis.call('ZREM', KEYS[2], key)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), key)
redis.call('HSET', KEYS[3], key, me)
return 1
"""

# KEYS: orphans owners
# ARGV: key grace_ms channel
# -> 1 when freed: the orphan is unknown at Kling and older than the grace period
FREE_MISSING_ORPHAN = _PRELUDE + """
local at = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]))
if not at or now - at < tonumber(ARGV[2]) then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('PUBLISH', ARGV[3], 'free')
return 1
"""

# The request rate as a schedule (GCRA with no burst): each caller reserves the next free
# instant and sleeps until it, so waiters never stampede. A shared backoff (1302 for every
# request, 1303 for creates) comes first and reserves nothing.
# KEYS: tat backoff_all backoff_create
# ARGV: interval_ms (0 = no rate) create(0/1)
# -> {wait_ms, reserved(0/1)}
RATE = _PRELUDE + """
local until_ms = tonumber(redis.call('GET', KEYS[2]) or '0')
if ARGV[2] == '1' then
  until_ms = math.max(until_ms, tonumber(redis.call('GET', KEYS[3]) or '0'))
end
if until_ms > now then return {until_ms - now, 0} end
local interval = tonumber(ARGV[1])
if interval <= 0 then return {0, 1} end
local tat = math.max(tonumber(redis.call('GET', KEYS[1]) or '0'), now)
redis.call('SET', KEYS[1], tat + interval, 'PX', tat + interval - now + 1000)
return {tat - now, 1}
"""

# KEYS: backoff [slots orphans]
# ARGV: delay_ms -> the backoff's end, server ms (0: not set)
# With slots given (a 1303), the backoff is shared only when no slot is held: while batch tasks
# run, a slot frees when one ends, and the batch already learned from the refusal (refused()).
BACKOFF = _PRELUDE + """
if #KEYS == 3 and used(KEYS[2], KEYS[3]) > 0 then return 0 end
local until_ms = now + tonumber(ARGV[1])
if until_ms > tonumber(redis.call('GET', KEYS[1]) or '0') then
  redis.call('SET', KEYS[1], until_ms, 'PX', tonumber(ARGV[1]) + 1000)
end
return until_ms
"""

# Register the tracked task ids and decide who polls.
# KEYS: tracked obs_at leader
# ARGV: me track_ttl_ms leader_ttl_ms stale_ms id...
# -> {1, every tracked id...} for the poller, {0} for the others
OBSERVE = _PRELUDE + """
local me = ARGV[1]
for i = 5, #ARGV do redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[i]) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local leader = redis.call('GET', KEYS[3])
local seen = tonumber(redis.call('GET', KEYS[2]) or '0')
if leader == me or not leader or now - seen > tonumber(ARGV[4]) then
  -- a new poller gets a full stale period to publish before anyone replaces it in turn
  if leader ~= me then redis.call('SET', KEYS[2], now, 'PX', 86400000) end
  redis.call('SET', KEYS[3], me, 'PX', ARGV[3])
  local out = redis.call('ZRANGE', KEYS[1], 0, -1)
  table.insert(out, 1, 1)
  return out
end
return {0}
"""

# The poller publishes what it saw; observations of ids nobody tracks any more are dropped.
# KEYS: obs obs_at tracked
# ARGV: channel state_ttl_ms id json ...
PUBLISH_OBSERVATIONS = _PRELUDE + """
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
for _, id in ipairs(redis.call('HKEYS', KEYS[1])) do
  if not redis.call('ZSCORE', KEYS[3], id) then redis.call('HDEL', KEYS[1], id) end
end
redis.call('SET', KEYS[2], now, 'PX', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PUBLISH', ARGV[1], 'observed')
return 1
"""

# The poller saw these tasks end: free their slots now, whoever holds them, so a slot turns
# over at the poll rather than when its holder next reads the observations. Only a slot whose
# journal names this very task is freed (never a retry's or another task's under the key).
# KEYS: slots orphans owners journal
# ARGV: channel state_ttl_ms (key task_id journal_value)...
# -> slots freed
FREE_ENDED = """
local freed = 0
for i = 3, #ARGV, 3 do
  local key, tid = ARGV[i], ARGV[i + 1]
  local raw = redis.call('HGET', KEYS[4], key)
  if raw then
    local ok, entry = pcall(cjson.decode, raw)
    if ok and type(entry) == 'table' and entry['task_id'] == tid then
      local n = redis.call('ZREM', KEYS[1], key) + redis.call('ZREM', KEYS[2], key)
      if n > 0 then
        redis.call('HDEL', KEYS[3], key)
        redis.call('HSET', KEYS[4], key, ARGV[i + 2])
        freed = freed + n
      end
    end
  end
end
if freed > 0 then
  redis.call('PEXPIRE', KEYS[4], ARGV[2])
  redis.call('PUBLISH', ARGV[1], 'free')
end
return freed
"""

# KEYS: leader  ARGV: me  -> hand leadership over at once on a clean exit
RESIGN = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
