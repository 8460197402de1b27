"""Rate limits and the one-generation-in-flight lock, in Redis (Lua keeps each check-and-change atomic)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis
import redis.asyncio

from minichat import kv
from minichat.errors import ConfigError

__all__ = [
    "LOCK_TTL_MS",
    "STREAM_LEASE_MS",
    "BudgetKeys",
    "CreateCheck",
    "Decision",
    "Rate",
    "admit_create",
    "close_stream_async",
    "hit",
    "inflight_holder",
    "inflight_key",
    "open_stream_async",
    "release_inflight",
    "release_inflight_async",
    "renew_runs_async",
    "renew_stream_async",
]

# Long enough to cover a queued generation until the reaper's 60 s; renewed while streaming.
LOCK_TTL_MS = 90_000

# Delete only if the lock still holds our generation: a late release never frees someone else's.
_RELEASE = kv.Script("""
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
""")


def inflight_key(user_id: str) -> str:
    return f"user:{user_id}:inflight_generation"


def inflight_holder(client: redis.Redis, user_id: str) -> str | None:
    value: Any = client.get(inflight_key(user_id))
    return value.decode() if isinstance(value, bytes) else value


def release_inflight(client: redis.Redis, *, user_id: str, generation_id: str) -> bool:
    """Compare-and-delete; True when the lock was ours and is gone."""
    return bool(client.eval(_RELEASE.text, 1, inflight_key(user_id), generation_id))


async def release_inflight_async(client: kv.AsyncClient, *, user_id: str, generation_id: str) -> bool:
    return bool(await kv.run_script_async(client, _RELEASE, [inflight_key(user_id)], [generation_id]))


# A process's running generations kept in one call: each lock extended if it still holds its generation,
# and each cancel flag read (in case its pub/sub message was lost). Per run i: KEYS[2i-1] the user's lock,
# KEYS[2i] the generation's cancel flag, ARGV[i+1] the generation id; ARGV[1] the TTL. Returns the indexes
# (1-based) of the runs whose flag is set. A call per run cost the event loop redis-py's whole command
# path for every run every few seconds (docs/architecture.md).
_RENEW_RUNS = kv.Script("""
local canceled = {}
for i = 1, #KEYS / 2 do
  if redis.call('GET', KEYS[2 * i - 1]) == ARGV[i + 1] then
    redis.call('PEXPIRE', KEYS[2 * i - 1], ARGV[1])
  end
  if redis.call('EXISTS', KEYS[2 * i]) == 1 then
    canceled[#canceled + 1] = i
  end
end
return canceled
""")
_RUNS_PER_CALL = 500  # Redis runs one script at a time: a few hundred keys keep each call short


async def renew_runs_async(
    client: redis.asyncio.Redis, runs: Sequence[tuple[str, str, str]], *, ttl_ms: int = LOCK_TTL_MS
) -> list[bool]:
    """For runs given as (user id, generation id, cancel flag key): extend each user's lock where it
    still holds the generation; whether each run's cancel flag is set, in order."""
    canceled = [False] * len(runs)
    for start in range(0, len(runs), _RUNS_PER_CALL):
        part = runs[start : start + _RUNS_PER_CALL]
        keys = [k for user_id, _, flag in part for k in (inflight_key(user_id), flag)]
        found = await kv.run_script_async(client, _RENEW_RUNS, keys, [ttl_ms, *(g for _, g, _ in part)])
        for index in found:
            canceled[start + int(index) - 1] = True
    return canceled


# --- rate limits (GCRA) -------------------------------------------------------------------------------

# Generic cell rate algorithm: one number per key, the "theoretical arrival time" (TAT). Time comes from
# the Redis server (TIME), so every API process agrees on it whatever their clocks say; the whole
# read-decide-write is one script, so concurrent requests cannot both take the last slot.
# gcra() returns {allowed 1|0, remaining, retry after ms, reset ms}; `peek` decides without counting.
_GCRA_FUNCTION = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function gcra(key, period, limit, now, peek)
  local interval = period / limit
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then tat = now end
  local new_tat = tat + interval
  local allow_at = new_tat - period
  if allow_at > now then
    return {0, 0, math.ceil(allow_at - now), math.ceil(tat - now)}
  end
  if not peek then
    redis.call('SET', key, tostring(new_tat), 'PX', math.ceil(new_tat - now))
  end
  return {1, math.floor((now - allow_at) / interval), 0, math.ceil(new_tat - now)}
end
"""

# KEYS[2], when given, refuses outright while it exists (a deleted account's marker): checked in the same
# round trip as the limit, so refusing a deleted user's tokens costs the API nothing more per request.
# ARGV[2] = 0: no limit, only that check. ARGV[3] = "peek": decide without counting this request.
_GCRA = kv.Script(
    _GCRA_FUNCTION
    + """
if KEYS[2] and redis.call('EXISTS', KEYS[2]) == 1 then
  return {-1, 0, 0, 0}
end
if ARGV[2] == '0' then
  return {1, 0, 0, 0}
end
return gcra(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), now_ms(), ARGV[3] == 'peek')
"""
)


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


# --- a generation's create: every Redis check it needs, in one round trip --------------------------------

# In the order a create is refused: the deleted-account marker, the per-call limit, the per-user create
# limit, the daily token budget (its counter missing, or due a refresh from the database: call again with
# the database's total as ARGV[6]; the counter then keeps the larger of the two, so usage added here is
# never lost to an older total), then the in-flight lock, SET NX. A limit given as '-' is not counted
# (this request counted it already), '0' is off. ARGV[11], when given, is a lock holder known to have
# ended: its lock is cleared first (compare-and-delete), in the same step as taking ours.
# Returns {status, call remaining, retry ms, reset ms, create remaining, retry ms, reset ms, lock holder,
# its PTTL}; a remaining of -1: not counted.
_ADMIT_CREATE = kv.Script(
    _GCRA_FUNCTION
    + """
local out = {1, -1, 0, 0, -1, 0, 0, '', 0}
if redis.call('EXISTS', KEYS[2]) == 1 then out[1] = -1 return out end
local now = now_ms()
if ARGV[2] ~= '-' and ARGV[2] ~= '0' then
  local d = gcra(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), now, false)
  out[2], out[3], out[4] = d[2], d[3], d[4]
  if d[1] == 0 then out[1] = 2 return out end
end
if ARGV[4] ~= '-' and ARGV[4] ~= '0' then
  local d = gcra(KEYS[3], tonumber(ARGV[3]), tonumber(ARGV[4]), now, false)
  out[5], out[6], out[7] = d[2], d[3], d[4]
  if d[1] == 0 then out[1] = 3 return out end
end
if ARGV[5] ~= '0' then
  local used = redis.call('GET', KEYS[4])
  if not used or redis.call('EXISTS', KEYS[5]) == 0 then
    if ARGV[6] == '' then out[1] = 4 return out end
    if not used or tonumber(ARGV[6]) > tonumber(used) then used = ARGV[6] end
    redis.call('SET', KEYS[4], used, 'PX', ARGV[7])
    redis.call('SET', KEYS[5], '1', 'PX', ARGV[8])
  end
  if tonumber(used) >= tonumber(ARGV[5]) then out[1] = 5 return out end
end
if ARGV[11] ~= '' and redis.call('GET', KEYS[6]) == ARGV[11] then
  redis.call('DEL', KEYS[6])
end
if not redis.call('SET', KEYS[6], ARGV[9], 'NX', 'PX', ARGV[10]) then
  out[1] = 6
  out[8] = redis.call('GET', KEYS[6]) or ''
  out[9] = redis.call('PTTL', KEYS[6])
end
return out
"""
)

ADMITTED, GONE, CALL_LIMITED, CREATE_LIMITED, NEEDS_SEED, BUDGET_USED_UP, LOCK_HELD = 1, -1, 2, 3, 4, 5, 6


@dataclass(frozen=True)
class CreateCheck:
    """What a create's one Redis call found (`status`: one of the constants above)."""

    status: int
    call: Decision | None  # the per-call limit, when counted
    create: Decision | None  # the per-user create limit, when counted
    holder: str | None = None  # LOCK_HELD: the generation holding the lock
    holder_pttl_ms: int = 0


@dataclass(frozen=True)
class BudgetKeys:
    """The daily budget's counter (tokens used today) and its freshness marker, in Redis."""

    counter: str
    fresh: str
    budget: int  # 0: no budget
    counter_ttl_ms: int
    fresh_ttl_ms: int


def _rate_args(rate: Rate | None, count: bool) -> list[str | int]:
    if not count:
        return [0, "-"]
    return [rate.period_s * 1000, rate.limit] if rate else [0, "0"]


def _decision(rate: Rate | None, values: list[Any], allowed: bool) -> Decision | None:
    remaining, retry_ms, reset_ms = (int(v) for v in values)
    if rate is None or remaining < 0:
        return None
    return Decision(
        allowed=allowed,
        limit=rate.limit,
        remaining=remaining,
        retry_after_s=0 if allowed else max(1, math.ceil(retry_ms / 1000)),
        reset_s=math.ceil(reset_ms / 1000),
    )


def admit_create(
    *,
    user_id: str,
    generation_id: str,
    deleted_key: str,
    call_rate: Rate | None,
    count_call: bool,
    create_rate: Rate | None,
    count_create: bool,
    budget: BudgetKeys,
    seed: int | None = None,
    stale_holder: str | None = None,
) -> CreateCheck:
    """The deleted-account check, the rate limits, the daily budget and the in-flight lock of a create, in
    one script (one round trip). Raises redis.RedisError when Redis cannot be reached."""
    keys = [
        f"ratelimit:api:{user_id}",
        deleted_key,
        f"ratelimit:generations:{user_id}",
        budget.counter,
        budget.fresh,
        inflight_key(user_id),
    ]
    args: list[str | int] = [
        *_rate_args(call_rate, count_call),
        *_rate_args(create_rate, count_create),
        budget.budget,
        "" if seed is None else seed,
        budget.counter_ttl_ms,
        budget.fresh_ttl_ms,
        generation_id,
        LOCK_TTL_MS,
        stale_holder or "",
    ]
    out = kv.run_script(_ADMIT_CREATE, keys, args)
    status = int(out[0])
    holder = out[7].decode() if isinstance(out[7], bytes) else str(out[7])
    return CreateCheck(
        status=status,
        call=_decision(call_rate, out[1:4], status != CALL_LIMITED),
        create=_decision(create_rate, out[4:7], status != CREATE_LIMITED),
        holder=holder or None,
        holder_pttl_ms=int(out[8]),
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


async def open_stream_async(
    client: kv.AsyncClient,
    *,
    user_id: str,
    connection_id: str,
    limit: int,
    unless_exists: str,
    lease_ms: int = STREAM_LEASE_MS,
) -> int:
    """Take one of the user's `limit` stream slots: 1 taken, 0 all in use, -1 `unless_exists` exists."""
    keys = [_streams_key(user_id), unless_exists]
    return int(
        await kv.run_script_async(client, _OPEN_STREAM, keys, [connection_id, limit, lease_ms, "open"])
    )


async def renew_stream_async(
    client: kv.AsyncClient, *, user_id: str, connection_id: str, lease_ms: int = STREAM_LEASE_MS
) -> None:
    """Extend an open connection's lease (it re-enters the set if it had lapsed)."""
    await kv.run_script_async(
        client, _OPEN_STREAM, [_streams_key(user_id)], [connection_id, 0, lease_ms, "renew"]
    )


async def close_stream_async(client: kv.AsyncClient, *, user_id: str, connection_id: str) -> None:
    """Give the connection's slot back."""
    await client.zrem(_streams_key(user_id), connection_id)
