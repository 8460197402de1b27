"""Outbox and the publisher (confirms). The events' shapes are minichat.event_schema's.

Events are rows in `outbox`, written in the transaction of the change they describe (record_audit,
record; a generation's end writes its own in its terminal statement, outbox_insert). The relay publishes
pending rows to RabbitMQ with publisher confirms (a batch's messages sent together, their confirms awaited
together: broker.Publisher) and marks them published only after the broker confirmed them, so a broker
outage delays events and never loses one:
- the fast path right after a commit: local mode wakes its relay thread; on Lambda `publish_soon()` hands
  the publish to the process's publisher thread and waits for it briefly (FAST_PATH_WAIT_S at most), so a
  broker that is down, or silent, never costs a request more than that; after a failure the process backs
  off (one back-off per process) and leaves the rows to the sweep;
- `sweep()`: the periodic catch-up (local mode: `run_relay` on a timer; AWS: `relay_handler` on a schedule).
Delivery is at-least-once (a crash between the confirm and the commit republishes); the worker
deduplicates on eventId.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from psycopg.types.json import Jsonb

from minichat.db import Conn, Statement, after_commit, transaction
from minichat.errors import ServiceUnavailable
from minichat.event_schema import AUDIT_QUEUE, USAGE_QUEUE, AuditEvent, UsageEvent
from minichat.log import get_logger

if TYPE_CHECKING:
    import pika

    from minichat.broker import Publisher

__all__ = [
    "AUDIT_QUEUE",
    "USAGE_QUEUE",
    "OutboxRelay",
    "Outboxed",
    "audit_event",
    "close_relay",
    "get_relay",
    "outbox_insert",
    "outbox_rows",
    "publish_pending",
    "purge_published",
    "record",
    "record_audit",
    "relay_handler",
    "run_relay",
    "sweep",
    "usage_event",
]

_commit_listener: Callable[[], None] | None = None


def set_commit_listener(listener: Callable[[], None] | None) -> None:
    """What runs after a commit that wrote outbox rows (local mode: wake its relay thread)."""
    global _commit_listener
    _commit_listener = listener


def _outbox_committed() -> None:
    # The fast path. On Lambda nothing runs after the reply, so publish now (the schedule sweeps what
    # this misses); elsewhere a listener (local mode's relay thread) or the periodic sweep does it.
    if _commit_listener is not None:
        _commit_listener()
        return
    from minichat.config import get_settings

    if get_settings().environment == "aws":
        get_relay().publish_soon()


_INSERT_OUTBOX = "INSERT INTO outbox (event_id, queue, payload) VALUES (%s, %s, %s)"

Outboxed = tuple[str, dict[str, Any]]  # an event for the outbox: its queue and payload


def audit_event(*, user_id: str | None, action: str, metadata: dict[str, Any] | None = None) -> Outboxed:
    """An audit event, validated, for the outbox."""
    event = AuditEvent(
        event_id=uuid.uuid4(),
        user_id=uuid.UUID(str(user_id)) if user_id else None,
        action=action,
        metadata=metadata or {},
        occurred_at=datetime.now(UTC),
    )
    return AUDIT_QUEUE, event.payload()


def usage_event(
    *,
    user_id: str,
    generation_id: str,
    model: str,
    input_tokens: int,
    output_tokens: int,
    estimated: bool,
) -> Outboxed:
    """A usage event, validated, for the outbox (in the transaction that ends the generation)."""
    event = UsageEvent(
        event_id=uuid.uuid4(),
        user_id=uuid.UUID(str(user_id)),
        generation_id=uuid.UUID(str(generation_id)),
        model=model,
        input_tokens=int(input_tokens),
        output_tokens=int(output_tokens),
        estimated=bool(estimated),
        occurred_at=datetime.now(UTC),
    )
    return USAGE_QUEUE, event.payload()


def outbox_insert(rows: str, *, when: str = "true") -> str:
    """SQL: the outbox insert of the events in `rows` (an SQL expression: a jsonb array of
    {"queue", "payload"}, as outbox_rows() makes it), if `when`; for a data-modifying CTE of a
    statement that does more, so that the events cost no statement of their own."""
    return f"""INSERT INTO outbox (event_id, queue, payload)
        SELECT (e->'payload'->>'eventId')::uuid, e->>'queue', e->'payload'
        FROM jsonb_array_elements({rows}) AS e WHERE {when}"""


def outbox_rows(*events: Outboxed) -> Jsonb:
    """The parameter of outbox_insert() for these events, in the caller's transaction (the relay is
    woken once it has committed)."""
    after_commit(_outbox_committed)
    return Jsonb([{"queue": queue, "payload": payload} for queue, payload in events])


def _outboxed(queue: str, payload: dict[str, Any]) -> Statement:
    after_commit(_outbox_committed)
    return _INSERT_OUTBOX, (payload["eventId"], queue, Jsonb(payload))


def record(conn: Conn, event: Outboxed) -> str:
    """Write an event (audit_event, usage_event) to the outbox, in the caller's transaction; its eventId."""
    sql, params = _outboxed(*event)
    conn.execute(sql, params)
    return str(params[0])


def record_audit(
    conn: Conn, *, user_id: str | None, action: str, metadata: dict[str, Any] | None = None
) -> str:
    """Write an audit event to the outbox, in the caller's transaction; returns its eventId."""
    return record(conn, audit_event(user_id=user_id, action=action, metadata=metadata))


# ---------------------------------------------------------------------------------------------------------
# The relay: outbox → RabbitMQ.

log = get_logger("minichat.events")

# Claimed in id order; SKIP LOCKED makes a second relay take the next rows instead of waiting for, and
# then re-sending, the rows the first one is publishing. The lock is held until the rows are marked.
_CLAIM_SQL = (
    "SELECT id, event_id, queue, payload, created_at FROM outbox"
    " WHERE published_at IS NULL ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED"
)
_MARK_SQL = "UPDATE outbox SET published_at = now() WHERE id = ANY(%s)"
_MAX_LIMIT = 10_000
# The fast path runs in a request: it publishes a few batches at most and leaves a backlog to the sweep.
_FAST_PATH_ROUNDS = 3
# How long a request waits for the fast path's publish: a broker that is up confirms a few events in a
# few ms; one that is down or silent costs a request no more than this (SPEC: +100 ms p99 at most).
FAST_PATH_WAIT_S = 0.05
# Connecting gives up after this (unless RABBITMQ_URL says otherwise): a broker that drops packets is
# found out fast, and the process backs off instead of trying again on every commit.
_CONNECT_TIMEOUTS = {"socket_timeout": 1.0, "stack_timeout": 2.0}
# A batch whose confirms do not all come back within this fails (its rows stay pending); the connection
# is dropped. RabbitMQ confirms a batch of hundreds in a few ms.
_CONFIRM_TIMEOUT_S = 10.0
# A transaction left waiting on a silent broker (or a Lambda frozen mid-publish) holds its rows' locks:
# PostgreSQL ends it after this, and the rows are free for the next publish.
_IDLE_IN_TRANSACTION_MS = 30_000


class OutboxRelay:
    """Publishes pending outbox rows over one long-lived connection, re-opened after a failure.

    Thread-safe: one thread publishes at a time (pika connections are not thread-safe); a fast-path
    caller that finds the relay busy leaves a note, and the busy thread goes round once more for it.
    One back-off for all callers: after a failure nobody tries the broker again until it has passed.
    """

    def __init__(self, *, url: str | None = None, min_backoff: float = 0.5, max_backoff: float = 5.0) -> None:
        self._url = url
        self._min_backoff = min_backoff
        self._max_backoff = max_backoff
        self._backoff = min_backoff
        self._retry_at = 0.0
        self._connection: Publisher | None = None
        self._lock = threading.Lock()
        self._wanted = False
        # publish_soon's hand-off to the publisher thread: requests asked, requests answered.
        self._handoff = threading.Condition()
        self._asked = 0
        self._answered = 0
        self._busy_since: float | None = None
        self._publisher: threading.Thread | None = None
        self._closed = False

    def publish_soon(self, *, wait: float = FAST_PATH_WAIT_S) -> None:
        """The fast path, in a request: publish on the publisher thread, waiting `wait` seconds at most.

        Never raises. Does not wait at all while the relay backs off after a failure, or while the
        publisher is stuck on an earlier publish (a broker that stopped answering): the rows stay pending
        and the sweep delivers them.
        """
        started = time.monotonic()
        if started < self._retry_at:
            return
        with self._handoff:
            if self._closed:
                return
            if self._publisher is None or not self._publisher.is_alive():
                self._publisher = threading.Thread(
                    target=self._publish_when_asked, name="minichat-publisher", daemon=True
                )
                self._publisher.start()
            self._asked += 1
            ticket = self._asked
            self._handoff.notify_all()
            busy = self._busy_since
            if busy is not None and started - busy > wait:
                return
            answered = self._handoff.wait_for(lambda: self._answered >= ticket, timeout=wait)
        if not answered:
            # Still publishing after `wait`: the broker is down or silent. Back off, so that the next
            # requests do not even wait, and leave the rows to the sweep.
            self._back_off(time.monotonic())
            log.warning("outbox fast path gave up", waited_ms=round((time.monotonic() - started) * 1000))

    def _publish_when_asked(self) -> None:
        from minichat.broker import TopologyMismatch

        while True:
            with self._handoff:
                self._handoff.wait_for(lambda: self._asked > self._answered or self._closed)
                if self._closed:
                    return
                target = self._asked
                self._busy_since = time.monotonic()
            try:
                self._run(limit=500, blocking=True, drain=False, deadline=None)
            except (ServiceUnavailable, TopologyMismatch) as exc:
                log.warning("outbox relay deferred", error=type(exc).__name__, reason=str(exc))
            except Exception:
                log.exception("outbox publisher failed")  # the thread lives on; the sweep has the rows
            finally:
                with self._handoff:
                    self._busy_since = None
                    self._answered = max(self._answered, target)
                    self._handoff.notify_all()

    def _back_off(self, now: float) -> None:
        self._retry_at = now + self._backoff
        self._backoff = min(self._backoff * 2, self._max_backoff)

    def publish_pending(self, *, limit: int = 500) -> int:
        """Fast path: publish what is pending unless another thread is at it; raises ServiceUnavailable."""
        return self._run(limit=limit, blocking=False, drain=False, deadline=None)

    def sweep(self, *, limit: int = 500, time_budget: float = 50.0) -> int:
        """Publish every pending row, batch after batch, until none is left or the budget is spent."""
        return self._run(limit=limit, blocking=True, drain=True, deadline=time.monotonic() + time_budget)

    def close(self) -> None:
        """Close the broker connection (it is re-opened on next use) and stop the publisher thread."""
        with self._handoff:
            self._closed = True
            self._handoff.notify_all()
        # A publish stuck on a silent broker holds the lock until its socket gives up: do not wait for it.
        if self._lock.acquire(timeout=1.0):
            try:
                self._drop_connection()
            finally:
                self._lock.release()

    def _run(self, *, limit: int, blocking: bool, drain: bool, deadline: float | None) -> int:
        if not 1 <= limit <= _MAX_LIMIT:
            raise ValueError(f"limit must be between 1 and {_MAX_LIMIT}")
        self._wanted = True
        total = 0
        while True:
            if not self._lock.acquire(blocking=blocking):
                return total  # the thread holding the lock sees `_wanted` and publishes our rows
            try:
                rounds = 0
                while self._wanted:
                    if deadline is not None and time.monotonic() >= deadline:
                        return total
                    if not drain and rounds >= _FAST_PATH_ROUNDS:
                        return total
                    self._wanted = False
                    published = self._publish_batch(limit)
                    total += published
                    rounds += 1
                    if drain and published == limit:
                        self._wanted = True
            finally:
                self._lock.release()
            # A caller may have left its note between our last check and the release.
            if not self._wanted:
                return total

    def _publish_batch(self, limit: int) -> int:
        import pika

        from minichat.broker import BrokerUnavailable

        publisher = self._ensure_publisher()
        taken = 0
        with transaction() as conn:
            conn.execute(f"SET LOCAL idle_in_transaction_session_timeout = {_IDLE_IN_TRANSACTION_MS}")
            rows = conn.execute(_CLAIM_SQL, (limit,)).fetchall()
            if not rows:
                return 0
            messages = [
                (
                    row["queue"],
                    json.dumps(row["payload"], separators=(",", ":"), ensure_ascii=False).encode(),
                    pika.BasicProperties(
                        content_type="application/json",
                        delivery_mode=2,  # persistent
                        message_id=str(row["event_id"]),
                        timestamp=int(row["created_at"].timestamp()),
                        app_id="minichat",
                    ),
                )
                for row in rows
            ]
            # The batch goes out at once, its confirms come back together. Only what the broker
            # confirmed, up to the first message it did not take, is marked; the rest stays pending.
            taken = publisher.publish(messages)
            if taken:
                conn.execute(_MARK_SQL, ([row["id"] for row in rows[:taken]],))
        if taken:
            log.info("outbox published", count=taken, last_id=rows[taken - 1]["id"])
        if taken < len(rows):
            failure = publisher.error
            self._drop_connection()
            self._back_off(time.monotonic())
            raise BrokerUnavailable() from failure
        return taken

    def _ensure_publisher(self) -> Publisher:
        import pika.exceptions

        from minichat import broker

        if self._connection is not None:
            # Answers heartbeats and notices a connection the broker closed while we were idle.
            if self._connection.check():
                return self._connection
            log.info("outbox relay reconnecting")
            self._drop_connection()
        now = time.monotonic()
        if now < self._retry_at:
            raise broker.BrokerUnavailable()  # backing off: the outbox keeps the rows meanwhile
        parameters = broker.connection_parameters(
            self._url, name="minichat-relay", defaults=_CONNECT_TIMEOUTS
        )
        try:
            # The topology on a short blocking connection (its errors, TopologyMismatch, as everywhere),
            # then the publishing connection.
            declaring = broker.connect(self._url, name="minichat-relay", defaults=_CONNECT_TIMEOUTS)
            try:
                broker.declare_topology(declaring.channel())
            finally:
                self._close_quietly(declaring)
            publisher = broker.Publisher(parameters, timeout=_CONFIRM_TIMEOUT_S)
            publisher.open()
        except (broker.BrokerUnavailable, pika.exceptions.AMQPError, OSError) as exc:
            self._back_off(now)
            if isinstance(exc, broker.BrokerUnavailable):
                raise
            raise broker.BrokerUnavailable() from exc
        self._backoff = self._min_backoff
        self._retry_at = 0.0
        self._connection = publisher
        return publisher

    def _drop_connection(self) -> None:
        publisher, self._connection = self._connection, None
        if publisher is not None:
            publisher.close()

    @staticmethod
    def _close_quietly(connection: pika.BlockingConnection) -> None:
        import pika.exceptions

        try:
            if connection.is_open:
                connection.close()
        except (pika.exceptions.AMQPError, OSError):
            pass  # already broken: there is nothing left to close cleanly


_relay: OutboxRelay | None = None
_relay_lock = threading.Lock()


def get_relay() -> OutboxRelay:
    """The process-wide relay (one broker connection per process), created on first use."""
    global _relay
    if _relay is None:
        with _relay_lock:
            if _relay is None:
                _relay = OutboxRelay()
    return _relay


def close_relay() -> None:
    """Close and forget the process-wide relay (shutdown, tests switching brokers)."""
    global _relay
    with _relay_lock:
        if _relay is not None:
            _relay.close()
            _relay = None


def publish_pending(*, limit: int = 500) -> int:
    """Fast path, right after a commit: publish pending rows; never raises (the sweep retries the rest)."""
    from minichat.broker import TopologyMismatch

    try:
        return get_relay().publish_pending(limit=limit)
    except (ServiceUnavailable, TopologyMismatch) as exc:
        log.warning("outbox relay deferred", error=type(exc).__name__, reason=str(exc))
        return 0


def sweep(*, limit: int = 500, time_budget: float = 50.0) -> int:
    """Publish every pending row until none is left or the budget is spent; raises ServiceUnavailable."""
    return get_relay().sweep(limit=limit, time_budget=time_budget)


# Published rows stay a week: enough to see what was sent when something downstream went wrong.
PUBLISHED_KEPT_S = 7 * 86400


def purge_published(conn: Conn, *, limit: int) -> int:
    """Delete up to `limit` rows published more than a week ago, oldest first (one batch of the purge job)."""
    cur = conn.execute(
        "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox"
        " WHERE published_at < now() - make_interval(secs => %s) ORDER BY id LIMIT %s)",
        (PUBLISHED_KEPT_S, limit),
    )
    return cur.rowcount


def relay_handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Scheduled Lambda entry point: sweep the outbox within the invocation's time; raises when it cannot."""
    from minichat.config import get_settings
    from minichat.log import setup_logging

    setup_logging(get_settings().log_level)
    budget = 50.0
    remaining = getattr(context, "get_remaining_time_in_millis", None)
    if callable(remaining):
        budget = max(1.0, remaining() / 1000 - 5.0)  # keep 5 s to commit the last batch
    return {"published": sweep(time_budget=budget)}


def run_relay(stop: threading.Event, *, interval: float = 1.0, wake: threading.Event | None = None) -> None:
    """Local mode's relay: sweep when woken (right after a commit) or every `interval` seconds, until `stop`.

    Failures only delay delivery: the rows stay pending.
    """
    from minichat.broker import TopologyMismatch

    wake = wake or threading.Event()
    while not stop.is_set():
        wake.clear()
        try:
            sweep()
        except (ServiceUnavailable, TopologyMismatch) as exc:
            log.warning("outbox sweep failed", error=type(exc).__name__, reason=str(exc))
        wake.wait(interval)
