"""Usage end to end in local mode: generation → outbox → RabbitMQ → worker → daily_usage → GET /api/usage."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx

from helpers import Account, Api, assert_error, assert_usage_invariant, rabbitmqctl


def _generate(api: Api, user: Account, chat_id: str, content: str) -> None:
    finished = api.generate(user, chat_id, until_done=True, content=content)
    assert finished["events"][-1][1]["status"] == "succeeded"


def _wait_for(predicate: Any, timeout: float) -> float:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < timeout, "timed out"
        time.sleep(0.2)
    return time.monotonic() - started


def test_usage_reaches_the_api_through_the_worker(local_mode: Api, db: Any) -> None:
    api = local_mode
    user = api.register()
    chat = api.create_chat(user)
    _generate(api, user, chat["id"], "count these five words please")
    _wait_for(lambda: db.execute("SELECT count(*) FROM usage_events").fetchone()[0] == 1, 10)
    _wait_for(lambda: db.execute("SELECT count(*) FROM audit_logs").fetchone()[0] >= 4, 10)
    r = api.request("GET", "/api/usage", user=user)
    assert r.status_code == 200
    body = r.json()
    today = datetime.now(UTC).date()
    assert len(body["days"]) == 30 and body["days"][-1]["day"] == today.isoformat()
    assert body["days"][0]["day"] == (today - timedelta(days=29)).isoformat()
    assert body["totals"]["outputTokens"] == 5 and body["totals"]["inputTokens"] > 0
    assert body["days"][-1]["outputTokens"] == 5
    actions = {r[0] for r in db.execute("SELECT action FROM audit_logs WHERE user_id = %s", (user.user_id,))}
    assert {"user.registered", "chat.created", "generation.created", "generation.finished"} <= actions
    # Deleting the chat never changes usage totals.
    api.request("DELETE", f"/api/chats/{chat['id']}", user=user)
    assert api.request("GET", "/api/usage", user=user).json()["totals"] == body["totals"]
    assert_usage_invariant(db)


def test_usage_query_validation(local_mode: Api) -> None:
    api = local_mode
    user = api.register()
    r = api.request("GET", "/api/usage", user=user, params={"from": "2026-01-01", "to": "2026-01-03"})
    assert r.status_code == 200 and [d["day"] for d in r.json()["days"]] == [
        "2026-01-01",
        "2026-01-02",
        "2026-01-03",
    ]
    # Every pair of days is a range (what the schema allows is accepted): inverted is empty, a longer one
    # is its last 366 days.
    r = api.request("GET", "/api/usage", user=user, params={"from": "2026-02-01", "to": "2026-01-01"})
    assert r.status_code == 200 and r.json()["days"] == []
    r = api.request("GET", "/api/usage", user=user, params={"from": "2020-01-01", "to": "2026-01-01"})
    assert (
        r.status_code == 200 and r.json()["days"][0]["day"] == "2025-01-01" and len(r.json()["days"]) == 366
    )
    for params, field in [
        ({"from": "yesterday"}, "from"),
        ({"to": "2026-13-01"}, "to"),
        ({"userId": user.user_id}, "userId"),
    ]:
        assert (
            assert_error(api.request("GET", "/api/usage", user=user, params=params), 400, "validation_error")[
                "field"
            ]
            == field
        )
    assert_error(api.http.get("/api/usage"), 401, "unauthorized")


def test_broker_outage_delays_usage_but_loses_none(local_mode: Api, db: Any) -> None:
    """200 generations finish while RabbitMQ is stopped; after it starts again every usage event arrives."""
    api = local_mode
    users = [api.register() for _ in range(10)]
    chats = [api.create_chat(u)["id"] for u in users]
    rabbitmqctl("stop_app")
    try:

        def run(user: Account, chat_id: str) -> None:
            with httpx.Client(base_url=api.base_url, timeout=30) as http:
                client = Api.__new__(Api)
                client.base_url, client.http = api.base_url, http
                for i in range(20):
                    _generate(client, user, chat_id, f"word {i} and more")

        threads = [threading.Thread(target=run, args=(u, c)) for u, c in zip(users, chats, strict=True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert db.execute("SELECT count(*) FROM generations WHERE status = 'succeeded'").fetchone()[0] == 200
        assert db.execute("SELECT count(*) FROM usage_events").fetchone()[0] == 0
        pending = db.execute(
            "SELECT count(*) FROM outbox WHERE published_at IS NULL AND queue = 'usage_event'"
        )
        assert pending.fetchone()[0] == 200
    finally:
        rabbitmqctl("start_app")
    waited = _wait_for(lambda: db.execute("SELECT count(*) FROM usage_events").fetchone()[0] == 200, 60)
    print(f"all 200 usage events recorded {waited:.1f} s after the broker restart")
    assert_usage_invariant(db)
    total = db.execute("SELECT sum(output_tokens) FROM daily_usage").fetchone()[0]
    assert total == 200 * 4
    time.sleep(1.5)  # nothing arrives twice later either
    assert db.execute("SELECT count(*) FROM usage_events").fetchone()[0] == 200
    assert_usage_invariant(db)
