"""Rate limits, the daily token budget and Idempotency-Key, through the API."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from helpers import Api, EventStream, assert_error
from minichat import kv
from minichat.config import get_settings, set_settings


def test_login_is_limited_per_email_before_hashing(api: Api, settings_with: Any) -> None:
    user = api.register()
    settings_with(rate_login_email="3/60")
    codes = []
    for _ in range(3):
        r = api.http.post("/api/auth/login", json={"email": user.email.upper(), "password": "wrong password"})
        codes.append(r.status_code)
        assert r.headers["x-ratelimit-limit"] == "3"
    assert codes == [401, 401, 401]
    started = time.perf_counter()
    r = api.http.post("/api/auth/login", json={"email": user.email, "password": user.password})
    elapsed_ms = (time.perf_counter() - started) * 1000
    error = assert_error(r, 429, "rate_limited")
    assert 1 <= int(r.headers["retry-after"]) <= 20 and error["retryAfter"] == int(r.headers["retry-after"])
    assert r.headers["x-ratelimit-remaining"] == "0" and int(r.headers["x-ratelimit-reset"]) >= 1
    assert elapsed_ms < 15, "refused before the argon2 hash"
    # Another email is not affected by this email's limit.
    other = api.register()
    assert (
        api.http.post("/api/auth/login", json={"email": other.email, "password": other.password}).status_code
        == 200
    )


def test_login_is_limited_per_client_ip(api: Api, settings_with: Any) -> None:
    settings_with(rate_login_ip="4/60")
    codes = [
        api.http.post(
            "/api/auth/login", json={"email": f"u{i}@example.com", "password": "whatever!"}
        ).status_code
        for i in range(6)
    ]
    assert codes[:4] == [401] * 4 and codes[4:] == [429, 429]


def test_generation_creates_are_limited_per_user(api: Api, settings_with: Any) -> None:
    user, other = api.register(), api.register()
    chat = api.create_chat(user)
    settings_with(rate_generations="2/60")
    for _ in range(2):
        r = api.create_generation(user, chat["id"])
        assert r.status_code == 201
        api.request("POST", f"/api/generations/{r.json()['generationId']}/cancel", user=user)
    r = api.create_generation(user, chat["id"])
    assert_error(r, 429, "rate_limited")
    assert r.headers["x-ratelimit-limit"] == "2"
    other_chat = api.create_chat(other)
    assert api.create_generation(other, other_chat["id"]).status_code == 201


def test_every_other_call_is_limited_per_user(api: Api, settings_with: Any) -> None:
    user = api.register()
    settings_with(rate_api="5/60")
    statuses = [api.request("GET", "/api/chats", user=user).status_code for _ in range(7)]
    assert statuses == [200] * 5 + [429] * 2
    r = api.request("GET", "/api/auth/me", user=user)
    assert r.status_code == 429 and "retry-after" in r.headers


def test_the_limit_holds_under_concurrency(api: Api, settings_with: Any) -> None:
    user = api.register()
    settings_with(rate_api="10/60")
    statuses: list[int] = []
    barrier = threading.Barrier(20)

    def call() -> None:
        with httpx.Client(base_url=api.base_url, timeout=30) as client:
            barrier.wait()
            statuses.append(client.get("/api/chats", headers=user.headers).status_code)

    threads = [threading.Thread(target=call) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [200] * 10 + [429] * 10


@pytest.fixture
def redis_down() -> Iterator[None]:
    original = get_settings()
    kv.close_redis()
    set_settings(original.with_(redis_url="redis://127.0.0.1:1/0", rate_api="5/60", rate_login_email="1/60"))
    yield
    kv.close_redis()
    set_settings(original)


def test_without_redis_auth_and_reads_work_and_generation_creates_fail_closed(
    api: Api, redis_down: None
) -> None:
    user = api.register()
    for _ in range(3):
        assert (
            api.http.post(
                "/api/auth/login", json={"email": user.email, "password": user.password}
            ).status_code
            == 200
        )
    chat = api.create_chat(user)
    for _ in range(7):
        assert api.request("GET", f"/api/chats/{chat['id']}/messages", user=user).status_code == 200
    r = api.create_generation(user, chat["id"], content="hi")
    assert_error(r, 503, "service_unavailable")
    assert api.request("GET", f"/api/chats/{chat['id']}/messages", user=user).json()["items"] == []


def test_daily_token_budget(api: Api, db: Any, settings_with: Any) -> None:
    user = api.register()
    chat = api.create_chat(user)
    settings_with(daily_token_budget=100)
    usage = api.request("GET", "/api/usage", user=user).json()
    assert usage["budget"] == {"dailyTokens": 100, "usedToday": 0, "remainingToday": 100}
    db.execute(
        "INSERT INTO daily_usage (user_id, day, input_tokens, output_tokens)"
        " VALUES (%s, (now() AT TIME ZONE 'UTC')::date, 60, 40)",
        (user.user_id,),
    )
    r = api.create_generation(user, chat["id"], content="more")
    assert_error(r, 429, "quota_exceeded")
    assert api.request("GET", "/api/usage", user=user).json()["budget"]["remainingToday"] == 0
    assert db.execute("SELECT count(*) FROM generations").fetchone()[0] == 0
    settings_with(daily_token_budget=0)
    assert api.request("GET", "/api/usage", user=user).json()["budget"] is None


def test_idempotency_key_returns_the_first_response(api: Api, db: Any) -> None:
    user = api.register()
    headers = {"Idempotency-Key": "create-chat-1"}
    first = api.request("POST", "/api/chats", user=user, json={"title": "once"}, headers=headers)
    again = api.request("POST", "/api/chats", user=user, json={"title": "once"}, headers=headers)
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
    assert db.execute("SELECT count(*) FROM chats").fetchone()[0] == 1
    chat_id = first.json()["id"]
    path = f"/api/chats/{chat_id}/messages"
    m1 = api.request("POST", path, user=user, json={"content": "hi"}, headers={"Idempotency-Key": "m-1"})
    m2 = api.request("POST", path, user=user, json={"content": "hi"}, headers={"Idempotency-Key": "m-1"})
    assert m1.json() == m2.json() and db.execute("SELECT count(*) FROM messages").fetchone()[0] == 1
    g1 = api.create_generation(user, chat_id, headers={"Idempotency-Key": "g"}, content="x")
    g2 = api.create_generation(user, chat_id, headers={"Idempotency-Key": "g"}, content="x")
    assert g1.status_code == g2.status_code == 201 and g1.json()["generationId"] == g2.json()["generationId"]
    assert db.execute("SELECT count(*) FROM generations").fetchone()[0] == 1
    stream = EventStream(api.http, g2.json()["streamUrl"])
    assert stream.until_done()[-1][1]["status"] == "succeeded"
    stream.close()


def test_idempotency_key_with_another_body_is_refused(api: Api, db: Any) -> None:
    user, other = api.register(), api.register()
    headers = {"Idempotency-Key": "k"}
    assert (
        api.request("POST", "/api/chats", user=user, json={"title": "a"}, headers=headers).status_code == 201
    )
    r = api.request("POST", "/api/chats", user=user, json={"title": "b"}, headers=headers)
    assert_error(r, 409, "idempotency_key_reused")
    # Keys are per user: the same key from someone else is a new request.
    assert (
        api.request("POST", "/api/chats", user=other, json={"title": "b"}, headers=headers).status_code == 201
    )
    assert db.execute("SELECT count(*) FROM chats").fetchone()[0] == 2


def test_a_failed_first_attempt_frees_the_key(api: Api) -> None:
    user = api.register()
    headers = {"Idempotency-Key": "retry-me"}
    r = api.request("POST", "/api/chats", user=user, json={"title": "x" * 300}, headers=headers)
    assert r.status_code == 400
    assert (
        api.request("POST", "/api/chats", user=user, json={"title": "x" * 300}, headers=headers).status_code
        == 400
    )
    ok = api.request("POST", "/api/chats", user=user, json={"title": "fine"}, headers=headers)
    assert ok.status_code == 201


def test_concurrent_retries_with_one_key_create_one_chat(api: Api, db: Any) -> None:
    user = api.register()
    barrier = threading.Barrier(8)
    bodies: list[Any] = []

    def create() -> None:
        with httpx.Client(base_url=api.base_url, timeout=30) as client:
            barrier.wait()
            r = client.post(
                "/api/chats", headers={**user.headers, "Idempotency-Key": "same"}, json={"title": "t"}
            )
            bodies.append((r.status_code, r.json()))

    threads = [threading.Thread(target=create) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {status for status, _ in bodies} == {201}
    assert len({body["id"] for _, body in bodies}) == 1
    assert db.execute("SELECT count(*) FROM chats").fetchone()[0] == 1


def test_bad_idempotency_key(api: Api) -> None:
    user = api.register()
    r = api.request("POST", "/api/chats", user=user, json={}, headers={"Idempotency-Key": "x" * 256})
    assert assert_error(r, 400, "validation_error")["field"] == "Idempotency-Key"
