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

# The reaper's schedule fires once a minute; each run watches a little more than that (runs overlap
# safely), so a generation queued with no stream is failed when its 60 s are up, not up to a minute
# later. Its Timeout in template.yaml leaves room for the last round.
REAPER_WINDOW_S = 65.0


def relay_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Publish what the fast path missed (a broker outage only delays events)."""
    return events.relay_handler(event, context)


def reaper_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Fail generations whose stream never opened or whose streaming process died; free their users."""
    window = REAPER_WINDOW_S
    if context is not None and hasattr(context, "get_remaining_time_in_millis"):
        window = min(window, context.get_remaining_time_in_millis() / 1000 - 10)
    return reaper.reap_window(window_s=max(window, 0.0)).as_dict()


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
