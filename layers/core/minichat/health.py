"""One health check over the three backing services."""

from __future__ import annotations

from typing import Any

from minichat import db, kv
from minichat.config import get_settings
from minichat.errors import ServiceUnavailable
from minichat.log import get_logger

__all__ = ["check_broker", "check_health"]

log = get_logger("minichat.health")


def check_broker(url: str, *, timeout: float = 2.0) -> None:
    """Open and close an AMQP connection; raises on failure."""
    import pika  # only the health route and the relay pay for pika

    params = pika.URLParameters(url)
    params.socket_timeout = timeout
    params.blocked_connection_timeout = timeout
    params.connection_attempts = 1
    params.stack_timeout = timeout
    pika.BlockingConnection(params).close()


def check_health() -> tuple[bool, dict[str, Any]]:
    """(healthy, body) for GET /api/health; each failing check says what failed, never a secret."""
    checks: dict[str, str] = {}
    try:
        with db.transaction() as conn:
            conn.execute("SELECT 1")
        checks["database"] = "ok"
    except ServiceUnavailable:
        checks["database"] = "unavailable"
    try:
        kv.get_redis().ping()
        checks["redis"] = "ok"
    except Exception as exc:  # any client error means "not usable now"
        log.warning("health: redis unavailable", error=type(exc).__name__)
        checks["redis"] = "unavailable"
    try:
        check_broker(get_settings().rabbitmq_url)
        checks["broker"] = "ok"
    except Exception as exc:  # pika raises many unrelated types for "cannot connect"
        log.warning("health: broker unavailable", error=type(exc).__name__)
        checks["broker"] = "unavailable"
    healthy = all(v == "ok" for v in checks.values())
    return healthy, {"status": "ok" if healthy else "degraded", "checks": checks}
