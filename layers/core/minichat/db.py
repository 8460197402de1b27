"""PostgreSQL connection handling; the SQL lives with the module that owns each table."""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from minichat.config import get_settings
from minichat.errors import ServiceUnavailable

__all__ = ["Conn", "after_commit", "close_pool", "get_pool", "transaction"]

Conn = psycopg.Connection[dict[str, Any]]

_pool: ConnectionPool[Conn] | None = None
_on_commit: contextvars.ContextVar[list[Callable[[], None]] | None] = contextvars.ContextVar(
    "minichat_on_commit", default=None
)
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


def after_commit(callback: Callable[[], None]) -> None:
    """Run `callback` once the current transaction() has committed (never if it rolls back).

    Outside transaction() (a caller managing its own connection) nothing is registered.
    """
    callbacks = _on_commit.get()
    if callbacks is not None and callback not in callbacks:
        callbacks.append(callback)


@contextmanager
def transaction() -> Iterator[Conn]:
    """One connection in one transaction: committed on success, rolled back on any error.

    A database that cannot be reached becomes ServiceUnavailable (503), never a 500.
    """
    callbacks: list[Callable[[], None]] = []
    token = _on_commit.set(callbacks)
    try:
        with get_pool().connection() as conn:
            yield conn
    except (psycopg.OperationalError, PoolTimeout) as exc:
        raise ServiceUnavailable("The database is unavailable; retry shortly.") from exc
    finally:
        _on_commit.reset(token)
    for callback in callbacks:
        callback()
