"""Rate limits and the one-generation-in-flight lock, in Redis (Lua keeps each check-and-change atomic)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio
from redis.exceptions import NoScriptError

from minichat import kv
from minichat.errors import ConfigError

__all__ = [
    "LOCK_TTL_MS",
    "STREAM_LEASE_MS",
    "Decision",
    "Rate",
    "acquire_inflight",
    "close_stream_async",
    "hit",
    "inflight_holder",
    "inflight_key",
    "open_stream_async",
    "release_inflight",
    "release_inflight_async",
    "renew_inflight_async",
    "renew_stream_async",
]

# Long enough to cover a queued generation until the reaper's 60 s; renewed while streaming.
LOCK_TTL_MS = 90_000

# Delete only if the lock still holds our generation: a late release never frees someone else's.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# Extend only our own lock, for the same reason.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


def inflight_key(user_id: str) -> str:
    return f"user:{user_id}:inflight_generation"


def acquire_inflight(client: redis.Redis, *, user_id: str, generation_id: str) -> bool:
    """SET NX with a TTL; True when this generation now holds the user's lock."""
    return bool(client.set(inflight_key(user_id), generation_id, nx=True, px=LOCK_TTL_MS))


def inflight_holder(client: redis.Redis, user_id: str) -> str | None:
    value: Any = client.get(inflight_key(user_id))
    return value.decode() if isinstance(value, bytes) else value


def release_inflight(client: redis.Redis, *, user_id: str, generation_id: str) -> bool:
    """Compare-and-delete; True when the lock was ours and is gone."""
    return bool(client.eval(_RELEASE, 1, inflight_key(user_id), generation_id))


async def release_inflight_async(client: redis.asyncio.Redis, *, user_id: str, generation_id: str) -> bool:
    return bool(await client.eval(_RELEASE, 1, inflight_key(user_id), generation_id))


async def renew_inflight_async(
    client: redis.asyncio.Redis, *, user_id: str, generation_id: str, ttl_ms: int = LOCK_TTL_MS
) -> bool:
    return bool(await client.eval(_RENEW, 1, inflight_key(user_id), generation_id, ttl_ms))


# --- rate limits (GCRA) -------------------------------------------------------------------------------

# Generic cell rate algorithm: one number per key, the "theoretical arrival time" (TAT). Time comes from
# the Redis server (TIME), so every API process agrees on it whatever their clocks say; the whole
# read-decide-write is one script, so concurrent requests cannot both take the last slot.
# KEYS[2], when given, refuses outright while it exists (a deleted account's marker): checked in the same
# round trip as the limit, so refusing a deleted user's tokens costs the API nothing more per request.
# ARGV[2] = 0: no limit, only that check. ARGV[3] = "peek": decide without counting this request.
_GCRA = kv.Script("""
if KEYS[2] and redis.call('EXISTS', KEYS[2]) == 1 then
  return {-1, 0, 0, 0}
end
if ARGV[2] == '0' then
  return {1, 0, 0, 0}
end
local period = tonumber(ARGV[1])
local limit = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local interval = period / limit
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - period
if allow_at > now then
  return {0, 0, math.ceil(allow_at - now), math.ceil(tat - now)}
end
if ARGV[3] ~= 'peek' then
  redis.call('SET', KEYS[1], tostring(new_tat), 'PX', math.ceil(new_tat - now))
end
return {1, math.floor((now - allow_at) / interval), 0, math.ceil(new_tat - now)}
""")


@dataclass(frozen=True)
class Rate:
    """`limit` requests per `period_s` seconds, bursts up to `limit`."""

    limit: int
    period_s: int

    @classmethod
    def parse(cls, text: str, *, name: str) -> Rate | None:
        """`"10/60"` → 10 per 60 s; `"off"` or `"0"` → no limit."""
        if text.strip().lower() in ("off", "0", ""):
            return None
        count, sep, period = text.partition("/")
        try:
            rate = cls(int(count), int(period) if sep else 60)
        except ValueError:
            raise ConfigError(f"{name} must look like 10/60 (requests/seconds), got {text!r}") from None
        if rate.limit < 1 or rate.period_s < 1:
            raise ConfigError(f"{name} must be positive, got {text!r}")
        return rate


@dataclass(frozen=True)
class Decision:
    allowed: bool
    limit: int
    remaining: int
    retry_after_s: int
    reset_s: int
    gone: bool = False  # the `unless_exists` key exists: refused whatever the count

    def headers(self) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(self.reset_s),
        }


def hit(
    *, bucket: str, key: str, rate: Rate | None, peek: bool = False, unless_exists: str | None = None
) -> Decision:
    """Count one request against `bucket:key`; the decision says whether it may go ahead.

    `peek`: decide without counting (count later, e.g. only a failed login). `unless_exists`: refuse
    (`gone`) while that key exists. `rate` None: no limit, only that check.
    """
    keys = [f"ratelimit:{bucket}:{key}"] + ([unless_exists] if unless_exists else [])
    period_ms, limit = (rate.period_s * 1000, rate.limit) if rate else (0, 0)
    allowed, remaining, retry_ms, reset_ms = kv.run_script(
        _GCRA, keys, [period_ms, limit, "peek" if peek else "count"]
    )
    return Decision(
        allowed=int(allowed) == 1,
        limit=limit,
        remaining=int(remaining),
        retry_after_s=max(1, math.ceil(int(retry_ms) / 1000)) if int(allowed) != 1 else 0,
        reset_s=math.ceil(int(reset_ms) / 1000),
        gone=int(allowed) == -1,
    )


# --- open stream connections per user --------------------------------------------------------------

# A sorted set per user: member = one open connection, score = when its lease ends (ms, Redis time). A
# connection renews its lease while it is open and removes itself when it closes; one whose process died
# simply stops counting when its lease ends, so a crash never leaves a user locked out.
STREAM_LEASE_MS = 60_000

_OPEN_STREAM = kv.Script("""
if KEYS[2] and redis.call('EXISTS', KEYS[2]) == 1 then
  return -1
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if ARGV[4] == 'open' and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
""")


def _streams_key(user_id: str) -> str:
    return f"user:{user_id}:streams"


async def _run_async(client: redis.asyncio.Redis, script: kv.Script, keys: list[str], args: list[Any]) -> Any:
    try:
        return await client.evalsha(script.sha, len(keys), *keys, *args)
    except NoScriptError:
        return await client.eval(script.text, len(keys), *keys, *args)


async def open_stream_async(
    client: redis.asyncio.Redis,
    *,
    user_id: str,
    connection_id: str,
    limit: int,
    unless_exists: str,
    lease_ms: int = STREAM_LEASE_MS,
) -> int:
    """Take one of the user's `limit` stream slots: 1 taken, 0 all in use, -1 `unless_exists` exists."""
    keys = [_streams_key(user_id), unless_exists]
    return int(await _run_async(client, _OPEN_STREAM, keys, [connection_id, limit, lease_ms, "open"]))


async def renew_stream_async(
    client: redis.asyncio.Redis, *, user_id: str, connection_id: str, lease_ms: int = STREAM_LEASE_MS
) -> None:
    """Extend an open connection's lease (it re-enters the set if it had lapsed)."""
    await _run_async(client, _OPEN_STREAM, [_streams_key(user_id)], [connection_id, 0, lease_ms, "renew"])


async def close_stream_async(client: redis.asyncio.Redis, *, user_id: str, connection_id: str) -> None:
    """Give the connection's slot back."""
    await client.zrem(_streams_key(user_id), connection_id)
