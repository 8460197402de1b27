"""Shared fixtures. Tests use their own database and Redis db, never the dev ones.

MINICHAT_TEST_DB / MINICHAT_TEST_REDIS_DB let two suites run side by side on one machine.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql

TEST_DB = os.environ.get("MINICHAT_TEST_DB", "minichat_test")
TEST_REDIS_DB = os.environ.get("MINICHAT_TEST_REDIS_DB", "15")
PG_ADMIN_URL = os.environ.get("MINICHAT_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
DATABASE_URL = psycopg.conninfo.make_conninfo(PG_ADMIN_URL, dbname=TEST_DB)
REDIS_URL = f"redis://127.0.0.1:6379/{TEST_REDIS_DB}"
# RabbitMQ: a vhost of the tests' own, so a dev server's queues on "/" are never touched.
TEST_VHOST = os.environ.get("MINICHAT_TEST_VHOST", "minichat_test")
BROKER_URL = f"amqp://guest:guest@127.0.0.1:5672/{TEST_VHOST}"

os.environ.update(
    {
        "MINICHAT_ENV": "test",
        "DATABASE_URL": DATABASE_URL,
        "REDIS_URL": REDIS_URL,
        "RABBITMQ_URL": BROKER_URL,
        "MINICHAT_JWT_SECRET": "test-secret-" + "x" * 40,
        "MINICHAT_LOG_LEVEL": os.environ.get("MINICHAT_LOG_LEVEL", "WARNING"),
        # Short enough for the stall tests, long enough for mock-slow's 200 ms between words.
        "MINICHAT_PROVIDER_FIRST_TOKEN_TIMEOUT": "3",
        "MINICHAT_PROVIDER_IDLE_TIMEOUT": "2",
        # Tests make many requests quickly; the rate-limit tests lower these for themselves.
        "MINICHAT_RATE_LOGIN_EMAIL": "100000/60",
        "MINICHAT_RATE_LOGIN_IP": "100000/60",
        "MINICHAT_RATE_GENERATIONS": "100000/60",
        "MINICHAT_RATE_API": "100000/60",
    }
)

TABLES = (
    "users, refresh_tokens, chats, generations, messages, usage_events, daily_usage, audit_logs,"
    " outbox, dead_letters, idempotency_keys"
)


@pytest.fixture(scope="session")
def database_url() -> str:
    """A fresh, migrated test database for the whole session."""
    from minichat.migrate import apply_migrations

    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(TEST_DB)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(TEST_DB)))
    apply_migrations(DATABASE_URL)
    return DATABASE_URL


@pytest.fixture(scope="session")
def broker_vhost() -> str:
    """The test vhost, created when missing (rabbitmqctl is slow: only then)."""
    import subprocess

    import pika
    import pika.exceptions

    try:
        pika.BlockingConnection(pika.URLParameters(BROKER_URL)).close()
    except pika.exceptions.AMQPError:
        subprocess.run(["rabbitmqctl", "add_vhost", TEST_VHOST], capture_output=True, timeout=60, check=False)
        subprocess.run(
            ["rabbitmqctl", "set_permissions", "-p", TEST_VHOST, "guest", ".*", ".*", ".*"],
            capture_output=True,
            timeout=60,
            check=True,
        )
    return BROKER_URL


@pytest.fixture
def db(database_url: str) -> Iterator[psycopg.Connection]:
    """An empty database (every table truncated) and a direct connection to inspect it."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(f"TRUNCATE {TABLES} CASCADE")
        yield conn


@pytest.fixture
def redis_client() -> Iterator[object]:
    """The test Redis db, flushed."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield client
    client.close()
