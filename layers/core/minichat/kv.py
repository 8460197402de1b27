"""Redis clients: lazy process-wide singletons (sync for the API, asyncio for the stream)."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from typing import Any

import redis
import redis.asyncio
from redis.exceptions import NoScriptError

from minichat.config import get_settings

__all__ = ["Script", "close_redis", "get_redis", "run_script", "run_script_async"]

_client: redis.Redis | None = None
_lock = threading.Lock()


def get_redis() -> redis.Redis:
    """The synchronous client (thread-safe; its pool hands each thread its own connection)."""
    global _client
    if _client is None:
        with _lock:
            if _client is None:
                _client = redis.Redis.from_url(
                    get_settings().redis_url,
                    socket_connect_timeout=1,
                    socket_timeout=2,
                    health_check_interval=30,
                    max_connections=64,
                    driver_info=None,  # no importlib.metadata lookup on every new connection
                )
    return _client


def close_redis() -> None:
    global _client
    with _lock:
        if _client is not None:
            _client.close()
            _client = None


class Script:
    """A Lua script, run by its SHA-1 (EVALSHA) once Redis knows it."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest()


class _Lane(threading.local):
    client: redis.Redis | None = None
    connection: Any = None


_lane = _Lane()


def run_script(script: Script, keys: Sequence[str], args: Sequence[str | int]) -> Any:
    """Run a script on this thread's own connection to the `get_redis()` server.

    For the calls made on every request (rate limits): redis-py's pool, retry and telemetry wrapping
    cost more CPU than the command itself (figures: docs/architecture.md). The
    connection is made by the client's own connection class and settings (TLS, timeouts, health
    checks); a broken one is replaced and the call tried once more; errors are redis-py's.
    """
    client = get_redis()
    lane = _lane
    if lane.client is not client:  # first call on this thread, or the client was replaced
        pool = client.connection_pool
        lane.connection = pool.connection_class(**pool.connection_kwargs)
        lane.client = client
    try:
        return _evalsha(lane.connection, script, keys, args)
    except (redis.ConnectionError, redis.TimeoutError):
        lane.connection.disconnect()  # the next command connects again
        return _evalsha(lane.connection, script, keys, args)


def _evalsha(connection: Any, script: Script, keys: Sequence[str], args: Sequence[str | int]) -> Any:
    try:
        connection.send_command("EVALSHA", script.sha, len(keys), *keys, *args)
        return connection.read_response()
    except NoScriptError:  # a Redis that never saw it, or restarted since
        connection.send_command("EVAL", script.text, len(keys), *keys, *args)
        return connection.read_response()


async def run_script_async(
    client: redis.asyncio.Redis, script: Script, keys: Sequence[str], args: Sequence[Any]
) -> Any:
    """Run a script with an asyncio client, by its SHA-1 once Redis knows it."""
    try:
        return await client.evalsha(script.sha, len(keys), *keys, *args)
    except NoScriptError:
        return await client.eval(script.text, len(keys), *keys, *args)
