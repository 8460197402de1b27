"""PostgreSQL connection handling; the SQL lives with the module that owns each table."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from minichat.config import get_settings
from minichat.errors import ServiceUnavailable

__all__ = ["Conn", "close_pool", "get_pool", "transaction"]

Conn = psycopg.Connection[dict[str, Any]]

_pool: ConnectionPool[Conn] | None = None
_pool_lock = threading.Lock()


def get_pool() -> ConnectionPool[Conn]:
    """The process-wide pool: lazy, reused across warm invocations."""
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                settings = get_settings()
                pool: ConnectionPool[Conn] = ConnectionPool(
                    settings.database_url,
                    min_size=settings.db_pool_min,
                    max_size=settings.db_pool_max,
                    kwargs={"row_factory": dict_row, "connect_timeout": 3},
                    # A cheap check on checkout: after a database restart, stale
                    # connections are replaced instead of failing one request each.
                    check=ConnectionPool.check_connection,
                    timeout=5,
                    name="minichat",
                    open=False,
                )
                pool.open(wait=False)
                _pool = pool
    return _pool


def close_pool() -> None:
    """Close the pool (shutdown, tests switching databases)."""
    global _pool
    with _pool_lock:
        if _pool is not None:
            _pool.close()
            _pool = None


@contextmanager
def transaction() -> Iterator[Conn]:
    """One connection in one transaction: committed on success, rolled back on any error.

    A database that cannot be reached becomes ServiceUnavailable (503), never a 500.
    """
    try:
        with get_pool().connection() as conn:
            yield conn
    except (psycopg.OperationalError, PoolTimeout) as exc:
        raise ServiceUnavailable("The database is unavailable; retry shortly.") from exc
