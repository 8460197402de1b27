"""Before local mode starts: are the services up? If not, say which, and how to fix it."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
import redis

from minichat.config import Settings
from minichat.health import check_broker

__all__ = ["Problem", "check_services"]

_COMPOSE = "docker compose -f localstack-compose.yml up -d postgres redis rabbitmq"


@dataclass(frozen=True)
class Problem:
    service: str
    detail: str
    start_locally: str

    def explain(self) -> str:
        return (
            f"{self.service} cannot be reached: {self.detail}\n"
            f"  start it locally:     {self.start_locally}\n"
            f"  or, where Docker runs: {_COMPOSE}"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def check_services(settings: Settings) -> list[Problem]:
    """Every unreachable service, with a message a person can act on (no tracebacks)."""
    problems: list[Problem] = []
    admin = psycopg.conninfo.make_conninfo(settings.database_url, dbname="postgres")
    try:
        psycopg.connect(admin, connect_timeout=3).close()
    except psycopg.Error as exc:
        problems.append(
            Problem(
                "PostgreSQL",
                _first_line(exc),
                "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
            )
        )
    try:
        client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=2)
        client.ping()
        client.close()
    except redis.RedisError as exc:
        problems.append(
            Problem(
                "Redis",
                _first_line(exc),
                'redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no',
            )
        )
    try:
        check_broker(settings.rabbitmq_url)
    except Exception as exc:  # pika raises many unrelated types for "cannot connect"
        problems.append(
            Problem("RabbitMQ", _first_line(exc) or type(exc).__name__, "rabbitmq-server -detached")
        )
    return problems
