"""The Redis store's Lua scripts (gru_serve.stores.redis_store): every read-modify-write of a
session, a lease or the prefix tier is one script, so it is atomic. The key layout they keep is
in redis_store's docstring."""

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# Index a session under its deadline, in the store's index `set` and its owner's (`set`:OWNER),
# which the per-owner quota counts; the owner's index lives as long as its latest deadline, so
# an owner who never returns leaves nothing behind. Needs _NOW.
_INDEX = """
local function index(set, skey, sid, deadline)
  redis.call('ZADD', set, string.format('%d', deadline), sid)
  local owner = redis.call('HGET', skey, 'owner')
  if owner and owner ~= '' then
    local own = set .. ':' .. owner
    redis.call('ZADD', own, string.format('%d', deadline), sid)
    if redis.call('PTTL', own) < deadline - now then redis.call('PEXPIRE', own, deadline - now) end
  end
end
"""

# The local tier: a replica that holds a copy of (version, created) sends them; an unchanged
# session then costs a few bytes instead of its state. `created` tells a session from an earlier
# one with the same id (a Triton sequence id reused after its end), whose versions restart at 0.
_SAME = """
if ARGV[KNOWN] ~= '' then
  local v = redis.call('HMGET', KEYS[1], 'version', 'created')
  if v[1] == ARGV[KNOWN] and v[2] == ARGV[KNOWN + 1] then return {'same'} end
end
"""

# KEYS: session, gone. ARGV: known version, known created (or '', '').
# -> {'ok', field, value, ...} | {'same'} | {'gone', tombstone or ''}
GET = (
    "local KNOWN = 1"
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'gone', redis.call('GET', KEYS[2]) or ''} end
"""
    + _SAME
    + """
return {'ok', unpack(redis.call('HGETALL', KEYS[1]))}
"""
)

# KEYS: session, gone, index. ARGV: ttl_ms, gone_ttl_ms, max_sessions, prefix, id, tombstone,
# owner, max_per_owner (0: none), then field, value, ... -> {'ok'|'full'|'owner full', expired,
# evicted}. The owner's quota first: at it, the owner's own least recently used idle session goes.
CREATE = (
    _NOW
    + _INDEX
    + """
local ttl = tonumber(ARGV[1])
local p = ARGV[4]
local expired = redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local evicted = 0
-- Evict from `set` (oldest deadline first, leased ones skipped) until it holds under max.
local function trim(set, max)
  local n = redis.call('ZCARD', set)
  if n < max then return true end
  for _, sid in ipairs(redis.call('ZRANGE', set, 0, n - max + 31)) do
    if n < max then break end
    local skey = p .. 's:' .. sid
    if redis.call('EXISTS', skey) == 0 then
      redis.call('ZREM', set, sid)
      redis.call('ZREM', KEYS[3], sid)
      n = n - 1
    elseif redis.call('EXISTS', p .. 'lease:' .. sid) == 0 then
      local owner = redis.call('HGET', skey, 'owner') or ''
      redis.call('DEL', skey)
      redis.call('SET', p .. 'gone:' .. sid, 'evicted|' .. owner, 'PX', ARGV[2])
      redis.call('ZREM', KEYS[3], sid)
      if owner ~= '' then redis.call('ZREM', KEYS[3] .. ':' .. owner, sid) end
      n = n - 1
      evicted = evicted + 1
    end
  end
  return n < max
end
local owner, quota = ARGV[7], tonumber(ARGV[8])
if owner ~= '' and quota > 0 then
  local own = KEYS[3] .. ':' .. owner
  redis.call('ZREMRANGEBYSCORE', own, '-inf', now)
  if not trim(own, quota) then return {'owner full', expired, evicted} end
end
if not trim(KEYS[3], tonumber(ARGV[3])) then return {'full', expired, evicted} end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 9))
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('SET', KEYS[2], ARGV[6], 'PX', ARGV[2])
index(KEYS[3], KEYS[1], ARGV[5], now + ttl)
return {'ok', expired, evicted}
"""
)

# KEYS: session, lease, gone, index. ARGV: token, lease_ms, ttl_ms, gone_ttl_ms, id, known
# version, known created. -> {'ok', field, value, ...} | {'same'} | {'gone', tombstone or ''} | {'busy'}
ACQUIRE = (
    _NOW
    + _INDEX
    + "local KNOWN = 6"
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'gone', redis.call('GET', KEYS[3]) or ''} end
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {'busy'} end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[3], ARGV[4])
index(KEYS[4], KEYS[1], ARGV[5], now + tonumber(ARGV[3]))
"""
    + _SAME
    + """
return {'ok', unpack(redis.call('HGETALL', KEYS[1]))}
"""
)

# KEYS: session, lease, gone, index. ARGV: token, expected version, ttl_ms, gone_ttl_ms, id,
# tombstone, then field, value, ... (the new version among them) -> {'ok'} | {'conflict', why}
COMMIT = (
    _NOW
    + _INDEX
    + """
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then return {'conflict', 'its lease ran out and another request holds it'} end
local v = redis.call('HGET', KEYS[1], 'version')
if v ~= ARGV[2] then
  if holder then redis.call('DEL', KEYS[2]) end
  return {'conflict', v and 'another request committed first' or 'it expired or was deleted'}
end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 7))
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('SET', KEYS[3], ARGV[6], 'PX', ARGV[4])
redis.call('DEL', KEYS[2])
index(KEYS[4], KEYS[1], ARGV[5], now + tonumber(ARGV[3]))
return {'ok'}
"""
)

# KEYS: session, lease, index. ARGV: token, ttl_ms, id. The session keeps the expiry of its
# last commit (last_used + TTL), as if the released request had never happened. -> 1 | 0
RELEASE = (
    _NOW
    + _INDEX
    + """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2])
local last = redis.call('HGET', KEYS[1], 'last_used')
if last then
  local left = math.floor(tonumber(last) * 1000) + tonumber(ARGV[2]) - now
  if left < 1 then left = 1 end
  redis.call('PEXPIRE', KEYS[1], string.format('%d', left))
  index(KEYS[3], KEYS[1], ARGV[3], now + left)
end
return 1
"""
)

# KEYS: session, lease, index. ARGV: token, lease_ms, ttl_ms, id. A busy session does not
# expire. -> 1 (renewed) | 0 (the lease is no longer ours)
RENEW = (
    _NOW
    + _INDEX
    + """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[2], ARGV[2])
if redis.call('PEXPIRE', KEYS[1], ARGV[3]) == 1 then
  index(KEYS[3], KEYS[1], ARGV[4], now + tonumber(ARGV[3]))
end
return 1
"""
)

# KEYS: session, lease, gone, index. ARGV: id. -> {'ok'} | {'busy'} | {'gone', tombstone or ''}
DELETE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'gone', redis.call('GET', KEYS[3]) or ''} end
if redis.call('EXISTS', KEYS[2]) == 1 then return {'busy'} end
local owner = redis.call('HGET', KEYS[1], 'owner') or ''
if owner ~= '' then redis.call('ZREM', KEYS[4] .. ':' .. owner, ARGV[1]) end
redis.call('DEL', KEYS[1], KEYS[3])
redis.call('ZREM', KEYS[4], ARGV[1])
return {'ok'}
"""

# KEYS: lru, bytes. ARGV: budget, overhead, key prefix, then key, value, ... in block order. A
# block already held is only marked used; new ones are written while the budget takes them (the
# first blocks: the prefixes most prompts share), then the least recently used go until the tier
# fits. A total left over with an empty index (blocks deleted by hand) starts again at 0.
PREFIX_PUT = (
    _NOW
    + """
local budget, over, p = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local total = tonumber(redis.call('GET', KEYS[2]) or '0')
local room = budget
for i = 4, #ARGV, 2 do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) then
    redis.call('ZADD', KEYS[1], now, ARGV[i])
  else
    local size = #ARGV[i + 1] + over
    if size > room then break end
    room = room - size
    redis.call('SET', p .. ARGV[i], ARGV[i + 1])
    redis.call('ZADD', KEYS[1], now, ARGV[i])
    total = total + size
  end
end
while total > budget do
  local oldest = redis.call('ZPOPMIN', KEYS[1])
  if #oldest == 0 then total = 0 break end
  total = total - redis.call('STRLEN', p .. oldest[1]) - over
  redis.call('DEL', p .. oldest[1])
end
if total < 0 then total = 0 end
redis.call('SET', KEYS[2], total)
return total
"""
)

# KEYS: lru, then the blocks' names. ARGV: their keys. -> the values (nil: not held); those found
# are marked used.
PREFIX_GET = (
    _NOW
    + """
local found = redis.call('MGET', unpack(KEYS, 2))
for i = 1, #ARGV do
  if found[i] then redis.call('ZADD', KEYS[1], 'XX', now, ARGV[i]) end
end
return found
"""
)

# KEYS: index. -> {count, expired since the last look}
COUNT = (
    _NOW
    + """
local expired = redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return {redis.call('ZCARD', KEYS[1]), expired}
"""
)

# One script per operation, registered with redis-py (EVALSHA, reloaded if Redis lost them).
SCRIPTS = {
    "get": GET,
    "create": CREATE,
    "acquire": ACQUIRE,
    "commit": COMMIT,
    "release": RELEASE,
    "renew": RENEW,
    "delete": DELETE,
    "count": COUNT,
    "prefix_put": PREFIX_PUT,
    "prefix_get": PREFIX_GET,
}
