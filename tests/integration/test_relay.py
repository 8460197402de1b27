"""The outbox relay against the real PostgreSQL and RabbitMQ: confirms, order, outages, two relays at once.

RabbitMQ runs in its own vhost (`the tests' own vhost`) so a dev server on `/` is not disturbed, except by
the test that stops the whole broker (it always starts it again).
"""

from __future__ import annotations

import json
import ssl
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pika
import pika.exceptions
import psycopg
import pytest

from helpers import VHOST, daily_usage_matches_events, rabbitmqctl
from minichat import events
from minichat.broker import QUEUES, connection_parameters, dead_letter_queue
from minichat.config import get_settings, set_settings
from minichat.db import transaction
from minichat.errors import ServiceUnavailable
from minichat.events import AUDIT_QUEUE, USAGE_QUEUE, OutboxRelay, record, record_audit, usage_event
from minichat.usage import decode_mq_event
from minichat_local.consumer import Consumer
from minichat_local.functions import load_function
from minichat_local.services import Background


@pytest.fixture
def broker_url(broker_vhost: str, db: psycopg.Connection) -> Iterator[str]:
    """An empty topology in the test vhost, and the process settings pointing at it."""
    connection = pika.BlockingConnection(pika.URLParameters(broker_vhost))
    channel = connection.channel()
    for queue in QUEUES:
        channel.queue_delete(queue)
        channel.queue_delete(dead_letter_queue(queue))
    connection.close()
    settings = get_settings()
    set_settings(settings.with_(rabbitmq_url=broker_vhost))
    events.close_relay()
    yield broker_vhost
    events.close_relay()
    set_settings(settings)


def drain(url: str, queue: str) -> list[tuple[pika.BasicProperties, bytes]]:
    """Every message in a queue, acknowledged, in queue order."""
    connection = pika.BlockingConnection(pika.URLParameters(url))
    channel = connection.channel()
    messages = []
    while True:
        method, properties, body = channel.basic_get(queue, auto_ack=True)
        if method is None:
            break
        messages.append((properties, body))
    connection.close()
    return messages


def write_usage(count: int, *, user_ids: list[str] | None = None) -> list[str]:
    """`count` finished generations' usage events, each committed in its own transaction."""
    ids = []
    for i in range(count):
        with transaction() as conn:
            user = user_ids[i % len(user_ids)] if user_ids else str(uuid.uuid4())
            ids.append(
                record(
                    conn,
                    usage_event(
                        user_id=user,
                        generation_id=str(uuid.uuid4()),
                        model="mock-echo",
                        input_tokens=i,
                        output_tokens=1,
                        estimated=False,
                    ),
                )
            )
    return ids


def pending(db: psycopg.Connection) -> int:
    row = db.execute("SELECT count(*) FROM outbox WHERE published_at IS NULL").fetchone()
    return int(row[0]) if row else -1


def test_amqps_urls_verify_the_server_like_amazon_mq_needs() -> None:
    """No TLS listener here: the parameters are what Amazon MQ (TLS only, port 5671) requires."""
    params = connection_parameters("amqps://app:s3cret@b-1234.mq.us-east-1.amazonaws.com/%2F", name="relay")
    assert params.port == 5671
    assert params.ssl_options is not None
    assert params.ssl_options.server_hostname == "b-1234.mq.us-east-1.amazonaws.com"
    assert params.ssl_options.context.verify_mode == ssl.CERT_REQUIRED
    assert params.ssl_options.context.check_hostname
    assert (params.heartbeat, params.blocked_connection_timeout, params.virtual_host) == (30, 30.0, "/")
    assert params.client_properties == {"connection_name": "relay"}
    plain = connection_parameters("amqp://guest:guest@127.0.0.1/minichat?heartbeat=5&socket_timeout=1")
    assert plain.ssl_options is None and plain.port == 5672
    assert (plain.heartbeat, plain.socket_timeout, plain.virtual_host) == (5, 1.0, "minichat")  # URL wins


def test_pending_rows_are_published_persistent_confirmed_and_in_order(
    broker_url: str, db: psycopg.Connection
) -> None:
    usage_ids = write_usage(3)
    with transaction() as conn:
        audit_ids = [
            record_audit(conn, user_id=None, action="user.login_failed", metadata={"ip": "198.51.100.1"}),
            record_audit(conn, user_id=str(uuid.uuid4()), action="chat.created"),
        ]

    assert events.publish_pending() == 5
    assert events.publish_pending() == 0
    assert pending(db) == 0

    usage = drain(broker_url, USAGE_QUEUE)
    audit = drain(broker_url, AUDIT_QUEUE)
    assert [p.message_id for p, _ in usage] == usage_ids
    assert [p.message_id for p, _ in audit] == audit_ids
    payloads: dict[str, Any] = dict(db.execute("SELECT event_id::text, payload FROM outbox").fetchall())
    for properties, body in usage + audit:
        assert properties.delivery_mode == 2
        assert properties.content_type == "application/json"
        assert json.loads(body) == payloads[properties.message_id]


def test_relay_handler_sweeps_what_the_fast_path_left(broker_url: str, db: psycopg.Connection) -> None:
    write_usage(7)

    class Context:
        def get_remaining_time_in_millis(self) -> int:
            return 60_000

    assert events.relay_handler({"source": "aws.scheduler"}, Context()) == {"published": 7}
    assert len(drain(broker_url, USAGE_QUEUE)) == 7


def test_relay_reopens_a_connection_the_broker_closed(broker_url: str, db: psycopg.Connection) -> None:
    write_usage(1)
    assert events.publish_pending() == 1
    rabbitmqctl("close_all_connections", "-p", VHOST, "test: connection reset")
    time.sleep(0.2)

    write_usage(1)
    # The first call after the close notices it and reconnects: nothing is deferred.
    assert events.publish_pending() == 1
    assert len(drain(broker_url, USAGE_QUEUE)) == 2


def test_an_event_whose_queue_is_gone_stays_pending_and_the_rest_of_its_batch_lands(
    broker_url: str, db: psycopg.Connection
) -> None:
    """A message no queue takes (its queue was deleted) comes back unroutable and stays pending, and
    what the broker confirmed before it is marked; the next connection declares the queue again and
    delivers it."""
    relay = OutboxRelay(url=broker_url, min_backoff=0.05)
    write_usage(1)
    assert relay.publish_pending() == 1  # connected, topology declared
    connection = pika.BlockingConnection(pika.URLParameters(broker_url))
    connection.channel().queue_delete(AUDIT_QUEUE)
    connection.close()

    usage_ids = write_usage(2)
    with transaction() as conn:
        audit_id = record_audit(conn, user_id=str(uuid.uuid4()), action="chat.created")
    with pytest.raises(ServiceUnavailable):
        relay.publish_pending()
    assert [row[0] for row in db.execute("SELECT event_id::text FROM outbox WHERE published_at IS NULL")] == [
        audit_id
    ]
    assert [p.message_id for p, _ in drain(broker_url, USAGE_QUEUE)][1:] == usage_ids

    time.sleep(0.1)  # the back-off
    assert relay.sweep() == 1
    assert [p.message_id for p, _ in drain(broker_url, AUDIT_QUEUE)] == [audit_id]
    assert pending(db) == 0
    relay.close()


def test_messages_a_queue_refuses_stay_pending_until_it_takes_them(
    broker_url: str, db: psycopg.Connection
) -> None:
    """A queue that refuses messages (here: over its length limit, with reject-publish) nacks them: what
    the broker refused stays pending, and is published once the queue takes messages again.

    (An AMQP transaction per batch would save the round trips too, but RabbitMQ 3.10 answers
    tx.commit-ok even when a quorum queue refused a message of the transaction: it would be marked
    published and lost. This test fails that way.)"""
    relay = OutboxRelay(url=broker_url, min_backoff=0.05)
    write_usage(1)
    assert relay.publish_pending() == 1  # connected, topology declared
    rabbitmqctl(
        "set_policy", "-p", VHOST, "--apply-to", "queues", "test-full", f"^{AUDIT_QUEUE}$", '{"max-length":0}'
    )
    try:
        # A quorum queue takes a message and then refuses the next ones: fill it until it refuses.
        connection = pika.BlockingConnection(pika.URLParameters(broker_url))
        channel = connection.channel()
        channel.confirm_delivery()
        for _ in range(20):
            try:
                channel.basic_publish("", AUDIT_QUEUE, b"{}", pika.BasicProperties(message_id="filler"))
            except pika.exceptions.NackError:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the queue never refused a message")
        connection.close()

        usage_ids = write_usage(1)
        with transaction() as conn:
            audit_ids = [
                record_audit(conn, user_id=str(uuid.uuid4()), action="chat.created") for _ in range(3)
            ]
        with pytest.raises(ServiceUnavailable):
            relay.publish_pending()
        assert pending(db) == 3  # the usage event, first in the batch, was taken
    finally:
        rabbitmqctl("clear_policy", "-p", VHOST, "test-full")
    time.sleep(0.1)  # the back-off
    assert relay.sweep() == 3
    assert pending(db) == 0
    assert [p.message_id for p, _ in drain(broker_url, AUDIT_QUEUE) if p.message_id != "filler"] == audit_ids
    assert [p.message_id for p, _ in drain(broker_url, USAGE_QUEUE)][1:] == usage_ids
    relay.close()


def test_a_worker_process_commit_wakes_the_supervisor_relay(
    broker_url: str, db: psycopg.Connection, database_url: str
) -> None:
    """Local mode with worker processes: a worker's commit with events pokes the supervisor through a
    pipe, and the relay publishes at once, not on its timer (here a minute)."""
    background = Background(relay_interval=60.0)
    background.start()
    try:
        time.sleep(0.3)  # the first sweep (at start) is done
        # The row as a worker process commits it: on its own connection, which wakes nobody here.
        with psycopg.connect(database_url, autocommit=True) as other:
            event_id = str(uuid.uuid4())
            other.execute(
                "INSERT INTO outbox (event_id, queue, payload) VALUES (%s, %s, '{}'::jsonb)",
                (event_id, AUDIT_QUEUE),
            )
        background._poke()  # what a worker's commit listener does (Background.in_worker)
        deadline = time.monotonic() + 5
        while pending(db) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert pending(db) == 0
        assert time.monotonic() < deadline - 4  # within a second, not the timer's minute
    finally:
        background.stop()


def test_two_relays_at_once_never_publish_an_event_twice(broker_url: str, db: psycopg.Connection) -> None:
    with transaction() as conn:
        ids = [
            record(
                conn,
                usage_event(
                    user_id=str(uuid.uuid4()),
                    generation_id=str(uuid.uuid4()),
                    model="m",
                    input_tokens=1,
                    output_tokens=1,
                    estimated=False,
                ),
            )
            for _ in range(1500)
        ]
    relays = [OutboxRelay(url=broker_url), OutboxRelay(url=broker_url)]
    published = [0, 0]
    barrier = threading.Barrier(2)

    def run(index: int) -> None:
        barrier.wait()
        published[index] = relays[index].sweep(limit=20)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for relay in relays:
        relay.close()

    delivered = Counter(p.message_id for p, _ in drain(broker_url, USAGE_QUEUE))
    assert sum(published) == 1500
    assert min(published) > 0, published  # both really worked, side by side
    assert set(delivered) == set(ids)
    assert max(delivered.values()) == 1
    assert pending(db) == 0


def test_broker_stopped_while_generations_finish_then_started(
    broker_url: str, db: psycopg.Connection
) -> None:
    """Issue 4: the broker down while 200 generations finish; after restart every event arrives once."""
    users = [str(uuid.uuid4()) for _ in range(5)]
    for user in users:
        db.execute(
            "INSERT INTO users (id, email, password_hash) VALUES (%s, %s, 'x')", (user, f"{user}@t.io")
        )
    worker = load_function("worker", "handler").handler
    seen: Counter[str] = Counter()

    def recording_handler(event: dict[str, Any], context: Any) -> Any:
        result = worker(event, context)
        seen.update(m.message_id or "" for m in decode_mq_event(event) if not m.redelivered)
        return result

    consumer = Consumer(recording_handler, url=broker_url, reconnect_delay=0.2, max_reconnect_delay=1.0)
    stop = threading.Event()
    relay_timer = threading.Thread(
        target=events.run_relay, args=(stop,), kwargs={"interval": 0.2}, daemon=True
    )
    consumer.start()
    relay_timer.start()
    try:
        assert consumer.wait_connected(10)
        before = write_usage(20, user_ids=users)
        events.publish_pending()
        wait_until(lambda: count(db, "usage_events") == 20, timeout=20)

        try:
            rabbitmqctl("stop_app")
            during = []
            for i in range(200):
                during += write_usage(1, user_ids=[users[i % 5]])
                assert events.publish_pending() == 0  # the fast path defers, it never fails the request
            assert pending(db) == 200
            with pytest.raises(ServiceUnavailable):
                events.sweep()
        finally:
            rabbitmqctl("start_app")
        restarted = time.monotonic()

        wait_until(lambda: count(db, "usage_events") == 220, timeout=60)
        arrival = time.monotonic() - restarted
    finally:
        stop.set()
        consumer.stop()
        relay_timer.join(10)

    print(f"broker outage: 200 events arrived {arrival:.1f} s after the restart")
    assert arrival < 60
    assert pending(db) == 0
    stored = {row[0] for row in db.execute("SELECT id::text FROM usage_events")}
    assert stored == set(before) | set(during)
    assert max(seen.values()) == 1 and set(seen) == stored  # nothing sent twice, nothing lost
    assert daily_usage_matches_events(db)


def count(db: psycopg.Connection, table: str) -> int:
    row = db.execute(f"SELECT count(*) FROM {table}").fetchone()
    return int(row[0]) if row else -1


def wait_until(condition: Any, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout} s")
        time.sleep(0.05)
