"""PostgreSQL connection handling; the SQL lives with the module that owns each table."""

from __future__ import annotations

import contextlib
import contextvars
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

from minichat.config import get_settings
from minichat.errors import InvalidToken, ServiceUnavailable

__all__ = [
    "Conn",
    "Statement",
    "after_commit",
    "batch",
    "close_pool",
    "get_pool",
    "read",
    "transaction",
]

Conn = psycopg.Connection[dict[str, Any]]
# A statement and its parameters, for the caller's connection to run.
Statement = tuple[str, Mapping[str, Any] | Sequence[Any]]

_pool: ConnectionPool[Conn] | None = None
_IDLE_CHECK_S = 2.0
_last_used: dict[int, float] = {}


def _check_if_idle(conn: Conn) -> None:
    if time.monotonic() - _last_used.get(id(conn), 0.0) > _IDLE_CHECK_S:
        try:
            ConnectionPool.check_connection(conn)
        except Exception:
            # One dead connection means the server restarted or dropped us: the other idle ones are
            # dead too. Replace them all now; left to the pool, each is found in turn with a back-off
            # between them (1 s, 2 s, 4 s...), which ran a full pool past its timeout: a 503.
            if _pool is not None:
                _pool.check()
            raise


# What refers to users(id). A write on behalf of an account deleted meanwhile (its token verified just
# before, or its Redis marker is lost) breaks one of these: that is the token's fault, not the server's.
_USER_REFERENCES = frozenset(
    {
        "chats_user_id_fkey",
        "generations_user_id_fkey",
        "refresh_tokens_user_id_fkey",
        "idempotency_keys_user_id_fkey",
    }
)

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
                    # After a database restart, stale connections are replaced instead of failing
                    # one request each; only connections idle for a while are checked (a round trip).
                    check=_check_if_idle,
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
    with _committing(), get_pool().connection() as conn:
        try:
            yield conn
        finally:
            _last_used[id(conn)] = time.monotonic()


@contextmanager
def _committing() -> Iterator[None]:
    """What wraps a transaction: its after_commit() callbacks, run once it has committed, and its failures
    mapped (a database that cannot be reached: ServiceUnavailable; a row of a deleted user: InvalidToken)."""
    callbacks: list[Callable[[], None]] = []
    token = _on_commit.set(callbacks)
    try:
        yield
    except (psycopg.OperationalError, PoolTimeout) as exc:
        raise ServiceUnavailable("The database is unavailable; retry shortly.") from exc
    except pg_errors.ForeignKeyViolation as exc:
        if exc.diag.constraint_name in _USER_REFERENCES:
            raise InvalidToken("This account no longer exists.") from exc
        raise
    finally:
        _on_commit.reset(token)
    for callback in callbacks:
        callback()


@contextmanager
def read() -> Iterator[Conn]:
    """A connection for reads that need no transaction: each statement commits on its own (autocommit),
    one round trip instead of BEGIN, query, COMMIT. Failures map to ServiceUnavailable as in transaction().
    """
    try:
        with get_pool().connection() as conn:
            conn.autocommit = True
            try:
                yield conn
            finally:
                conn.autocommit = False
                _last_used[id(conn)] = time.monotonic()
    except (psycopg.OperationalError, PoolTimeout) as exc:
        raise ServiceUnavailable("The database is unavailable; retry shortly.") from exc


# Queued when a batch's block raises: it fails the pipeline's implicit transaction, so that the Sync rolls
# back the statements queued before it instead of committing them.
_ABANDON = "SELECT minichat_refuse('batch_abandoned')"


@contextmanager
def batch() -> Iterator[Conn]:
    """One transaction whose statements are sent together: one round trip for all of them.

    The block queues statements (`conn.execute`) on a pipeline; nothing is sent before its end, so results
    are read after it (a fetch inside would cost a round trip of its own). No BEGIN and COMMIT: the
    statements of a pipeline up to its Sync (sent at the block's end) run in one implicit transaction,
    committed at the Sync. At the first statement that fails, PostgreSQL skips the rest and rolls the
    transaction back; the error is raised here. When the block itself raises, a failing statement is
    queued first, so that nothing it queued is committed. after_commit() callbacks and error mapping as in
    transaction().
    """
    with _committing(), get_pool().connection() as conn:
        conn.autocommit = True  # the pipeline's implicit transaction is the transaction
        try:
            with conn.pipeline():
                try:
                    yield conn
                except BaseException:
                    conn.execute(_ABANDON)  # the Sync must not commit what the block queued
                    raise
        except BaseException:
            # After a batch that failed (that path only), an empty transaction rolled back: psycopg takes
            # statements the aborted pipeline skipped for prepared on their fifth use (their Parse never
            # ran), and its rollback makes it forget them all. A broken connection: the pool drops it.
            with contextlib.suppress(psycopg.Error), conn.transaction(force_rollback=True):
                pass
            raise
        finally:
            conn.autocommit = False
            _last_used[id(conn)] = time.monotonic()
