"""Issue 11, item 6: abandoned Idempotency-Key claims are taken over; the purge job deletes what has
outlived its keeping (expired keys, week-old published outbox rows, dead refresh tokens) in bounded
batches, on a schedule (AWS) and a timer (local mode)."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import psycopg
import pytest

from helpers import Api, assert_error
from minichat import idempotency, purge
from minichat_local.services import Background


def _user(db: psycopg.Connection) -> str:
    user_id = str(uuid.uuid4())
    db.execute(
        "INSERT INTO users (id, email, password_hash) VALUES (%s, %s, 'x')", (user_id, f"{user_id}@t.io")
    )
    return user_id


def _abandoned_claim(db: psycopg.Connection, user_id: str, key: str, age_s: float, body: bytes) -> None:
    """What a request that died after claiming its key leaves behind: a claim with no result."""
    fingerprint = idempotency.fingerprint(method="POST", path="/api/chats", body=body)
    db.execute(
        "INSERT INTO idempotency_keys (user_id, key, request_hash, created_at)"
        " VALUES (%s, %s, %s, now() - make_interval(secs => %s))",
        (user_id, key, fingerprint, age_s),
    )


def test_a_claim_without_a_result_is_taken_over_after_60_s(api: Api, db: psycopg.Connection) -> None:
    user = api.register()
    body = b'{"title": "retried"}'
    headers = {**user.headers, "Idempotency-Key": "crashed-once", "Content-Type": "application/json"}
    _abandoned_claim(db, user.user_id, "crashed-once", 61, body)

    started = time.perf_counter()
    r = api.http.post("/api/chats", content=body, headers=headers)
    assert r.status_code == 201, r.text  # not a 409 for the next 24 h
    assert time.perf_counter() - started < 2, "taken over at once, not after waiting"
    replay = api.http.post("/api/chats", content=body, headers=headers)
    assert replay.status_code == 201 and replay.headers["idempotent-replayed"] == "true"
    assert replay.json() == r.json()
    assert db.execute("SELECT count(*) FROM chats WHERE user_id = %s", (user.user_id,)).fetchone() == (1,)


def test_a_young_claim_still_blocks_its_retry(api: Api, db: psycopg.Connection) -> None:
    user = api.register()
    body = b'{"title": "in flight"}'
    _abandoned_claim(db, user.user_id, "still-running", 30, body)
    r = api.http.post(
        "/api/chats", content=body, headers={**user.headers, "Idempotency-Key": "still-running"}
    )
    assert_error(r, 409, "idempotency_key_reused")
    assert db.execute("SELECT count(*) FROM chats WHERE user_id = %s", (user.user_id,)).fetchone() == (0,)


def test_a_first_request_that_ends_after_the_takeover_cannot_touch_the_new_claim(
    db: psycopg.Connection,
) -> None:
    user_id = _user(db)
    digest = idempotency.fingerprint(method="POST", path="/api/chats", body=b"{}")
    first = idempotency.claim(user_id=user_id, key="k", request_hash=digest)
    assert isinstance(first, idempotency.Claim)
    db.execute("UPDATE idempotency_keys SET created_at = now() - interval '61 seconds'")
    second = idempotency.claim(user_id=user_id, key="k", request_hash=digest)
    assert isinstance(second, idempotency.Claim) and second.claim_id != first.claim_id

    idempotency.store(first, status=201, body={"late": True})  # the first request, finishing late
    idempotency.release(first)
    idempotency.store(second, status=201, body={"retry": True})
    replay = idempotency.claim(user_id=user_id, key="k", request_hash=digest)
    assert replay == idempotency.Replay(status=201, body={"retry": True})


def _fill(db: psycopg.Connection, *, old: int, user_id: str) -> None:
    """`old` rows of each kind due for the purge, and rows of each kind that must stay."""
    db.execute(
        "INSERT INTO idempotency_keys (user_id, key, request_hash, created_at)"
        " SELECT %s, 'old-' || i, '\\x00', now() - interval '25 hours' FROM generate_series(1, %s) i",
        (user_id, old),
    )
    db.execute(
        "INSERT INTO idempotency_keys (user_id, key, request_hash, created_at)"
        " VALUES (%s, 'fresh', '\\x00', now() - interval '23 hours')",
        (user_id,),
    )
    db.execute(
        "INSERT INTO outbox (event_id, queue, payload, created_at, published_at)"
        " SELECT gen_random_uuid(), 'audit_event', '{}', now() - interval '9 days', now() - interval '8 days'"
        " FROM generate_series(1, %s)",
        (old,),
    )
    db.execute(
        "INSERT INTO outbox (event_id, queue, payload, created_at, published_at) VALUES"
        " (gen_random_uuid(), 'audit_event', '{\"keep\": \"recent\"}', now() - interval '6 days',"
        "  now() - interval '6 days'),"
        " (gen_random_uuid(), 'usage_event', '{\"keep\": \"pending\"}', now() - interval '30 days', NULL)"
    )
    db.execute(
        "INSERT INTO refresh_tokens (family_id, user_id, token_hash, expires_at)"
        " SELECT gen_random_uuid(), %s, sha256(('expired-' || i)::bytea), now() - interval '1 second'"
        " FROM generate_series(1, %s) i",
        (user_id, old),
    )
    family = str(uuid.uuid4())
    db.execute(
        "INSERT INTO refresh_tokens (family_id, user_id, token_hash, expires_at, revoked_at, rotated_at)"
        " VALUES (gen_random_uuid(), %(u)s, sha256('revoked-long-ago'), now() + interval '20 days',"
        "         now() - interval '2 days', NULL),"
        "        (gen_random_uuid(), %(u)s, sha256('revoked-just-now'), now() + interval '20 days',"
        "         now() - interval '1 hour', NULL),"
        "        (%(f)s, %(u)s, sha256('live-rotated'), now() + interval '20 days', NULL, now()),"
        "        (%(f)s, %(u)s, sha256('live-current'), now() + interval '20 days', NULL, NULL)",
        {"u": user_id, "f": family},
    )


def _left(db: psycopg.Connection) -> dict[str, Any]:
    return {
        "keys": [r[0] for r in db.execute("SELECT key FROM idempotency_keys ORDER BY key")],
        "outbox": sorted(r[0]["keep"] for r in db.execute("SELECT payload FROM outbox")),
        "tokens": sorted(
            r[0]
            for r in db.execute(
                "SELECT t FROM unnest(ARRAY['revoked-long-ago', 'revoked-just-now', 'live-rotated',"
                " 'live-current']) t JOIN refresh_tokens ON token_hash = sha256(t::bytea)"
            )
        ),
    }


def test_the_purge_deletes_each_kind_in_bounded_batches(db: psycopg.Connection) -> None:
    user_id = _user(db)
    _fill(db, old=2500, user_id=user_id)

    assert purge.purge(time_budget=0) == {"idempotencyKeys": 0, "outbox": 0, "refreshTokens": 0}
    statements: list[int] = []
    original = dict(purge._KINDS)

    def counting(fn: Any) -> Any:
        def run(conn: Any, *, limit: int) -> int:
            deleted = int(fn(conn, limit=limit))
            statements.append(deleted)
            return deleted

        return run

    purge._KINDS.update({kind: counting(fn) for kind, fn in original.items()})
    try:
        started = time.perf_counter()
        counts = purge.purge()
        elapsed = time.perf_counter() - started
    finally:
        purge._KINDS.update(original)

    assert counts == {"idempotencyKeys": 2500, "outbox": 2500, "refreshTokens": 2501}
    assert max(statements) == purge.BATCH == 1000  # never more than a batch per statement
    assert len(statements) == 9  # 1000, 1000, 500 (+1 revoked) for each kind
    assert _left(db) == {
        "keys": ["fresh"],
        "outbox": ["pending", "recent"],
        "tokens": ["live-current", "live-rotated", "revoked-just-now"],
    }
    assert purge.purge() == {"idempotencyKeys": 0, "outbox": 0, "refreshTokens": 0}
    print(f"purge: 7,501 rows in 9 batches, {elapsed * 1000:.0f} ms")


def test_the_scheduled_handler_keeps_within_the_invocation(db: psycopg.Connection) -> None:
    user_id = _user(db)
    _fill(db, old=10, user_id=user_id)

    class Context:
        def get_remaining_time_in_millis(self) -> int:
            return 60_000

    assert purge.purge_handler({"source": "aws.events"}, Context()) == {
        "idempotencyKeys": 10,
        "outbox": 10,
        "refreshTokens": 11,
    }


class _NoConsumer:
    def start(self) -> None: ...

    def stop(self) -> None: ...


@pytest.mark.usefixtures("broker_vhost")
def test_local_mode_runs_the_purge_on_a_timer(db: psycopg.Connection) -> None:
    user_id = _user(db)
    _fill(db, old=5, user_id=user_id)
    background = Background(purge_interval=0.2)
    background.consumer = _NoConsumer()  # type: ignore[assignment]
    background.start()
    try:
        assert "minichat-purge" in {t.name for t in threading.enumerate()}
        deadline = time.monotonic() + 10
        while db.execute("SELECT count(*) FROM idempotency_keys").fetchone() != (1,):
            assert time.monotonic() < deadline, "the local timer never purged"
            time.sleep(0.05)
        # It keeps going: what expires later is purged by a later round.
        db.execute("UPDATE idempotency_keys SET created_at = now() - interval '2 days'")
        while db.execute("SELECT count(*) FROM idempotency_keys").fetchone() != (0,):
            assert time.monotonic() < deadline, "the timer stopped after one round"
            time.sleep(0.05)
    finally:
        background.stop()
