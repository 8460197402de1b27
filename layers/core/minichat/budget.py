"""The daily token budget (MINICHAT_DAILY_TOKEN_BUDGET): what a user may still spend today (UTC).

The create checks a counter in Redis, `user:{id}:tokens:{day}`, in its one Redis call (limits.admit_create):
- usage is added to it right after the commit that records it (by whoever ends the generation:
  generations.finish, or the stream function's generations.persist_terminal), before the user's lock is
  released: the next create already counts it, so a user can
  overspend by one generation at most (the one that crossed the budget);
- when the counter is missing (first create of the day, Redis restarted or evicted it) or its freshness
  marker has expired (every FRESH_TTL_S), the create seeds it from daily_usage and the counter keeps the
  larger of the two: usage the worker had not recorded yet at one seeding is picked up at the next
  (never an under-count for good), and what was added here is never lost to an older total.
Only adding to a counter that exists keeps a restart from starting one at a single generation's usage.
GET /api/usage reports the larger of daily_usage and the counter.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

import redis

from minichat import db, kv
from minichat.config import get_settings
from minichat.limits import BudgetKeys
from minichat.log import get_logger

__all__ = ["FRESH_TTL_S", "add_usage", "keys", "today", "used_in_database", "used_today"]

log = get_logger("minichat.budget")

FRESH_TTL_S = 300
_COUNTER_TTL_S = 2 * 86400  # outlives its day, whatever the clocks say

_ADD = kv.Script("""
if redis.call('EXISTS', KEYS[1]) == 1 then
  return redis.call('INCRBY', KEYS[1], ARGV[1])
end
return -1
""")


def today() -> date:
    return datetime.now(UTC).date()


def _counter_key(user_id: str, day: date) -> str:
    return f"user:{user_id}:tokens:{day.isoformat()}"


def keys(user_id: str, day: date) -> BudgetKeys:
    """The budget's Redis keys for a user and day, with the configured budget (0: none)."""
    counter = _counter_key(user_id, day)
    return BudgetKeys(
        counter=counter,
        fresh=counter + ":fresh",
        budget=get_settings().daily_token_budget,
        counter_ttl_ms=_COUNTER_TTL_S * 1000,
        fresh_ttl_ms=FRESH_TTL_S * 1000,
    )


def used_in_database(conn: db.Conn, *, user_id: str, day: date) -> int:
    """The user's input + output tokens of `day` as the worker has recorded them (daily_usage)."""
    row = conn.execute(
        "SELECT input_tokens + output_tokens AS used FROM daily_usage WHERE user_id = %s AND day = %s",
        (user_id, day),
    ).fetchone()
    return int(row["used"]) if row else 0


def add_usage(*, user_id: str, tokens: int, at: datetime) -> None:
    """After the commit that recorded a generation's usage: add it to the user's counter of that day.

    Never raises: without Redis the counter is refreshed from the database within FRESH_TTL_S.
    """
    if tokens <= 0 or not get_settings().daily_token_budget:
        return
    try:
        kv.run_script(_ADD, [_counter_key(user_id, at.astimezone(UTC).date())], [int(tokens)])
    except redis.RedisError:
        log.warning("budget counter not updated: redis unavailable", user_id=user_id)


def used_today(*, user_id: str, recorded: int, day: date) -> int:
    """What the user has used on `day`: the larger of `recorded` (daily_usage) and the Redis counter,
    which is ahead of it by the usage the worker has not recorded yet (without Redis: `recorded`)."""
    try:
        counter: Any = kv.get_redis().get(_counter_key(user_id, day))
    except redis.RedisError:
        return recorded
    return max(recorded, int(counter)) if counter is not None else recorded
