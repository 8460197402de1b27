"""What the worker does with usage and audit events, and the daily totals the API reads.

A batch is Amazon MQ's RabbitMQ event (`eventSource: "aws:rmq"`, messages grouped by `queue::vhost`,
base64 `data`). It is recorded in one transaction, idempotently:
- usage_events: inserted once per eventId and per generationId (ON CONFLICT DO NOTHING ... RETURNING);
- daily_usage: upserted from the rows actually inserted, keyed by the UTC day of occurredAt, so it always
  equals the sum of usage_events per user and day, whatever is redelivered;
- audit_logs: inserted once per eventId;
- dead_letters: every message that cannot be recorded, with the reason, once per message.
Every field is validated before anything is written, so no constraint can abort the batch's transaction;
only an infrastructure error (database down) raises, and the event source then redelivers the batch.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import time
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import date, timedelta
from typing import Any

import psycopg
from psycopg.rows import tuple_row

from minichat import budget, db
from minichat.config import get_settings
from minichat.db import transaction
from minichat.errors import ServiceUnavailable
from minichat.event_schema import (
    AUDIT_QUEUE,
    USAGE_QUEUE,
    AuditEvent,
    InvalidMessage,
    UsageEvent,
    parse_audit,
    parse_usage,
    storable,
)
from minichat.log import bind_request_id, get_logger, request_id

__all__ = [
    "MAX_RANGE_DAYS",
    "AuditEvent",
    "BatchResult",
    "InvalidMessage",
    "MalformedEvent",
    "MqMessage",
    "UsageEvent",
    "daily_totals",
    "decode_mq_event",
    "handle_event",
    "parse_audit",
    "parse_usage",
    "record_batch",
    "report",
]

log = get_logger("minichat.usage")

EVENT_SOURCE = "aws:rmq"
MAX_RANGE_DAYS = 366


class MalformedEvent(ValueError):
    """The invocation is not an Amazon MQ RabbitMQ event at all (a wiring error, not a bad message)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class MqMessage:
    """One message of an Amazon MQ batch, as delivered."""

    queue: str
    vhost: str
    data: str  # the base64 text as received (or a JSON rendering of an entry without one)
    body: bytes | None  # None when `error` says why it could not be decoded
    message_id: str | None = None
    redelivered: bool = False
    error: str | None = None


@dataclass
class BatchResult:
    """What one batch did, counted (logged and returned by the handler)."""

    messages: int = 0
    redelivered: int = 0  # flagged by the broker: a consumer died or a batch was rejected before
    usage_inserted: int = 0
    usage_duplicates: int = 0
    audit_inserted: int = 0
    audit_duplicates: int = 0
    dead_lettered: int = 0
    days_updated: int = 0
    reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The counts as plain JSON-able fields."""
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------
# Decoding the Amazon MQ event (pure).


def decode_mq_event(event: Mapping[str, Any]) -> list[MqMessage]:
    """The messages of an Amazon MQ RabbitMQ event, in order; a message that cannot be decoded keeps why."""
    if not isinstance(event, Mapping) or event.get("eventSource") != EVENT_SOURCE:
        raise MalformedEvent("not an Amazon MQ RabbitMQ event (eventSource must be 'aws:rmq')")
    by_queue = event.get("rmqMessagesByQueue")
    if not isinstance(by_queue, Mapping):
        raise MalformedEvent("rmqMessagesByQueue must be an object")
    messages: list[MqMessage] = []
    for key, entries in by_queue.items():
        if not isinstance(entries, list):
            raise MalformedEvent(f"rmqMessagesByQueue[{key!r}] must be a list")
        queue, _, vhost = str(key).partition("::")
        messages.extend(_decode_entry(queue, vhost, entry) for entry in entries)
    return messages


def _decode_entry(queue: str, vhost: str, entry: Any) -> MqMessage:
    if not isinstance(entry, Mapping):
        return MqMessage(
            queue=queue, vhost=vhost, data=_render(entry), body=None, error="message entry is not an object"
        )
    props = entry.get("basicProperties")
    message_id = props.get("messageId") if isinstance(props, Mapping) else None
    common: dict[str, Any] = {
        "queue": queue,
        "vhost": vhost,
        "message_id": message_id if isinstance(message_id, str) else None,
        "redelivered": entry.get("redelivered") is True,
    }
    data = entry.get("data")
    if not isinstance(data, str):
        return MqMessage(**common, data=_render(entry), body=None, error="data is missing or not a string")
    try:
        body = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):  # ValueError: non-ASCII characters in the text
        return MqMessage(**common, data=data, body=None, error="data is not valid base64")
    return MqMessage(**common, data=data, body=body)


def _render(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


# ---------------------------------------------------------------------------------------------------------
# Recording a batch.

# One statement: insert what is new, then add exactly those rows to their user's UTC day. Rows skipped by
# ON CONFLICT (a redelivery, or a second event for the same generation) never reach daily_usage.
# ORDER BY: concurrent batches take their row locks in the same order, so they queue instead of deadlocking.
_INSERT_USAGE_SQL = """
WITH incoming AS (
    SELECT * FROM unnest(%s::uuid[], %s::uuid[], %s::uuid[], %s::text[], %s::int[], %s::int[],
                         %s::bool[], %s::timestamptz[])
        AS r(id, user_id, generation_id, model, input_tokens, output_tokens, estimated, occurred_at)
), inserted AS (
    INSERT INTO usage_events (id, user_id, generation_id, model, input_tokens, output_tokens, estimated,
                              occurred_at)
    SELECT * FROM incoming ORDER BY id
    ON CONFLICT DO NOTHING
    RETURNING user_id, occurred_at, input_tokens, output_tokens
), days AS (
    INSERT INTO daily_usage AS d (user_id, day, input_tokens, output_tokens)
    SELECT user_id, (occurred_at AT TIME ZONE 'UTC')::date, sum(input_tokens), sum(output_tokens)
    FROM inserted GROUP BY 1, 2 ORDER BY 1, 2
    ON CONFLICT (user_id, day) DO UPDATE
        SET input_tokens = d.input_tokens + EXCLUDED.input_tokens,
            output_tokens = d.output_tokens + EXCLUDED.output_tokens
    RETURNING 1
)
SELECT (SELECT count(*) FROM inserted), (SELECT count(*) FROM days)
"""

_INSERT_AUDIT_SQL = """
INSERT INTO audit_logs (id, user_id, action, metadata_json, created_at)
SELECT id, user_id, action, metadata::jsonb, created_at
FROM unnest(%s::uuid[], %s::uuid[], %s::text[], %s::text[], %s::timestamptz[])
    AS r(id, user_id, action, metadata, created_at)
ORDER BY id
ON CONFLICT (id) DO NOTHING
"""

_INSERT_DEAD_LETTERS_SQL = """
INSERT INTO dead_letters (queue, message_id, body, reason, fingerprint)
SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::bytea[])
ON CONFLICT (fingerprint) DO NOTHING
"""


def record_batch(conn: psycopg.Connection[Any], messages: Iterable[MqMessage]) -> BatchResult:
    """Record decoded messages in one transaction on `conn`; invalid ones become dead letters."""
    result = BatchResult()
    usage: list[tuple[MqMessage, UsageEvent]] = []
    audit: list[AuditEvent] = []
    dead: list[tuple[MqMessage, str]] = []
    for message in messages:
        result.messages += 1
        result.redelivered += message.redelivered
        reason = message.error
        if reason is None and message.body is not None:
            try:
                if message.queue == USAGE_QUEUE:
                    usage.append((message, parse_usage(message.body)))
                elif message.queue == AUDIT_QUEUE:
                    audit.append(parse_audit(message.body))
                else:
                    reason = f"unknown queue {message.queue!r}"
            except InvalidMessage as exc:
                reason = str(exc)
        if reason is not None:
            dead.append((message, reason))
    if result.messages == 0:
        return result

    with conn.transaction():
        cur = conn.cursor(row_factory=tuple_row)
        if usage:
            # No check that the user exists: usage outlives a deleted account (SPEC §7.4), and an event
            # recorded just before the deletion may well arrive after it.
            _insert_usage(cur, [event for _, event in usage], result)
        if audit:
            _insert_audit(cur, audit, result)
        if dead:
            cur.execute(_INSERT_DEAD_LETTERS_SQL, _dead_letter_columns(dead))
            result.dead_lettered = max(cur.rowcount, 0)
    for message, reason in dead:
        log.warning(
            "message dead-lettered", queue=message.queue, message_id=message.message_id, reason=reason
        )
    result.reasons = sorted({reason for _, reason in dead})
    return result


def _first_of_each(events: list[UsageEvent]) -> list[UsageEvent]:
    # Inside one batch the first delivered wins, as it does across batches (the insert is sorted by id).
    seen_events: set[uuid.UUID] = set()
    seen_generations: set[uuid.UUID] = set()
    kept = []
    for event in events:
        if event.event_id in seen_events or event.generation_id in seen_generations:
            continue
        seen_events.add(event.event_id)
        seen_generations.add(event.generation_id)
        kept.append(event)
    return kept


def _insert_usage(
    cur: psycopg.Cursor[tuple[Any, ...]], events: list[UsageEvent], result: BatchResult
) -> None:
    received = len(events)
    events = _first_of_each(events)
    if not events:
        return
    row = cur.execute(
        _INSERT_USAGE_SQL,
        (
            [e.event_id for e in events],
            [e.user_id for e in events],
            [e.generation_id for e in events],
            [e.model for e in events],
            [e.input_tokens for e in events],
            [e.output_tokens for e in events],
            [e.estimated for e in events],
            [e.occurred_at for e in events],
        ),
    ).fetchone()
    inserted, days = row if row is not None else (0, 0)
    result.usage_inserted = int(inserted)
    result.days_updated = int(days)
    result.usage_duplicates = received - result.usage_inserted


def _insert_audit(
    cur: psycopg.Cursor[tuple[Any, ...]], events: list[AuditEvent], result: BatchResult
) -> None:
    cur.execute(
        _INSERT_AUDIT_SQL,
        (
            [e.event_id for e in events],
            [e.user_id for e in events],
            [e.action for e in events],
            [json.dumps(e.metadata, ensure_ascii=False) for e in events],
            [e.occurred_at for e in events],
        ),
    )
    result.audit_inserted = max(cur.rowcount, 0)
    result.audit_duplicates = len(events) - result.audit_inserted


def _dead_letter_columns(dead: list[tuple[MqMessage, str]]) -> tuple[list[Any], ...]:
    queues, ids, bodies, reasons, fingerprints = [], [], [], [], []
    for message, reason in dead:
        queues.append(_printable(message.queue))
        ids.append(_printable(message.message_id) if message.message_id is not None else None)
        bodies.append(_dead_letter_body(message))
        reasons.append(_printable(reason))
        # The same message delivered again hashes the same: stored once (ON CONFLICT DO NOTHING).
        digest = hashlib.sha256()
        for part in (message.queue, message.vhost, message.message_id or "", message.data):
            digest.update(part.encode("utf-8", "surrogatepass"))
            digest.update(b"\x00")
        fingerprints.append(digest.digest())
    return queues, ids, bodies, reasons, fingerprints


def _dead_letter_body(message: MqMessage) -> str:
    """The body as text when PostgreSQL can store it as is, else the base64 as received (lossless)."""
    if message.body is not None:
        try:
            text = message.body.decode("utf-8")
        except UnicodeDecodeError:
            return "base64:" + _printable(message.data)
        if storable(text):
            return text
        return "base64:" + _printable(message.data)
    return _printable(message.data)


def _printable(text: str) -> str:
    if storable(text):
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def handle_event(event: Mapping[str, Any], context: Any = None) -> dict[str, Any]:
    """The worker: record one Amazon MQ batch in one transaction; raises on infrastructure errors."""
    previous = request_id()
    bind_request_id(getattr(context, "aws_request_id", None))
    try:
        return _handle(event)
    finally:
        bind_request_id(previous)  # a long-lived caller (the local consumer) keeps logging after us


def _handle(event: Mapping[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    messages = decode_mq_event(event)
    if not messages:
        return BatchResult().as_dict()
    try:
        with transaction() as conn:
            result = record_batch(conn, messages)
    except ServiceUnavailable:
        # Re-raised: the event source redelivers the whole batch, and redelivery changes nothing.
        log.error("worker batch failed", messages=len(messages), reason="database unavailable")
        raise
    counts = result.as_dict()
    log.info("worker batch", duration_ms=round((time.perf_counter() - started) * 1000, 1), **counts)
    return counts


# ---------------------------------------------------------------------------------------------------------
# Reading: GET /api/usage.


def daily_totals(
    conn: psycopg.Connection[Any], *, user_id: str | uuid.UUID, day_from: date, day_to: date
) -> dict[str, Any]:
    """The user's tokens for every UTC day in [day_from, day_to] (zeros included) and the range's totals.

    Every pair of days is a valid range (the API's schema cannot say otherwise): one longer than
    MAX_RANGE_DAYS is its last MAX_RANGE_DAYS days, and `day_from` after `day_to` is an empty range.
    """
    span = min(max(0, (day_to - day_from).days + 1), MAX_RANGE_DAYS)
    day_from = day_to - timedelta(days=span - 1) if span else day_to
    cur = conn.cursor(row_factory=tuple_row)
    rows = cur.execute(
        "SELECT day, input_tokens, output_tokens FROM daily_usage"
        " WHERE user_id = %s AND day BETWEEN %s AND %s",
        (user_id, day_from, day_to),
    ).fetchall()
    found = {day: (int(tokens_in), int(tokens_out)) for day, tokens_in, tokens_out in rows}
    days = []
    total_in = total_out = 0
    for offset in range(span):
        day = day_from + timedelta(days=offset)
        tokens_in, tokens_out = found.get(day, (0, 0))
        total_in += tokens_in
        total_out += tokens_out
        days.append({"day": day.isoformat(), "inputTokens": tokens_in, "outputTokens": tokens_out})
    return {"days": days, "totals": {"inputTokens": total_in, "outputTokens": total_out}}


def report(*, user_id: str, day_from: date | None, day_to: date | None) -> dict[str, Any]:
    """GET /api/usage: daily totals of [day_from, day_to] (by default the 30 days through today, UTC; no
    earlier than the first day there is), and the daily budget with what is left of it today."""
    today = budget.today()
    day_to = day_to or today
    day_from = day_from or date.fromordinal(max(1, day_to.toordinal() - 29))
    daily = get_settings().daily_token_budget
    with db.read() as conn:
        reply = daily_totals(conn, user_id=user_id, day_from=day_from, day_to=day_to)
        shown = {day["day"]: day for day in reply["days"]}.get(today.isoformat())
        if not daily:
            recorded = 0
        elif shown is not None:  # today is in the range: no second query
            recorded = shown["inputTokens"] + shown["outputTokens"]
        else:
            recorded = budget.used_in_database(conn, user_id=user_id, day=today)
    if not daily:
        reply["budget"] = None
        return reply
    used = budget.used_today(user_id=user_id, recorded=recorded, day=today)
    reply["budget"] = {"dailyTokens": daily, "usedToday": used, "remainingToday": max(0, daily - used)}
    return reply
