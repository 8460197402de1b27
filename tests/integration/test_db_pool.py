"""The pool after the database dropped every connection (a restart, a failover): the next request works."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pytest

from minichat import db
from minichat.config import get_settings, set_settings


@pytest.fixture
def full_pool(database_url: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A fresh pool holding 8 idle connections, each one counted as idle long enough to be checked."""
    monkeypatch.setenv("MINICHAT_DB_POOL_MIN", "8")
    monkeypatch.setenv("MINICHAT_DB_POOL_MAX", "8")
    db.close_pool()
    set_settings(None)
    pool = db.get_pool()
    pool.wait(timeout=10)
    monkeypatch.setattr(db, "_IDLE_CHECK_S", 0.0)
    yield pool
    db.close_pool()
    set_settings(None)


def _kill_the_pools_connections(pool: Any) -> None:
    """Terminate every backend the pool holds, as a database restart would (other sessions untouched)."""
    conns = [pool.getconn() for _ in range(8)]
    pids = [conn.info.backend_pid for conn in conns]
    for conn in conns:
        pool.putconn(conn)
    with psycopg.connect(get_settings().database_url, autocommit=True) as admin:
        for pid in pids:
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))


def test_a_pool_of_dead_connections_recovers_within_one_request(full_pool: Any) -> None:
    assert full_pool.get_stats()["pool_available"] == 8
    _kill_the_pools_connections(full_pool)
    started = time.monotonic()
    with db.read() as conn:
        assert conn.execute("SELECT 1 AS one").fetchone() == {"one": 1}
    # psycopg_pool backs off 1 s, 2 s, 4 s between failed checks: one dead connection after another
    # ran past the pool's 5 s timeout (a 503) before every idle connection was replaced at once.
    assert time.monotonic() - started < 3.0


def test_concurrent_requests_after_the_drop_all_succeed(full_pool: Any) -> None:
    _kill_the_pools_connections(full_pool)
    errors: list[BaseException] = []

    def one() -> None:
        try:
            with db.read() as conn:
                conn.execute("SELECT 1").fetchone()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
