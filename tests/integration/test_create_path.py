"""The create's cost and the stream open's (round trips), and the daily budget's counter in Redis (issue 15;
SPEC §2, §4, §7.4)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from helpers import Account, Api, EventStream, assert_error
from minichat import budget, generations, kv, limits
from minichat.config import get_settings, set_settings
from minichat_local.roundtrips import recording


def _cancel(api: Api, user: Account, response: httpx.Response) -> None:
    assert response.status_code == 201, response.text
    api.request("POST", f"/api/generations/{response.json()['generationId']}/cancel", user=user)


def _today_usage(db: Any, user: Account, tokens: int) -> None:
    db.execute(
        "INSERT INTO daily_usage (user_id, day, input_tokens, output_tokens)"
        " VALUES (%s, (now() AT TIME ZONE 'UTC')::date, %s, 0)"
        " ON CONFLICT (user_id, day) DO UPDATE SET input_tokens = EXCLUDED.input_tokens",
        (user.user_id, tokens),
    )


@pytest.mark.parametrize("daily_budget", [0, 1_000_000])
def test_a_create_costs_two_round_trips(api: Api, settings_with: Any, daily_budget: int) -> None:
    settings_with(daily_token_budget=daily_budget)
    user = api.register()
    chats = [api.create_chat(user)["id"] for _ in range(4)]
    for chat_id in chats[:3]:  # warm: pools, the script known to Redis, the budget's counter seeded
        _cancel(api, user, api.create_generation(user, chat_id, content="hello"))
    with recording() as trips:
        r = api.create_generation(user, chats[3], content="hello")
    assert r.status_code == 201, r.text
    # One Redis script (limits, budget, lock), one pipelined transaction; the target is 3 at most.
    assert (trips.redis, trips.postgres) == (1, 1), (trips.summary(), dict(trips.redis_callers))
    _cancel(api, user, r)
    # An edit and a regenerate take the same path: the same two round trips.
    api.generate(user, chats[0], until_done=True, content="again")
    path = api.request("GET", f"/api/chats/{chats[0]}/messages", user=user).json()["items"]
    for body in ({"regenerateOf": path[-1]["id"]}, {"content": "edited", "editOf": path[-2]["id"]}):
        with recording() as trips:
            r = api.create_generation(user, chats[0], **body)
        assert r.status_code == 201, r.text
        assert trips.total <= 3 and trips.redis == 1, trips.summary()
        _cancel(api, user, r)


def test_a_refused_create_is_rolled_back_whole(api: Api, db: Any, redis_client: Any) -> None:
    user, other = api.register(), api.register()
    chat = api.create_chat(user)
    first = api.create_generation(user, chat["id"], content="first")
    assert first.status_code == 201
    # The lock lost: the partial unique index refuses the generation, and the message sent with it goes.
    redis_client.delete(limits.inflight_key(user.user_id))
    r = api.create_generation(user, chat["id"], content="second")
    assert assert_error(r, 409, "generation_in_flight")["generationId"] == first.json()["generationId"]
    assert [row[0] for row in db.execute("SELECT content FROM messages ORDER BY seq")] == ["first"]
    assert redis_client.get(limits.inflight_key(user.user_id)) is None  # our lock was given back
    # Someone else's chat: 404 from the first statement, nothing after it runs.
    r = api.create_generation(other, chat["id"], content="intruder")
    assert_error(r, 404, "not_found")
    assert db.execute("SELECT count(*) FROM messages").fetchone()[0] == 1
    assert db.execute("SELECT count(*) FROM generations").fetchone()[0] == 1


def test_a_create_refused_before_it_starts_still_counts_against_the_limit(
    api: Api, settings_with: Any
) -> None:
    user = api.register()
    chat = api.create_chat(user)
    settings_with(rate_generations="1/60")
    assert_error(api.create_generation(user, chat["id"], temperature=9), 400, "validation_error")
    r = api.create_generation(user, chat["id"], content="now")
    assert_error(r, 429, "rate_limited")
    assert r.headers["x-ratelimit-limit"] == "1" and int(r.headers["retry-after"]) >= 1


def test_the_budget_counter_is_seeded_from_the_database_when_lost(
    api: Api, db: Any, redis_client: Any, settings_with: Any
) -> None:
    settings_with(daily_token_budget=100)
    user = api.register()
    chat = api.create_chat(user)
    _today_usage(db, user, 60)
    _cancel(api, user, api.create_generation(user, chat["id"], content="within"))  # seeded: 60 of 100
    counter = budget.keys(user.user_id, budget.today()).counter
    assert redis_client.get(counter) == b"60"
    # Redis restarted (every key gone) while the worker recorded more: the next create seeds again.
    redis_client.flushdb()
    _today_usage(db, user, 100)
    r = api.create_generation(user, chat["id"], content="over")
    error = assert_error(r, 429, "quota_exceeded")
    assert "100" in error["message"] and int(r.headers["retry-after"]) >= 1
    assert redis_client.get(counter) == b"100"


def test_the_budget_counter_is_refreshed_and_never_goes_back(
    api: Api, db: Any, redis_client: Any, settings_with: Any
) -> None:
    settings_with(daily_token_budget=100)
    user = api.register()
    chat = api.create_chat(user)
    _cancel(api, user, api.create_generation(user, chat["id"], content="a"))  # seeded at 0
    keys = budget.keys(user.user_id, budget.today())
    # Usage the worker recorded after the seeding is picked up once the counter is due a refresh...
    _today_usage(db, user, 100)
    _cancel(api, user, api.create_generation(user, chat["id"], content="b"))  # not yet: the counter is fresh
    redis_client.delete(keys.fresh)
    assert_error(api.create_generation(user, chat["id"], content="c"), 429, "quota_exceeded")
    # ...and a database that lags behind the counter never lowers it.
    redis_client.set(keys.counter, 150)
    redis_client.delete(keys.fresh)
    assert_error(api.create_generation(user, chat["id"], content="d"), 429, "quota_exceeded")
    assert redis_client.get(keys.counter) == b"150"
    usage = api.request("GET", "/api/usage", user=user).json()["budget"]
    assert usage == {"dailyTokens": 100, "usedToday": 150, "remainingToday": 0}


def test_concurrent_creates_overspend_the_budget_by_one_generation_at_most(
    api: Api, db: Any, settings_with: Any
) -> None:
    settings_with(daily_token_budget=1)  # any answer uses it up
    user = api.register()
    chats = [api.create_chat(user)["id"] for _ in range(8)]
    barrier = threading.Barrier(len(chats))
    replies: list[httpx.Response] = []

    def create(chat_id: str) -> None:
        with httpx.Client(base_url=api.base_url, timeout=30) as client:
            barrier.wait()
            replies.append(
                client.post(f"/api/chats/{chat_id}/generations", headers=user.headers, json={"content": "hi"})
            )

    threads = [threading.Thread(target=create, args=(chat_id,)) for chat_id in chats]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    created = [r for r in replies if r.status_code == 201]
    assert len(created) == 1 and sorted(r.status_code for r in replies) == [201] + [409] * 7
    stream = EventStream(api.http, created[0].json()["streamUrl"])
    assert stream.until_done()[-1][1]["status"] == "succeeded"
    stream.close()
    # The answer is counted as it ends (no worker runs here: daily_usage stays empty), so the very next
    # create is refused: the budget was overspent by that one generation, no more.
    assert db.execute("SELECT count(*) FROM daily_usage").fetchone()[0] == 0
    for chat_id in chats[:3]:
        assert_error(api.create_generation(user, chat_id, content="more"), 429, "quota_exceeded")
    used = api.request("GET", "/api/usage", user=user).json()["budget"]
    assert used["usedToday"] >= 1 and used["remainingToday"] == 0
    assert db.execute("SELECT count(*) FROM generations").fetchone()[0] == 1


@pytest.fixture
def redis_down() -> Iterator[None]:
    original = get_settings()
    kv.close_redis()
    set_settings(original.with_(redis_url="redis://127.0.0.1:1/0", daily_token_budget=100))
    yield
    kv.close_redis()
    set_settings(original)


def test_without_redis_a_create_with_a_budget_fails_closed_and_writes_nothing(
    api: Api, db: Any, redis_down: None
) -> None:
    user = api.register()
    chat = api.create_chat(user)
    for body in ({"content": "hi"}, {"temperature": 9}):  # also when the body is refused first
        r = api.create_generation(user, chat["id"], **body)
        assert_error(r, 503, "service_unavailable")
        assert r.headers["retry-after"] == "1"
    assert db.execute("SELECT count(*) FROM messages").fetchone()[0] == 0
    assert db.execute("SELECT count(*) FROM generations").fetchone()[0] == 0
    # Reads fail open: the usage report shows what the database has.
    assert api.request("GET", "/api/usage", user=user).json()["budget"]["usedToday"] == 0


def test_a_refused_batch_leaves_its_connection_usable(db: Any) -> None:
    """A refusal aborts the pipeline before the statements after it, which psycopg takes for prepared on
    their fifth use: the connection must forget them, or every later use of them fails on it."""
    from psycopg import errors as pg_errors

    from minichat import db as database

    outcomes = []
    for i in range(120):  # enough rounds for each of the pool's connections to pass the fifth use
        try:
            with database.batch() as conn:
                conn.execute("SELECT minichat_refuse(CASE WHEN %s THEN 'test' END)", (i % 3 == 2,))
                cur = conn.execute("SELECT %s::int + 1 AS n", (i,))
            outcomes.append(cur.fetchone()["n"] == i + 1)
        except pg_errors.RaiseException as exc:
            outcomes.append(exc.diag.constraint_name == "test")
    assert all(outcomes)


def test_a_batch_whose_block_raises_commits_nothing(db: Any) -> None:
    """A batch has no BEGIN: its pipeline's Sync ends an implicit transaction. When the block raises after
    queuing a write, the write must not be committed by that Sync."""
    from minichat import db as database

    email = f"abandoned-{uuid.uuid4().hex[:8]}@example.com"
    with pytest.raises(ZeroDivisionError), database.batch() as conn:
        conn.execute("INSERT INTO users (email, password_hash) VALUES (%s, 'x')", (email,))
        raise ZeroDivisionError  # a bug in the block, after the insert was queued
    assert db.execute("SELECT count(*) FROM users WHERE email = %s", (email,)).fetchone()[0] == 0
    with database.batch() as conn:  # the connection is usable, and a block that ends commits
        conn.execute("INSERT INTO users (email, password_hash) VALUES (%s, 'x')", (email,))
    assert db.execute("SELECT count(*) FROM users WHERE email = %s", (email,)).fetchone()[0] == 1


def test_a_stream_open_claims_with_its_history_in_one_round_trip(api: Api) -> None:
    """The stream's claim and the history the model sees: one statement, one round trip (issue 15)."""
    user = api.register()
    chat_id = api.create_chat(user)["id"]
    api.generate(user, chat_id, until_done=True, content="first question")
    other = api.register()  # the pool warmed by another user's claim (a claimed run holds its user's lock)
    warm = api.create_generation(other, api.create_chat(other)["id"], content="warm")
    assert warm.status_code == 201, warm.text
    generations.open_for_stream(generation_id=warm.json()["generationId"], user_id=other.user_id)
    r = api.create_generation(user, chat_id, content="second question")
    assert r.status_code == 201, r.text
    generation_id = r.json()["generationId"]
    with recording() as trips:
        row, history = generations.open_for_stream(generation_id=generation_id, user_id=user.user_id)
    assert trips.postgres == 1 and trips.redis == 0, (trips.summary(), trips.postgres_statements)
    assert row["status"] == "streaming"
    assert history is not None and [role for role, _ in history] == ["user", "assistant", "user"]
    assert history[0][1] == "first question" and history[-1][1] == "second question"
    with recording() as trips:  # a second connection finds it claimed: the row alone, the same one trip
        again, none = generations.open_for_stream(generation_id=generation_id, user_id=user.user_id)
    assert trips.postgres == 1 and none is None and again["status"] == "streaming", trips.summary()
