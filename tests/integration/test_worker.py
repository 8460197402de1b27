"""The worker handler against the real PostgreSQL: idempotent, atomic per batch, dead letters, totals."""

from __future__ import annotations

import base64
import copy
import json
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import psycopg
import pytest

from helpers import daily_usage_matches_events
from minichat.config import get_settings, set_settings
from minichat.db import close_pool
from minichat.errors import ServiceUnavailable
from minichat.usage import daily_totals
from minichat_local.functions import load_function

EVENTS = Path(__file__).resolve().parents[1] / "events"
USER_A = "0b5e7c1a-3f2d-4a6b-8c9d-1e2f3a4b5c6d"
USER_B = "7d8e9f0a-1b2c-4d3e-8f4a-5b6c7d8e9f0a"


def handler(event: dict[str, Any]) -> dict[str, Any]:
    """The real Lambda entry point, loaded from functions/worker/handler.py."""
    result: dict[str, Any] = load_function("worker", "handler").handler(event, None)
    return result


def sample(name: str) -> dict[str, Any]:
    return dict(json.loads((EVENTS / name).read_text()))


def add_users(db: psycopg.Connection, *user_ids: str) -> None:
    for user_id in user_ids:
        db.execute(
            "INSERT INTO users (id, email, password_hash) VALUES (%s, %s, 'x')",
            (user_id, f"{user_id}@example.com"),
        )


def entry(body: bytes | str, *, message_id: str | None = None) -> dict[str, Any]:
    raw = body.encode() if isinstance(body, str) else body
    return {
        "basicProperties": {"contentType": "application/json", "messageId": message_id, "bodySize": len(raw)},
        "redelivered": False,
        "data": base64.b64encode(raw).decode(),
    }


def usage_body(user_id: str, **fields: Any) -> dict[str, Any]:
    body = {
        "eventId": str(uuid.uuid4()),
        "userId": user_id,
        "generationId": str(uuid.uuid4()),
        "model": "mock-echo",
        "inputTokens": 3,
        "outputTokens": 4,
        "estimated": False,
        "occurredAt": "2025-02-01T12:00:00Z",
    }
    body.update(fields)
    return body


def mq_event(by_queue: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    return {"eventSource": "aws:rmq", "eventSourceArn": "arn:test", "rmqMessagesByQueue": by_queue}


def snapshot(db: psycopg.Connection) -> dict[str, list[tuple[Any, ...]]]:
    """Everything the worker writes (minus row ids and insert times)."""
    queries = {
        "usage_events": "SELECT id, user_id, generation_id, model, input_tokens, output_tokens, estimated,"
        " occurred_at FROM usage_events ORDER BY id",
        "daily_usage": "SELECT user_id, day, input_tokens, output_tokens FROM daily_usage ORDER BY 1, 2",
        "audit_logs": "SELECT id, user_id, action, metadata_json, created_at FROM audit_logs ORDER BY id",
        "dead_letters": "SELECT queue, message_id, body, reason FROM dead_letters ORDER BY 1, 2, 3",
    }
    return {name: db.execute(sql).fetchall() for name, sql in queries.items()}


@pytest.fixture
def users(db: psycopg.Connection) -> psycopg.Connection:
    add_users(db, USER_A, USER_B)
    return db


def test_sample_batches_are_recorded(users: psycopg.Connection) -> None:
    usage = handler(sample("amazon-mq-usage.json"))
    audit = handler(sample("amazon-mq-audit.json"))

    assert (usage["usage_inserted"], usage["usage_duplicates"], usage["dead_lettered"]) == (4, 0, 0)
    assert (audit["audit_inserted"], audit["dead_lettered"]) == (3, 0)
    rows = users.execute(
        "SELECT user_id::text, day, input_tokens, output_tokens FROM daily_usage ORDER BY 1, 2"
    )
    assert rows.fetchall() == [
        # 23:59:59.999Z and 01:30+02:00 (= 23:30Z) both belong to the 15th in UTC.
        (USER_A, date(2025, 1, 15), 12 + 1000 + 7, 34 + 250 + 8),
        (USER_B, date(2025, 1, 16), 5, 6),
    ]
    assert daily_usage_matches_events(users)
    actions = users.execute("SELECT action, user_id::text, metadata_json FROM audit_logs ORDER BY created_at")
    assert actions.fetchall() == [
        ("user.login", USER_A, {"ip": "203.0.113.7"}),
        (
            "chat.created",
            USER_A,
            {"chatId": "e5f6a7b8-c9d0-4e1f-8a2b-4c5d6e7f8091", "title": "Zürich trip ✈"},
        ),
        ("user.login_failed", None, {}),
    ]


def test_the_same_batch_delivered_twice_changes_nothing(users: psycopg.Connection) -> None:
    event = sample("amazon-mq-usage.json")
    event["rmqMessagesByQueue"].update(sample("amazon-mq-audit.json")["rmqMessagesByQueue"])
    event["rmqMessagesByQueue"]["usage_event::/"].append(entry("{broken"))

    first = handler(event)
    before = snapshot(users)
    second = handler(copy.deepcopy(event))

    assert snapshot(users) == before
    assert (first["usage_inserted"], first["audit_inserted"], first["dead_lettered"]) == (4, 3, 1)
    assert (second["usage_inserted"], second["audit_inserted"], second["dead_lettered"]) == (0, 0, 0)
    assert (second["usage_duplicates"], second["audit_duplicates"], second["days_updated"]) == (4, 3, 0)
    assert daily_usage_matches_events(users)


def test_duplicates_inside_one_batch_count_once(users: psycopg.Connection) -> None:
    once = usage_body(USER_A, inputTokens=10, outputTokens=1)
    same_generation = usage_body(USER_A, generationId=once["generationId"], inputTokens=999)
    event = mq_event({"usage_event::/": [entry(json.dumps(b)) for b in (once, once, same_generation)]})

    result = handler(event)

    assert (result["usage_inserted"], result["usage_duplicates"]) == (1, 2)
    assert users.execute("SELECT input_tokens, output_tokens FROM daily_usage").fetchall() == [(10, 1)]


def test_malformed_messages_are_dead_lettered_and_the_valid_ones_recorded(users: psycopg.Connection) -> None:
    valid = [usage_body(USER_A, inputTokens=100, outputTokens=10), usage_body(USER_B, inputTokens=5)]
    # No such user (any more): usage outlives a deleted account and is recorded all the same.
    ghost = usage_body(str(uuid.uuid4()), inputTokens=1, outputTokens=1)
    audit = {
        "eventId": str(uuid.uuid4()),
        "userId": USER_A,
        "action": "chat.deleted",
        "metadata": {"chatId": "c"},
        "occurredAt": "2025-02-01T12:00:00Z",
    }
    bad_audit = dict(audit, eventId=str(uuid.uuid4()), metadata={"note": "nul \u0000 byte"})
    event = mq_event(
        {
            "usage_event::/": [
                entry(json.dumps(valid[0])),
                entry("not json at all", message_id="m-not-json"),
                entry(json.dumps(usage_body(USER_A, inputTokens="12"))),
                entry(json.dumps(ghost), message_id=ghost["eventId"]),
                {"basicProperties": {}, "data": "%%%not-base64%%%"},
                entry(b"\xff\xfe\x00binary"),
                entry(json.dumps(valid[1])),
            ],
            "audit_event::/": [entry(json.dumps(audit)), entry(json.dumps(bad_audit))],
            "someone_elses_queue::/": [entry('{"hello": "world"}')],
        }
    )

    result = handler(event)

    assert (result["messages"], result["usage_inserted"], result["audit_inserted"]) == (10, 3, 1)
    assert result["dead_lettered"] == 6
    daily = users.execute("SELECT user_id::text, input_tokens, output_tokens FROM daily_usage ORDER BY 2")
    assert daily.fetchall() == [(ghost["userId"], 1, 1), (USER_B, 5, 4), (USER_A, 100, 10)]
    assert daily_usage_matches_events(users)
    dead = users.execute("SELECT queue, message_id, body, reason FROM dead_letters ORDER BY id").fetchall()
    assert [(q, r) for q, _, _, r in dead] == [
        ("usage_event", "body is not valid JSON (JSONDecodeError)"),
        ("usage_event", "inputTokens must be an integer between 0 and 2147483647"),
        ("usage_event", "data is not valid base64"),
        ("usage_event", "body is not UTF-8"),
        ("audit_event", "metadata contains characters PostgreSQL cannot store"),
        ("someone_elses_queue", "unknown queue 'someone_elses_queue'"),
    ]
    assert dead[0][1:3] == ("m-not-json", "not json at all")
    assert dead[2][2] == "%%%not-base64%%%"
    assert dead[3][2] == "base64:" + base64.b64encode(b"\xff\xfe\x00binary").decode()  # lossless
    assert json.loads(dead[4][2]) == bad_audit  # the raw body, escapes intact


def test_database_unreachable_raises_and_a_retry_succeeds(users: psycopg.Connection) -> None:
    event = sample("amazon-mq-usage.json")
    settings = get_settings()
    set_settings(settings.with_(database_url="postgresql://postgres@127.0.0.1:1/minichat?connect_timeout=1"))
    close_pool()
    try:
        with pytest.raises(ServiceUnavailable):
            handler(event)
    finally:
        set_settings(settings)
        close_pool()
    assert users.execute("SELECT count(*) FROM usage_events").fetchone() == (0,)

    assert handler(event)["usage_inserted"] == 4
    assert daily_usage_matches_events(users)


def test_database_lost_in_the_middle_of_a_batch_writes_nothing(users: psycopg.Connection) -> None:
    event = sample("amazon-mq-usage.json")
    event["rmqMessagesByQueue"].update(sample("amazon-mq-audit.json")["rmqMessagesByQueue"])
    event["rmqMessagesByQueue"]["usage_event::/"].append(entry("{broken"))
    outcome: dict[str, BaseException | None] = {}

    def run() -> None:
        try:
            handler(event)
            outcome["error"] = None
        except BaseException as exc:
            outcome["error"] = exc

    # Hold audit_logs: the batch writes its usage rows and its days, then waits on the audit insert,
    # where its backend is terminated — the usage rows already written must vanish with it.
    with psycopg.connect(get_settings().database_url) as blocker:
        blocker.execute("LOCK TABLE audit_logs IN EXCLUSIVE MODE")
        thread = threading.Thread(target=run)
        thread.start()
        pid = wait_for_lock_waiter(users, blocker.info.backend_pid)
        users.execute("SELECT pg_terminate_backend(%s)", (pid,))
        thread.join(10)
        blocker.rollback()

    assert isinstance(outcome["error"], ServiceUnavailable)
    assert snapshot(users) == {"usage_events": [], "daily_usage": [], "audit_logs": [], "dead_letters": []}

    retry = handler(event)
    assert (retry["usage_inserted"], retry["audit_inserted"], retry["dead_lettered"]) == (4, 3, 1)
    assert daily_usage_matches_events(users)


def wait_for_lock_waiter(db: psycopg.Connection, blocker_pid: int) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        row = db.execute(
            "SELECT pid FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid)) LIMIT 1", (blocker_pid,)
        ).fetchone()
        if row:
            return int(row[0])
        time.sleep(0.02)
    raise AssertionError("the handler never reached the locked table")


def test_concurrent_redeliveries_count_each_event_once(users: psycopg.Connection) -> None:
    bodies = [usage_body(USER_A if i % 2 else USER_B, inputTokens=i, outputTokens=1) for i in range(100)]
    event = mq_event({"usage_event::/": [entry(json.dumps(b)) for b in bodies]})
    results: list[dict[str, Any]] = []
    barrier = threading.Barrier(4)

    def run() -> None:
        barrier.wait()
        results.append(handler(copy.deepcopy(event)))

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert len(results) == 4
    assert sum(r["usage_inserted"] for r in results) == 100
    assert users.execute("SELECT sum(input_tokens) FROM daily_usage").fetchone() == (sum(range(100)),)
    assert daily_usage_matches_events(users)


@pytest.fixture
def with_usage(users: psycopg.Connection) -> Iterator[psycopg.Connection]:
    handler(sample("amazon-mq-usage.json"))
    yield users


def test_daily_totals_lists_every_day_and_the_range_totals(with_usage: psycopg.Connection) -> None:
    totals = daily_totals(with_usage, user_id=USER_A, day_from=date(2025, 1, 14), day_to=date(2025, 1, 16))
    assert totals == {
        "days": [
            {"day": "2025-01-14", "inputTokens": 0, "outputTokens": 0},
            {"day": "2025-01-15", "inputTokens": 1019, "outputTokens": 292},
            {"day": "2025-01-16", "inputTokens": 0, "outputTokens": 0},
        ],
        "totals": {"inputTokens": 1019, "outputTokens": 292},
    }
    other = daily_totals(with_usage, user_id=USER_B, day_from=date(2025, 1, 16), day_to=date(2025, 1, 16))
    assert other["totals"] == {"inputTokens": 5, "outputTokens": 6}


def test_daily_totals_of_inverted_or_huge_ranges(with_usage: psycopg.Connection) -> None:
    inverted = daily_totals(with_usage, user_id=USER_A, day_from=date(2025, 1, 2), day_to=date(2025, 1, 1))
    assert inverted == {"days": [], "totals": {"inputTokens": 0, "outputTokens": 0}}
    huge = daily_totals(with_usage, user_id=USER_A, day_from=date(2001, 1, 1), day_to=date(2025, 1, 16))
    assert len(huge["days"]) == 366 and huge["days"][0]["day"] == "2024-01-17"  # the last 366 days
    assert huge["totals"]["inputTokens"] == 1019
    year = daily_totals(with_usage, user_id=USER_A, day_from=date(2024, 1, 17), day_to=date(2025, 1, 16))
    assert len(year["days"]) == 366 and year["totals"]["inputTokens"] == 1019
