"""Worker throughput: a full queue of 20,000 usage events → local consumer → real handler → PostgreSQL.

    .venv/bin/python bench/bench_worker.py [--events 20000] [--users 200]

Uses its own database (`minichat_bench_worker`, recreated) and RabbitMQ vhost (same name, created with
rabbitmqctl when missing), so it never touches dev or test data. The queue is filled through the real
outbox relay (its rate is printed too), then the consumer is started and timed until every event is in
usage_events. Baseline, same run and same rows: a plain INSERT loop (one statement per row, one commit
per 100 rows, no daily_usage).
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import time
import uuid
from datetime import UTC, datetime, timedelta

os.environ.setdefault("MINICHAT_LOG_LEVEL", "WARNING")  # before the handler module configures logging

import pika
import pika.exceptions
import psycopg
from psycopg import sql

from minichat import broker, events
from minichat.config import Settings, set_settings
from minichat.db import close_pool, transaction
from minichat.migrate import apply_migrations
from minichat.usage import handle_event
from minichat_local.consumer import Consumer
from minichat_local.functions import load_function

NAME = "minichat_bench_worker"  # its own: other benchmarks recreate `minichat_bench`
PG_ADMIN = os.environ.get("MINICHAT_BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
DATABASE_URL = psycopg.conninfo.make_conninfo(PG_ADMIN, dbname=NAME)
BROKER_URL = os.environ.get("MINICHAT_BENCH_RABBITMQ_URL", f"amqp://guest:guest@127.0.0.1:5672/{NAME}")
TARGET = 2000.0


def fresh_database() -> None:
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(NAME)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(NAME)))
    apply_migrations(DATABASE_URL)


def fresh_vhost() -> None:
    try:
        pika.BlockingConnection(pika.URLParameters(BROKER_URL)).close()
    except pika.exceptions.AMQPError:
        subprocess.run(["rabbitmqctl", "add_vhost", NAME], capture_output=True, timeout=60)
        subprocess.run(
            ["rabbitmqctl", "set_permissions", "-p", NAME, "guest", ".*", ".*", ".*"],
            check=True,
            capture_output=True,
            timeout=60,
        )
    connection = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
    channel = connection.channel()
    for queue in broker.QUEUES:
        channel.queue_delete(queue)
        channel.queue_delete(broker.dead_letter_queue(queue))
    broker.declare_topology(channel)
    connection.close()


def queue_depth() -> int:
    connection = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
    depth = int(connection.channel().queue_declare(events.USAGE_QUEUE, passive=True).method.message_count)
    connection.close()
    return depth


def make_users(count: int) -> list[str]:
    users = [str(uuid.uuid4()) for _ in range(count)]
    with psycopg.connect(DATABASE_URL) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO users (id, email, password_hash) VALUES (%s, %s, 'x')",
            [(u, f"{u}@bench.invalid") for u in users],
        )
    return users


def make_rows(count: int, users: list[str]) -> list[dict[str, object]]:
    rng = random.Random(20_000)
    start = datetime(2025, 1, 1, tzinfo=UTC)
    return [
        {
            "user_id": rng.choice(users),
            "generation_id": str(uuid.uuid4()),
            "model": rng.choice(["mock-echo", "gpt-4o-mini"]),
            "input_tokens": rng.randint(1, 4000),
            "output_tokens": rng.randint(1, 1000),
            "estimated": rng.random() < 0.05,
            "occurred_at": start + timedelta(seconds=rng.randint(0, 30 * 86400)),
        }
        for _ in range(count)
    ]


def fill_queue(rows: list[dict[str, object]]) -> float:
    """Outbox rows (usage events) → relay → usage_event; returns the relay's events/s."""
    with transaction() as conn:
        for row in rows:
            events.record(
                conn,
                events.usage_event(
                    user_id=str(row["user_id"]),
                    generation_id=str(row["generation_id"]),
                    model=str(row["model"]),
                    input_tokens=int(str(row["input_tokens"])),
                    output_tokens=int(str(row["output_tokens"])),
                    estimated=bool(row["estimated"]),
                ),
            )
    started = time.perf_counter()
    published = events.sweep(limit=500, time_budget=600)
    elapsed = time.perf_counter() - started
    events.close_relay()
    if published != len(rows) or queue_depth() != len(rows):
        raise SystemExit(f"fill failed: published {published}, queue holds {queue_depth()}")
    return published / elapsed


def run_worker(expected: int) -> float:
    """Start the consumer on the full queue and time it until every event is recorded."""
    consumer = Consumer(load_function("worker", "handler").handler, url=BROKER_URL)
    started = time.perf_counter()
    consumer.start()
    deadline = started + 600
    while consumer.stats.messages < expected:
        if time.perf_counter() > deadline:
            raise SystemExit(f"worker stalled at {consumer.stats.messages} of {expected}")
        time.sleep(0.005)
    elapsed = time.perf_counter() - started
    consumer.stop()
    with psycopg.connect(DATABASE_URL) as conn:
        stored = conn.execute("SELECT count(*) FROM usage_events").fetchone()
        mismatched = conn.execute(
            "SELECT count(*) FROM (SELECT user_id, day, input_tokens, output_tokens FROM daily_usage"
            " EXCEPT SELECT user_id, (occurred_at AT TIME ZONE 'UTC')::date, sum(input_tokens),"
            " sum(output_tokens) FROM usage_events GROUP BY 1, 2) AS diff"
        ).fetchone()
    if stored != (expected,) or mismatched != (0,):
        raise SystemExit(f"worker result wrong: {stored} rows, {mismatched} mismatched days")
    return expected / elapsed


def run_baseline(rows: list[dict[str, object]]) -> float:
    """A plain INSERT loop of the same rows: one statement per row, one commit per 100, no aggregates."""
    with psycopg.connect(DATABASE_URL) as conn:
        conn.execute("TRUNCATE usage_events, daily_usage")
        conn.commit()
        started = time.perf_counter()
        for i, row in enumerate(rows, 1):
            conn.execute(
                "INSERT INTO usage_events (id, user_id, generation_id, model, input_tokens, output_tokens,"
                " estimated, occurred_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    uuid.uuid4(),
                    row["user_id"],
                    row["generation_id"],
                    row["model"],
                    row["input_tokens"],
                    row["output_tokens"],
                    row["estimated"],
                    row["occurred_at"],
                ),
            )
            if i % 100 == 0:
                conn.commit()
        conn.commit()
        return len(rows) / (time.perf_counter() - started)


def run_handler_alone(rows: list[dict[str, object]]) -> float:
    """The handler on prebuilt Amazon MQ events of 100, no broker: what the database side costs."""
    import base64
    import json

    with psycopg.connect(DATABASE_URL) as conn:
        conn.execute("TRUNCATE usage_events, daily_usage")
        conn.commit()
    batches = []
    for start in range(0, len(rows), 100):
        entries = []
        for row in rows[start : start + 100]:
            body = {
                "eventId": str(uuid.uuid4()),
                "userId": row["user_id"],
                "generationId": row["generation_id"],
                "model": row["model"],
                "inputTokens": row["input_tokens"],
                "outputTokens": row["output_tokens"],
                "estimated": row["estimated"],
                "occurredAt": row["occurred_at"].isoformat(),  # type: ignore[attr-defined]
            }
            entries.append(
                {
                    "basicProperties": {},
                    "redelivered": False,
                    "data": base64.b64encode(json.dumps(body).encode()).decode(),
                }
            )
        batches.append({"eventSource": "aws:rmq", "rmqMessagesByQueue": {f"usage_event::{NAME}": entries}})
    started = time.perf_counter()
    for event in batches:
        handle_event(event)
    return len(rows) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--users", type=int, default=200)
    args = parser.parse_args()

    fresh_database()
    fresh_vhost()
    set_settings(Settings.from_env().with_(database_url=DATABASE_URL, rabbitmq_url=BROKER_URL, db_pool_max=4))
    close_pool()
    users = make_users(args.users)
    rows = make_rows(args.events, users)

    relay_rate = fill_queue(rows)
    worker_rate = run_worker(len(rows))
    baseline_rate = run_baseline(rows)
    handler_rate = run_handler_alone(rows)
    close_pool()

    print(f"events: {len(rows):,} usage events, {args.users} users, 30 days")
    print(f"worker   (full queue → local consumer → real handler → PostgreSQL): {worker_rate:8,.0f} events/s")
    print(
        f"baseline (plain INSERT loop, same rows, commit every 100)          : {baseline_rate:8,.0f} rows/s"
    )
    print(
        f"handler alone (prebuilt events of 100, no broker)                  : {handler_rate:8,.0f} events/s"
    )
    print(f"relay    (outbox → RabbitMQ, publisher confirms), filling the queue: {relay_rate:8,.0f} events/s")
    verdict = "met" if worker_rate >= TARGET else "NOT met"
    print(f"target ≥ {TARGET:,.0f} events/s: {verdict} ({worker_rate / baseline_rate:.1f}x baseline)")


if __name__ == "__main__":
    main()
