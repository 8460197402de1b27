"""Amazon MQ (RabbitMQ)-triggered worker: usage_events, daily_usage, audit_logs (see minichat.usage)."""

from typing import Any

from minichat.config import get_settings
from minichat.log import setup_logging
from minichat.usage import handle_event

setup_logging(get_settings().log_level)


def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Record one batch; raising makes the event source redeliver it (and redelivery changes nothing)."""
    return handle_event(event, context)
