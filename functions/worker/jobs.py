"""Scheduled jobs of the worker function: the outbox sweep, the reaper, and migrations on deploy.

Each is its own Lambda handler in this package (template.yaml points a schedule at it); local mode runs
the same core functions on timers.
"""

from typing import Any

from minichat import events, reaper
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


def migrate_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Apply pending migrations (invoked once per deploy)."""
    url = get_settings().database_url
    ensure_database(url)
    return {"applied": apply_migrations(url)}
