"""Outbox, event schemas and the publisher (confirms). One module owns every event's shape."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from psycopg.types.json import Jsonb

from minichat.db import Conn

__all__ = ["AUDIT_QUEUE", "USAGE_QUEUE", "record_audit", "record_usage"]

USAGE_QUEUE = "usage_event"
AUDIT_QUEUE = "audit_event"


def _now_iso() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _enqueue(conn: Conn, queue: str, payload: dict[str, Any]) -> None:
    conn.execute(
        "INSERT INTO outbox (event_id, queue, payload) VALUES (%s, %s, %s)",
        (payload["eventId"], queue, Jsonb(payload)),
    )


def record_audit(conn: Conn, *, user_id: str | None, action: str, metadata: dict[str, Any] | None = None) -> str:
    """Write an audit event to the outbox, in the caller's transaction; returns its eventId."""
    event_id = str(uuid.uuid4())
    _enqueue(
        conn,
        AUDIT_QUEUE,
        {
            "eventId": event_id,
            "userId": str(user_id) if user_id else None,
            "action": action,
            "metadata": metadata or {},
            "occurredAt": _now_iso(),
        },
    )
    return event_id


def record_usage(
    conn: Conn,
    *,
    user_id: str,
    generation_id: str,
    model: str,
    input_tokens: int,
    output_tokens: int,
    estimated: bool,
) -> str:
    """Write a usage event to the outbox, in the transaction that ends the generation."""
    event_id = str(uuid.uuid4())
    _enqueue(
        conn,
        USAGE_QUEUE,
        {
            "eventId": event_id,
            "userId": str(user_id),
            "generationId": str(generation_id),
            "model": model,
            "inputTokens": int(input_tokens),
            "outputTokens": int(output_tokens),
            "estimated": bool(estimated),
            "occurredAt": _now_iso(),
        },
    )
    return event_id
