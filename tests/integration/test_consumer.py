"""Local mode's consumer against the real RabbitMQ and PostgreSQL: batching, ack/nack, reconnects, SIGKILL.

RabbitMQ runs in its own vhost (`the tests' own vhost`) so a dev server on `/` is not disturbed.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import psycopg
import pytest

from helpers import BROKER_URL, VHOST, daily_usage_matches_events, rabbitmqctl
from minichat.broker import QUEUES, dead_letter_queue, declare_topology, replay_dead_letters
from minichat.config import get_settings, set_settings
from minichat.events import AUDIT_QUEUE, USAGE_QUEUE
from minichat.usage import decode_mq_event
from minichat_local.consumer import Consumer
from minichat_local.functions import load_function


@pytest.fixture
def channel(
    broker_vhost: str, db: psycopg.Connection
) -> Iterator[pika.adapters.blocking_connection.BlockingChannel]:
    """A fresh topology in the test vhost and a publishing channel (confirms) on it."""
    connection = pika.BlockingConnection(pika.URLParameters(broker_vhost))
    ch = connection.channel()
    for queue in QUEUES:
        ch.queue_delete(queue)
        ch.queue_delete(dead_letter_queue(queue))
    declare_topology(ch)
    ch.confirm_delivery()
    settings = get_settings()
    set_settings(settings.with_(rabbitmq_url=broker_vhost))
    yield ch
    set_settings(settings)
    with contextlib.suppress(pika.exceptions.AMQPError):  # a test closed every connection of the vhost
        connection.close()


@pytest.fixture
def users(db: psycopg.Connection) -> list[str]:
    ids = [str(uuid.uuid4()) for _ in range(5)]
    for user_id in ids:
        db.execute(
            "INSERT INTO users (id, email, password_hash) VALUES (%s, %s, 'x')", (user_id, f"{user_id}@t.io")
        )
    return ids


def usage_event(user_id: str, *, day: int = 1, tokens: int = 1) -> dict[str, Any]:
    return {
        "eventId": str(uuid.uuid4()),
        "userId": user_id,
        "generationId": str(uuid.uuid4()),
        "model": "mock-echo",
        "inputTokens": tokens,
        "outputTokens": 2 * tokens,
        "estimated": False,
        "occurredAt": f"2025-03-{day:02d}T12:00:00Z",
    }


def publish(ch: Any, queue: str, body: dict[str, Any]) -> None:
    properties = pika.BasicProperties(
        content_type="application/json", delivery_mode=2, message_id=body["eventId"]
    )
    ch.basic_publish("", queue, json.dumps(body).encode(), properties, mandatory=True)


class Recorder:
    """Wraps the real worker handler and keeps every event it was given."""

    def __init__(self, fail_times: int = 0, *, always_fail: bool = False) -> None:
        self.worker = load_function("worker", "handler").handler
        self.events: list[dict[str, Any]] = []
        self.fail_times = fail_times
        self.always_fail = always_fail

    def __call__(self, event: dict[str, Any], context: Any) -> Any:
        self.events.append(event)
        if self.always_fail or len(self.events) <= self.fail_times:
            raise RuntimeError("simulated worker failure")
        return self.worker(event, context)

    def sizes(self) -> list[int]:
        return [len(decode_mq_event(e)) for e in self.events]


def count(db: psycopg.Connection, sql: str) -> int:
    row = db.execute(sql).fetchone()
    return int(row[0]) if row else -1


def wait_until(condition: Callable[[], bool], *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {timeout} s")
        time.sleep(0.05)


def queue_depth(ch: Any, queue: str) -> int:
    return int(ch.queue_declare(queue, passive=True).method.message_count)


def test_batches_of_at_most_100_from_both_queues_acked_after_the_handler(
    channel: Any, db: psycopg.Connection, users: list[str]
) -> None:
    for i in range(250):
        publish(channel, USAGE_QUEUE, usage_event(users[i % 5]))
    audit = {"eventId": str(uuid.uuid4()), "userId": users[0], "action": "user.login", "metadata": {}}
    publish(channel, AUDIT_QUEUE, dict(audit, occurredAt="2025-03-01T00:00:00Z"))
    recorder = Recorder()
    consumer = Consumer(recorder, url=BROKER_URL)
    consumer.start()
    try:
        wait_until(lambda: count(db, "SELECT count(*) FROM usage_events") == 250, timeout=20)
        wait_until(lambda: count(db, "SELECT count(*) FROM audit_logs") == 1, timeout=5)
    finally:
        consumer.stop()

    assert max(recorder.sizes()) == 100 and sum(recorder.sizes()) == 251
    keys = {key for event in recorder.events for key in event["rmqMessagesByQueue"]}
    assert keys == {f"usage_event::{VHOST}", f"audit_event::{VHOST}"}
    first = recorder.events[0]
    assert first["eventSource"] == "aws:rmq"
    message = next(iter(first["rmqMessagesByQueue"].values()))[0]
    assert message["basicProperties"]["deliveryMode"] == 2 and message["redelivered"] is False
    assert (queue_depth(channel, USAGE_QUEUE), queue_depth(channel, AUDIT_QUEUE)) == (0, 0)
    assert consumer.stats.messages == 251


def test_a_lone_message_waits_for_the_batch_window(
    channel: Any, db: psycopg.Connection, users: list[str]
) -> None:
    recorder = Recorder()
    consumer = Consumer(recorder, url=BROKER_URL, batch_window=0.5)
    consumer.start()
    try:
        assert consumer.wait_connected(10)
        started = time.monotonic()
        for _ in range(3):
            publish(channel, USAGE_QUEUE, usage_event(users[0]))
        wait_until(lambda: bool(recorder.events), timeout=5)
        waited = time.monotonic() - started
    finally:
        consumer.stop()
    assert recorder.sizes() == [3]
    assert 0.4 <= waited < 2.0


def test_a_failing_batch_is_requeued_and_recorded_once_on_retry(
    channel: Any, db: psycopg.Connection, users: list[str]
) -> None:
    for _ in range(10):
        publish(channel, USAGE_QUEUE, usage_event(users[1], tokens=5))
    recorder = Recorder(fail_times=1)
    consumer = Consumer(recorder, url=BROKER_URL, retry_delay=0.05)
    consumer.start()
    try:
        wait_until(lambda: count(db, "SELECT count(*) FROM usage_events") == 10, timeout=10)
    finally:
        consumer.stop()
    assert recorder.sizes()[:2] == [10, 10]
    redelivered = [
        m["redelivered"] for m in recorder.events[1]["rmqMessagesByQueue"][f"usage_event::{VHOST}"]
    ]
    assert all(redelivered)
    assert count(db, "SELECT sum(input_tokens) FROM daily_usage") == 50
    assert queue_depth(channel, USAGE_QUEUE) == 0


def test_a_poison_batch_is_dead_lettered_at_the_delivery_limit_then_replayed(
    channel: Any, db: psycopg.Connection, users: list[str]
) -> None:
    publish(channel, USAGE_QUEUE, usage_event(users[2], tokens=7))
    failing = Recorder(always_fail=True)
    # A lone message waits out the batch window on each delivery: shorten it to keep the test quick.
    consumer = Consumer(failing, url=BROKER_URL, retry_delay=0.0, batch_window=0.02)
    consumer.start()
    try:
        wait_until(lambda: queue_depth(channel, dead_letter_queue(USAGE_QUEUE)) == 1, timeout=30)
    finally:
        consumer.stop()
    assert len(failing.events) > 20  # x-delivery-limit = 20: the first delivery plus 20 retries
    assert count(db, "SELECT count(*) FROM usage_events") == 0

    assert replay_dead_letters(USAGE_QUEUE, url=BROKER_URL) == 1
    consumer = Consumer(Recorder(), url=BROKER_URL)
    consumer.start()
    try:
        wait_until(lambda: count(db, "SELECT count(*) FROM usage_events") == 1, timeout=10)
    finally:
        consumer.stop()
    assert queue_depth(channel, dead_letter_queue(USAGE_QUEUE)) == 0


def test_the_consumer_reconnects_when_the_broker_drops_it(
    channel: Any, db: psycopg.Connection, users: list[str]
) -> None:
    consumer = Consumer(Recorder(), url=BROKER_URL, reconnect_delay=0.1)
    consumer.start()
    try:
        assert consumer.wait_connected(10)
        # Our own publishing connection goes too: take a new one afterwards.
        rabbitmqctl("close_all_connections", "-p", VHOST, "test: broker restart")
        connection = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
        ch = connection.channel()
        ch.confirm_delivery()
        for _ in range(5):
            publish(ch, USAGE_QUEUE, usage_event(users[3]))
        connection.close()
        wait_until(lambda: count(db, "SELECT count(*) FROM usage_events") == 5, timeout=15)
    finally:
        consumer.stop()
    assert consumer.stats.connections >= 2


def start_consumer_process(log_path: Path) -> subprocess.Popen[bytes]:
    """`python -m minichat_local.consumer` on the test vhost and database, logging JSON lines to a file."""
    env = dict(os.environ, RABBITMQ_URL=BROKER_URL, DATABASE_URL=get_settings().database_url)
    env["MINICHAT_LOG_LEVEL"] = "INFO"
    with log_path.open("wb") as log_file:
        return subprocess.Popen(
            [sys.executable, "-m", "minichat_local.consumer"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )


def batch_totals(log_path: Path, field: str) -> int:
    """A count summed over the process's `worker batch` log lines."""
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.startswith("{")]
    return sum(int(line[field]) for line in lines if line.get("msg") == "worker batch")


def test_consumer_killed_mid_stream_then_restarted_loses_and_duplicates_nothing(
    channel: Any, db: psycopg.Connection, users: list[str], tmp_path: Path
) -> None:
    """Issue 4: SIGKILL in the middle of a stream of events, then a restart: same invariants."""
    rng = random.Random(4)
    bodies = [usage_event(users[i % 5], day=1 + i % 3, tokens=rng.randint(1, 500)) for i in range(3000)]
    deliveries = 0

    def send(ch: Any, i: int) -> None:
        nonlocal deliveries
        publish(ch, USAGE_QUEUE, bodies[i])
        deliveries += 1
        if i % 10 == 0:  # some events twice, as an at-least-once relay may send them
            publish(ch, USAGE_QUEUE, bodies[i])
            deliveries += 1

    def stream() -> None:
        connection = pika.BlockingConnection(pika.URLParameters(BROKER_URL))  # pika is not thread-safe
        ch = connection.channel()
        ch.confirm_delivery()
        for i in range(2000, len(bodies)):
            send(ch, i)
            if i % 100 == 99:
                time.sleep(0.05)  # a stream, not one burst: events keep coming across the kill
        connection.close()

    # A backlog first, so the kill finds the consumer busy: a prefetch of unacknowledged deliveries in
    # hand and, most of the time, a batch inside the handler.
    for i in range(2000):
        send(channel, i)
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    first = start_consumer_process(logs[0])
    second = None
    streamer = threading.Thread(target=stream)

    def rows() -> int:
        return count(db, "SELECT count(*) FROM usage_events")

    try:
        streamer.start()
        try:
            wait_until(lambda: rows() >= 600, timeout=30)
        except AssertionError:
            raise AssertionError(
                f"consumer stalled; its log ends with: {logs[0].read_text()[-2000:]!r}"
            ) from None
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        assert rows() < len(bodies)  # really in the middle
        second = start_consumer_process(logs[1])
        streamer.join(60)
        wait_until(lambda: rows() == len(bodies), timeout=60)
        wait_until(lambda: queue_depth(channel, USAGE_QUEUE) == 0, timeout=10)
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(10)

    stored = {row[0] for row in db.execute("SELECT id::text FROM usage_events")}
    assert stored == {b["eventId"] for b in bodies}  # nothing lost, nothing twice (ids are the primary key)
    assert count(db, "SELECT sum(input_tokens) FROM daily_usage") == sum(b["inputTokens"] for b in bodies)
    assert count(db, "SELECT count(*) FROM dead_letters") == 0
    assert daily_usage_matches_events(db)
    # The kill left deliveries unacknowledged; the broker gave them to the restarted consumer.
    redelivered = batch_totals(logs[1], "redelivered")
    assert redelivered > 0
    handled = batch_totals(logs[0], "messages") + batch_totals(logs[1], "messages")
    print(
        f"SIGKILL test: {deliveries} deliveries, {handled} handled, {redelivered} redelivered after the kill"
    )
