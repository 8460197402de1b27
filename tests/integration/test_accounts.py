"""Accounts and limits (SPEC §7.4): deleting an account, stream connections per user, login limits that
nobody can use to lock someone else out."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import redis.asyncio

from helpers import Account, Api, EventStream, assert_error
from minichat import accounts, limits
from minichat.config import get_settings

LONG = " ".join(f"w{i}" for i in range(150))  # mock-slow: 200 ms a word, half a minute in all


def _start(api: Api, user: Account, content: str, model: str = "mock-echo") -> dict[str, Any]:
    return api.generate(user, content=content, model=model)


def _rows(db: Any, table: str, user_id: str) -> int:
    return int(db.execute(f"SELECT count(*) FROM {table} WHERE user_id = %s", (user_id,)).fetchone()[0])


def test_deleting_the_account_ends_its_generation_keeps_usage_and_refuses_every_token(
    api: Api, db: Any, redis_client: Any
) -> None:
    user = api.register()
    bystander = api.register()
    finished = _start(api, user, "an earlier answer")
    assert EventStream(api.http, finished["streamUrl"]).until_done()[-1][1]["status"] == "succeeded"
    # What the worker made of the user's events so far: it must outlive the account.
    day = datetime.now(UTC).date()
    db.execute(
        "INSERT INTO usage_events (id, user_id, generation_id, model, input_tokens, output_tokens,"
        " occurred_at) VALUES (%s, %s, %s, 'mock-echo', 5, 3, now())",
        (str(uuid.uuid4()), user.user_id, finished["generationId"]),
    )
    db.execute(
        "INSERT INTO daily_usage (user_id, day, input_tokens, output_tokens) VALUES (%s, %s, 5, 3)",
        (user.user_id, day),
    )
    db.execute(
        "INSERT INTO audit_logs (id, user_id, action, created_at) VALUES (%s, %s, 'user.login', now())",
        (str(uuid.uuid4()), user.user_id),
    )
    running = _start(api, user, LONG, model="mock-slow")
    stream = EventStream(api.http, running["streamUrl"])
    assert stream.next()[1]["type"] == "delta"  # it is streaming
    # An access token this process has verified (and caches) before the deletion.
    assert api.request("GET", "/api/chats", user=user).status_code == 200

    assert_error(api.request("DELETE", "/api/auth/me", user=user, json={}), 400, "validation_error")
    wrong = api.request("DELETE", "/api/auth/me", user=user, json={"password": "not the password"})
    assert_error(wrong, 401, "invalid_credentials")
    assert api.request("GET", "/api/auth/me", user=user).status_code == 200  # nothing happened

    started = time.perf_counter()
    r = api.request("DELETE", "/api/auth/me", user=user, json={"password": user.password})
    elapsed = time.perf_counter() - started
    assert r.status_code == 204, r.text

    # The running generation was ended first: its stream ends, canceled, with its usage.
    tail = stream.until_done()
    stream.close()
    assert tail[-1][1] == {"type": "done", "status": "canceled"}
    assert tail[-2][1]["type"] == "usage" and tail[-2][1]["outputTokens"] > 0
    usage_payloads = [
        row[0]
        for row in db.execute("SELECT payload FROM outbox WHERE queue = 'usage_event' ORDER BY id").fetchall()
    ]
    assert running["generationId"] in {p["generationId"] for p in usage_payloads}  # counted, not lost
    audit = {row[0]["action"] for row in db.execute("SELECT payload FROM outbox WHERE queue = 'audit_event'")}
    assert "user.deleted" in audit

    for table in ("chats", "generations", "refresh_tokens", "idempotency_keys"):
        assert _rows(db, table, user.user_id) == 0, table
    assert db.execute("SELECT count(*) FROM users WHERE id = %s", (user.user_id,)).fetchone()[0] == 0
    assert db.execute(
        "SELECT count(*) FROM messages m WHERE NOT EXISTS (SELECT 1 FROM chats c WHERE c.id = m.chat_id)"
    ).fetchone() == (0,)
    for table in ("usage_events", "daily_usage", "audit_logs"):
        assert _rows(db, table, user.user_id) == 1, table

    def every_token_is_refused() -> None:
        calls = [
            ("GET", "/api/auth/me", None),
            ("GET", "/api/chats", None),
            ("POST", "/api/chats", {"title": "after"}),
            ("GET", f"/api/generations/{running['generationId']}", None),
            ("POST", "/api/auth/logout", {"refreshToken": user.refresh}),
            ("DELETE", "/api/auth/me", {"password": user.password}),
        ]
        for method, path, body in calls:
            assert_error(api.request(method, path, user=user, json=body), 401, "invalid_token")
        r = api.http.post("/api/auth/refresh", json={"refreshToken": user.refresh})
        assert_error(r, 401, "invalid_token")
        for url, headers in (
            (finished["streamUrl"], {}),  # a ticket
            (f"/api/generations/{finished['generationId']}/stream", user.headers),  # the bearer token
        ):
            assert_error(api.http.get(url, headers=headers), 401, "invalid_token")

    every_token_is_refused()
    # Should Redis lose the account's marker, writes and streams still refuse the tokens (never a 500).
    assert redis_client.delete(accounts.deleted_key(user.user_id)) == 1
    r = api.request("POST", "/api/chats", user=user, json={"title": "after"})
    assert_error(r, 401, "invalid_token")
    r = api.request("POST", "/api/chats", user=user, json={}, headers={"Idempotency-Key": "k-1"})
    assert_error(r, 401, "invalid_token")
    assert_error(api.http.get(finished["streamUrl"]), 401, "invalid_token")
    assert_error(api.request("GET", "/api/auth/me", user=user), 401, "invalid_token")

    # Others are untouched, and the email is free again.
    assert api.request("GET", "/api/chats", user=bystander).status_code == 200
    api.register(email=user.email)
    print(f"account deletion with a running generation: {elapsed * 1000:.0f} ms")


def test_a_deletion_that_cannot_reach_redis_deletes_nothing(api: Api, db: Any, settings_with: Any) -> None:
    from minichat import kv

    user = api.register()
    kv.close_redis()
    settings_with(redis_url="redis://127.0.0.1:1/0")
    try:
        r = api.request("DELETE", "/api/auth/me", user=user, json={"password": user.password})
    finally:
        kv.close_redis()
    assert_error(r, 503, "service_unavailable")
    assert db.execute("SELECT count(*) FROM users WHERE id = %s", (user.user_id,)).fetchone() == (1,)


def _client(api: Api, source: str) -> httpx.Client:
    """A client whose connections come from `source` (any 127.0.0.x is this machine)."""
    return httpx.Client(
        base_url=api.base_url, timeout=30, transport=httpx.HTTPTransport(local_address=source)
    )


def test_failed_logins_elsewhere_never_lock_the_owner_out(api: Api, settings_with: Any) -> None:
    owner = api.register()
    settings_with(rate_login_email="3/60")
    with _client(api, "127.0.0.2") as attacker, _client(api, "127.0.0.3") as home:
        codes = [
            attacker.post(
                "/api/auth/login", json={"email": owner.email, "password": "guess-guess"}
            ).status_code
            for _ in range(5)
        ]
        assert codes == [401, 401, 401, 429, 429]
        r = attacker.post("/api/auth/login", json={"email": owner.email, "password": owner.password})
        assert_error(r, 429, "rate_limited")  # that address, for that email, waits
        assert int(r.headers["retry-after"]) >= 1
        # The owner, from their own address, is never refused because of it.
        for _ in range(3):
            r = home.post("/api/auth/login", json={"email": owner.email, "password": owner.password})
            assert r.status_code == 200, r.text
        # Successful logins are not failures: they never use up the owner's allowance.
        assert (
            home.post("/api/auth/login", json={"email": owner.email, "password": "typo-typo"}).status_code
            == 401
        )


def test_every_attempt_counts_per_client_address(api: Api, settings_with: Any) -> None:
    user = api.register()
    settings_with(rate_login_ip="4/60")
    with _client(api, "127.0.0.4") as busy, _client(api, "127.0.0.5") as other:
        codes = [
            busy.post("/api/auth/login", json={"email": user.email, "password": user.password}).status_code
            for _ in range(5)
        ]
        assert codes == [200] * 4 + [429]
        r = other.post("/api/auth/login", json={"email": user.email, "password": user.password})
        assert r.status_code == 200


def test_at_most_eight_stream_connections_per_user(api: Api) -> None:
    assert get_settings().max_streams_per_user == 8
    user, other = api.register(), api.register()
    earlier = _start(api, user, "an earlier answer")
    assert EventStream(api.http, earlier["streamUrl"]).until_done()[-1][1]["status"] == "succeeded"
    running = _start(api, user, LONG, model="mock-slow")
    streams = [EventStream(api.http, running["streamUrl"]) for _ in range(8)]
    try:
        assert all(s.response.status_code == 200 for s in streams)
        r = api.http.get(running["streamUrl"])
        error = assert_error(r, 429, "rate_limited")
        assert int(r.headers["retry-after"]) >= 1 and error["retryAfter"] == int(r.headers["retry-after"])
        # All generations together: another generation's stream of the same user is refused as well.
        assert_error(api.http.get(earlier["streamUrl"]), 429, "rate_limited")
        others = _start(api, other, "hello")
        assert api.http.get(others["streamUrl"]).status_code == 200  # another user is not affected
        streams.pop().close()
        deadline = time.monotonic() + 5
        while True:  # the slot is given back as the connection closes
            ninth = EventStream(api.http, running["streamUrl"])
            if ninth.response.status_code == 200:
                streams.append(ninth)
                break
            ninth.close()
            assert time.monotonic() < deadline, "the closed connection's slot never came back"
            time.sleep(0.05)
    finally:
        for stream in streams:
            stream.close()
        api.request("POST", f"/api/generations/{running['generationId']}/cancel", user=user)


def test_connections_of_a_crashed_process_stop_counting_when_their_lease_ends(redis_client: Any) -> None:
    async def scenario() -> tuple[list[int], int, int]:
        client = redis.asyncio.Redis.from_url(os.environ["REDIS_URL"])
        user_id, gone = str(uuid.uuid4()), accounts.deleted_key(str(uuid.uuid4()))
        try:
            # Eight connections of a process that then dies: nobody gives their slots back.
            taken = [
                await limits.open_stream_async(
                    client, user_id=user_id, connection_id=f"c{i}", limit=8, unless_exists=gone, lease_ms=300
                )
                for i in range(9)
            ]
            await asyncio.sleep(0.4)
            after = await limits.open_stream_async(
                client, user_id=user_id, connection_id="new", limit=8, unless_exists=gone
            )
            await client.set(gone, b"1")
            deleted = await limits.open_stream_async(
                client, user_id=user_id, connection_id="x", limit=8, unless_exists=gone
            )
            return taken, after, deleted
        finally:
            await client.aclose()

    taken, after, deleted = asyncio.run(scenario())
    assert taken == [1] * 8 + [0]
    assert after == 1
    assert deleted == -1
