"""Redis clients: lazy process-wide singletons (sync for the API, asyncio for the stream)."""

from __future__ import annotations

import threading

import redis
import redis.asyncio

from minichat.config import get_settings

__all__ = ["close_redis", "get_redis"]

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
