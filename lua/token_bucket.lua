-- token_bucket.lua: one token bucket kept in one Redis hash, shared by every enrolld node.
--
-- Run with EVALSHA (load it with SCRIPT LOAD). Redis forgets scripts when it restarts or
-- fails over, and on SCRIPT FLUSH. After a NOSCRIPT error the caller loads the script
-- again and retries.
--
-- KEYS[1]  the bucket key. Put a hash tag in it (e.g. `enrolld:tb:{user:alice}`) so it
--          works on Redis Cluster. The script reads and writes only KEYS[1].
-- ARGV[1]  rate: tokens per second, a finite number > 0 (fractional such as 0.5, or
--          large such as 50000).
-- ARGV[2]  burst: the capacity, an integer from 1 to 2^53.
-- ARGV[3]  now: the caller's clock in unix milliseconds, a finite number.
-- ARGV[4]  requested: tokens wanted, an integer from 1 to 2^53. A node may lease several
--          at once. It can be granted fewer than it asked for.
-- ARGV[5]  ttl: key TTL in milliseconds, an integer >= 1. Every call sets it again with
--          PEXPIRE, so the key expires once the bucket has been idle that long. Choose a
--          ttl of at least burst * 1000 / rate. An expired bucket comes back full, so a
--          shorter ttl gives back tokens early.
--
-- Hash fields: `tokens` (a decimal string that may be fractional, written with %.17g so
-- the double survives the round trip exactly) and `last_fill` (ms, the latest `now` seen).
--
-- Algorithm:
--   * A new bucket, or one whose fields do not parse, starts full: tokens = burst,
--     last_fill = now.
--   * Refill: if now > last_fill, then
--       tokens = min(burst, tokens + (now - last_fill) * rate / 1000) and last_fill = now.
--     If now <= last_fill (the clock went backwards, or two callers' clocks disagree),
--     nothing is refilled and last_fill stays where it is. It never moves backwards.
--     Tokens are always capped at burst, so lowering burst takes effect at once.
--   * Grant: granted = min(requested, floor(tokens)); tokens = tokens - granted.
--     A partial grant is how leasing works.
--   * Returns {granted, floor(tokens left), retry_ms}. retry_ms is 0 if at least one token
--     is left. Otherwise it is the ms until one is, ceil((1 - tokens) * 1000 / rate), and
--     at least 1.
--
-- Precision: the arithmetic is in doubles (Lua numbers), never integer tokens per ms, so
-- high rates lose nothing (redis-cell#80 lost tokens above 1000/s that way). floor() and
-- the retry time allow EPS = 1e-9 of a token. Without it, 0.995 + 0.005 could come out as
-- 0.9999999999999999 and withhold a token that is due. retry_ms is consistent with this:
-- a call made at now + retry_ms finds at least one token, unless someone else took it.
--
-- Errors (nothing is written): wrong number of keys or arguments, a non-number,
-- non-finite, rate <= 0, burst < 1, requested < 1, ttl < 1, or a non-integer burst,
-- requested or ttl. Each returns `ERR token_bucket: <what>`.

local EPS = 1e-9
local MAX_INT = 9007199254740992 -- 2^53: every integer up to here is exact in a double

local function fail(msg)
  return redis.error_reply('ERR token_bucket: ' .. msg)
end

-- A finite number parsed from s, or nil. tonumber() accepts "nan" and "inf" through
-- strtod, so those are rejected here too.
local function finite(s)
  local x = tonumber(s)
  if x == nil or x ~= x or x == math.huge or x == -math.huge then
    return nil
  end
  return x
end

local function integer_in(s, lo, hi)
  local x = finite(s)
  if x == nil or x ~= math.floor(x) or x < lo or x > hi then
    return nil
  end
  return x
end

if #KEYS ~= 1 then
  return fail('expected 1 key, got ' .. #KEYS)
end
if #ARGV ~= 5 then
  return fail('expected 5 arguments (rate, burst, now_ms, requested, ttl_ms), got ' .. #ARGV)
end

local rate = finite(ARGV[1])
if rate == nil or rate <= 0 then
  return fail('rate must be a finite number > 0, got ' .. tostring(ARGV[1]))
end
local burst = integer_in(ARGV[2], 1, MAX_INT)
if burst == nil then
  return fail('burst must be an integer >= 1, got ' .. tostring(ARGV[2]))
end
local now = finite(ARGV[3])
if now == nil then
  return fail('now must be a finite number of unix ms, got ' .. tostring(ARGV[3]))
end
local requested = integer_in(ARGV[4], 1, MAX_INT)
if requested == nil then
  return fail('requested must be an integer >= 1, got ' .. tostring(ARGV[4]))
end
local ttl = integer_in(ARGV[5], 1, MAX_INT)
if ttl == nil then
  return fail('ttl must be an integer number of ms >= 1, got ' .. tostring(ARGV[5]))
end

local key = KEYS[1]
local stored = redis.call('HMGET', key, 'tokens', 'last_fill')
-- HMGET gives false for a missing field. Leave those nil: the bucket is then new.
local tokens, last_fill
if stored[1] then
  tokens = finite(stored[1])
end
if stored[2] then
  last_fill = finite(stored[2])
end

if tokens == nil or last_fill == nil or tokens < 0 then
  tokens = burst
  last_fill = now
elseif now > last_fill then
  tokens = tokens + (now - last_fill) * rate / 1000
  last_fill = now
end
if tokens > burst then
  tokens = burst
end

local available = math.floor(tokens + EPS)
local granted = requested
if available < granted then
  granted = available
end
tokens = tokens - granted
if tokens < 0 then -- only by less than EPS, from the allowance above
  tokens = 0
end

local left = math.floor(tokens + EPS)
local retry_ms = 0
if left < 1 then
  retry_ms = math.ceil((1 - EPS - tokens) * 1000 / rate)
  if retry_ms < 1 then
    retry_ms = 1
  elseif retry_ms > MAX_INT then
    retry_ms = MAX_INT -- a tiny rate: keep the integer reply exact
  end
end

redis.call('HSET', key,
  'tokens', string.format('%.17g', tokens),
  'last_fill', string.format('%.17g', last_fill))
redis.call('PEXPIRE', key, ttl)

return {granted, left, retry_ms}
