"""Local mode as a process: concurrency, clean shutdown, clear errors when a service is down, migrations."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg import sql

from conftest import free_port
from helpers import Api
from minichat.migrate import apply_migrations, migrations_dir


def test_a_slow_request_does_not_stall_the_others(api: Api, database_url: str) -> None:
    user = api.register()
    chat = api.create_chat(user, "locked")
    slow_done = threading.Event()
    slow_status: list[int] = []
    with psycopg.connect(database_url) as blocker:
        # Hold the chat's row lock: the rename below waits on it, like a slow query would.
        blocker.execute("SELECT 1 FROM chats WHERE id = %s FOR UPDATE", (chat["id"],))

        def slow() -> None:
            with httpx.Client(base_url=api.base_url, timeout=30) as client:
                r = client.patch(f"/api/chats/{chat['id']}", headers=user.headers, json={"title": "renamed"})
                slow_status.append(r.status_code)
                slow_done.set()

        thread = threading.Thread(target=slow)
        thread.start()
        time.sleep(0.3)
        started = time.perf_counter()
        for _ in range(20):
            assert api.request("GET", "/api/auth/me", user=user).status_code == 200
        fast_elapsed = time.perf_counter() - started
        assert not slow_done.is_set(), "the slow request should still be waiting on the lock"
        blocker.rollback()
    thread.join(timeout=10)
    assert slow_status == [200]
    assert fast_elapsed < 2.0, fast_elapsed


def _env(**overrides: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(overrides)
    return env


def _start(port: int, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "minichat_local", "--port", str(port)],
        env=_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize(
    ("override", "service", "hint"),
    [
        ({"DATABASE_URL": "postgresql://postgres@127.0.0.1:1/minichat"}, "PostgreSQL", "pg_ctlcluster"),
        ({"REDIS_URL": "redis://127.0.0.1:1/0"}, "Redis", "redis-server"),
        ({"RABBITMQ_URL": "amqp://guest:guest@127.0.0.1:1/%2F"}, "RabbitMQ", "rabbitmq-server"),
    ],
)
def test_a_service_that_is_down_is_named_with_how_to_start_it(
    database_url: str, override: dict[str, str], service: str, hint: str
) -> None:
    proc = _start(free_port(), **override)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert f"{service} cannot be reached" in err
    assert hint in err and "docker compose -f localstack-compose.yml up -d" in err
    assert "Traceback" not in err + out
    others = {"PostgreSQL", "Redis", "RabbitMQ"} - {service}
    assert not any(f"{o} cannot be reached" in err for o in others)


def test_serves_and_shuts_down_cleanly_on_sigterm(database_url: str) -> None:
    port = free_port()
    proc = _start(port)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "local mode did not come up"
            time.sleep(0.1)
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "minichat: stopped" in err and "Traceback" not in err


@pytest.mark.parametrize("reuse_port", [False, True], ids=["plain", "so_reuseport"])
def test_a_port_in_use_is_refused_clearly(database_url: str, reuse_port: bool) -> None:
    """Workers listen with SO_REUSEPORT; that must never let local mode share a port someone else holds
    (another local mode's workers use SO_REUSEPORT too)."""
    holder = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if reuse_port:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        proc = _start(holder.getsockname()[1], MINICHAT_WORKERS="2")
        out, err = proc.communicate(timeout=30)
    finally:
        holder.close()
    assert proc.returncode == 1, err
    assert "cannot listen on 127.0.0.1" in err and "Traceback" not in err + out


def test_a_worker_freezes_what_it_loaded_and_collects_young_objects_less_often() -> None:
    """What local mode's processes do to the garbage collector once their code is loaded (in a process of
    its own: the test run's collector stays as it is)."""
    code = """
import gc, json
from minichat_local.__main__ import _GC_YOUNG, _settle
from minichat_local.server import build_app
app = build_app()
before = gc.get_freeze_count()
_settle()
settled = {"frozen": gc.get_freeze_count() - before, "threshold": gc.get_threshold(), "young": _GC_YOUNG}
gc.set_threshold(100_000, 5, 5)
_settle()  # a larger threshold someone chose is kept
settled["kept"] = gc.get_threshold()
print(json.dumps(settled))
"""
    out = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    settled = json.loads(out.stdout.strip().splitlines()[-1])
    default = (700, 10, 10)  # CPython's
    assert settled["frozen"] > 20_000, settled  # the modules and the apps: tens of thousands of objects
    assert settled["threshold"] == [settled["young"], default[1], default[2]]
    assert settled["young"] > default[0]
    assert settled["kept"] == [100_000, 5, 5]


@pytest.fixture
def scratch_db() -> Any:
    name = "minichat_test_migrations"
    admin = "postgresql://postgres@127.0.0.1:5432/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield f"postgresql://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def test_migrations_apply_once_even_from_two_processes(scratch_db: str) -> None:
    code = (
        "import sys; from minichat.migrate import apply_migrations; print(len(apply_migrations(sys.argv[1])))"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, scratch_db], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    counts = sorted(int(p.communicate(timeout=60)[0]) for p in procs)
    expected = len(list(migrations_dir().glob("[0-9][0-9][0-9][0-9]_*.sql")))
    assert counts == [0, expected]
    assert apply_migrations(scratch_db) == []
    with psycopg.connect(scratch_db) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]
    assert len(versions) == expected == len(set(versions))


def test_a_failing_migration_leaves_nothing_behind(scratch_db: str, tmp_path: Path) -> None:
    (tmp_path / "0001_ok.sql").write_text("CREATE TABLE a (id int);")
    (tmp_path / "0002_broken.sql").write_text("CREATE TABLE b (id int); SELECT no_such_function();")
    with pytest.raises(psycopg.Error):
        apply_migrations(scratch_db, tmp_path)
    with psycopg.connect(scratch_db) as conn:
        tables = {r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_migrations")]
    assert "a" in tables and "b" not in tables
    assert versions == ["0001"]


def test_schema_constraints(db: Any) -> None:
    user = db.execute(
        "INSERT INTO users (email, password_hash) VALUES ('c@x.io', 'h') RETURNING id"
    ).fetchone()[0]
    with pytest.raises(psycopg.errors.UniqueViolation):
        db.execute("INSERT INTO users (email, password_hash) VALUES ('C@X.IO', 'h')")
    chat = db.execute("INSERT INTO chats (user_id, title) VALUES (%s, 't') RETURNING id", (user,)).fetchone()[
        0
    ]
    with pytest.raises(psycopg.errors.CheckViolation):
        db.execute(
            "INSERT INTO messages (chat_id, role, content, segment_id)"
            " VALUES (%s, 'admin', 'x', gen_random_uuid())",
            (chat,),
        )
    with pytest.raises(psycopg.errors.CheckViolation):
        db.execute(
            "INSERT INTO generations (chat_id, user_id, model, status) VALUES (%s, %s, 'm', 'done')",
            (chat, user),
        )
    db.execute("INSERT INTO generations (chat_id, user_id, model) VALUES (%s, %s, 'm')", (chat, user))
    with pytest.raises(psycopg.errors.UniqueViolation):  # one in flight per user
        db.execute("INSERT INTO generations (chat_id, user_id, model) VALUES (%s, %s, 'm')", (chat, user))
    with pytest.raises(psycopg.errors.ForeignKeyViolation):
        db.execute("INSERT INTO chats (user_id, title) VALUES ('00000000-0000-0000-0000-000000000000', 't')")
