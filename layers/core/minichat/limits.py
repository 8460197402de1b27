"""The one-generation-in-flight lock in Redis (Lua keeps each check-and-change atomic)."""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio

__all__ = [
    "LOCK_TTL_MS",
    "acquire_inflight",
    "inflight_holder",
    "inflight_key",
    "release_inflight",
    "release_inflight_async",
    "renew_inflight_async",
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
