"""Scheduled jobs of the worker function: the outbox sweep, the reaper, the purge, and migrations on deploy.

Each is its own Lambda handler in this package (template.yaml points a schedule at it); local mode runs
the same core functions on timers.
"""

from typing import Any

from minichat import broker, events, purge, reaper
from minichat.config import get_settings
from minichat.log import setup_logging
from minichat.migrate import apply_migrations, ensure_database

setup_logging(get_settings().log_level)


def relay_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Publish what the fast path missed (a broker outage only delays events)."""
    return events.relay_handler(event, context)


def reaper_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Fail generations whose stream never opened or whose streaming process died; free their users."""
    return reaper.reap().as_dict()


def purge_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Delete expired idempotency keys, week-old published outbox rows and dead refresh tokens."""
    return purge.purge_handler(event, context)


def migrate_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Apply pending migrations and declare the queues (invoked once per deploy), so that the MQ event
    source mappings find their queues right after a deploy."""
    url = get_settings().database_url
    ensure_database(url)
    applied = apply_migrations(url)
    with broker.connect(name="minichat-migrate") as connection:
        broker.declare_topology(connection.channel())
    return {"applied": applied, "queues": list(broker.QUEUES)}
