"""Auth routes against the real PostgreSQL: register, login, refresh rotation and reuse, logout, me."""

from __future__ import annotations

import hashlib
import statistics
import threading
import time
from typing import Any

import httpx
import jwt
import pytest

from helpers import Api, assert_error
from minichat.config import get_settings, set_settings

PASSWORD = "correct horse battery"


def test_register_returns_the_auth_shape_and_never_the_hash(api: Api, db: Any) -> None:
    r = api.http.post("/api/auth/register", json={"email": "Ada@Example.com", "password": PASSWORD})
    assert r.status_code == 201, r.text
    body = r.json()
    assert set(body) == {"user", "accessToken", "refreshToken", "tokenType", "expiresIn"}
    assert body["tokenType"] == "Bearer" and body["expiresIn"] == 900
    assert set(body["user"]) == {"id", "email", "createdAt"}
    assert body["user"]["email"] == "Ada@Example.com"
    assert body["user"]["createdAt"].endswith("Z")
    assert "argon2" not in r.text and PASSWORD not in r.text
    stored = db.execute("SELECT password_hash FROM users").fetchone()[0]
    assert stored.startswith("$argon2id$v=19$m=19456,t=2,p=1$")


def test_access_token_claims(api: Api) -> None:
    user = api.register()
    header = jwt.get_unverified_header(user.access)
    claims = jwt.decode(user.access, options={"verify_signature": False})
    assert header["alg"] == "HS256"
    assert claims["iss"] == "minichat" and claims["aud"] == "minichat-api"
    assert claims["sub"] == user.user_id and claims["typ"] == "access"
    assert claims["exp"] - claims["iat"] == 900


def test_refresh_token_is_stored_only_as_sha256(api: Api, db: Any) -> None:
    user = api.register()
    assert len(user.refresh) >= 43  # 256 bits, base64url
    rows = db.execute("SELECT token_hash FROM refresh_tokens").fetchall()
    assert [bytes(r[0]) for r in rows] == [hashlib.sha256(user.refresh.encode()).digest()]
    dump = str(db.execute("SELECT * FROM refresh_tokens").fetchall())
    assert user.refresh not in dump


def test_email_taken_in_any_letter_case(api: Api) -> None:
    api.register("grace@example.com")
    r = api.http.post("/api/auth/register", json={"email": "GRACE@example.COM", "password": PASSWORD})
    assert_error(r, 409, "email_taken")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"password": PASSWORD}, "email"),
        ({"email": "a@example.com"}, "password"),
        ({"email": "not-an-email", "password": PASSWORD}, "email"),
        ({"email": "a" * 250 + "@x.io", "password": PASSWORD}, "email"),
        ({"email": "a@example.com", "password": "short"}, "password"),
        ({"email": "a@example.com", "password": "p" * 129}, "password"),
        ({"email": "a@example.com", "password": 12345678}, "password"),
        ({"email": "a@example.com", "password": PASSWORD, "role": "admin"}, "role"),
        ({"email": "a@example.com", "password": PASSWORD, "userId": "x"}, "userId"),
    ],
)
def test_register_validation(api: Api, db: Any, body: dict[str, Any], field: str) -> None:
    error = assert_error(api.http.post("/api/auth/register", json=body), 400, "validation_error")
    assert error["field"] == field
    assert db.execute("SELECT count(*) FROM users").fetchone()[0] == 0


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b'"text"', b""])
def test_register_needs_a_json_object(api: Api, raw: bytes) -> None:
    assert_error(api.http.post("/api/auth/register", content=raw), 400, "invalid_json")


def test_twenty_concurrent_registrations_of_one_email(api: Api, db: Any) -> None:
    statuses: list[int] = []
    barrier = threading.Barrier(20)

    def attempt(i: int) -> None:
        with httpx.Client(base_url=api.base_url, timeout=30) as client:
            barrier.wait()
            email = "race@example.com" if i % 2 else "RACE@example.com"
            statuses.append(
                client.post("/api/auth/register", json={"email": email, "password": PASSWORD}).status_code
            )

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(statuses) == [201] + [409] * 19
    assert db.execute("SELECT count(*) FROM users").fetchone()[0] == 1


def test_login(api: Api) -> None:
    user = api.register("linus@example.com")
    r = api.http.post("/api/auth/login", json={"email": "LINUS@example.com", "password": PASSWORD})
    assert r.status_code == 200, r.text
    assert r.json()["user"]["id"] == user.user_id
    assert r.json()["refreshToken"] != user.refresh
    assert_error(
        api.http.post("/api/auth/login", json={"email": "linus@example.com", "password": PASSWORD + "x"}),
        401,
        "invalid_credentials",
    )
    assert_error(
        api.http.post("/api/auth/login", json={"email": "nobody@example.com", "password": PASSWORD}),
        401,
        "invalid_credentials",
    )


def test_login_time_does_not_reveal_whether_the_email_exists(api: Api) -> None:
    api.register("timing@example.com")
    times: dict[str, list[float]] = {"known": [], "unknown": []}
    # Interleaved, so a burst of load elsewhere on the machine hits both sides alike.
    for _ in range(9):
        for kind, email in (("known", "timing@example.com"), ("unknown", "nobody-here@example.com")):
            started = time.perf_counter()
            r = api.http.post("/api/auth/login", json={"email": email, "password": "wrong password!"})
            times[kind].append((time.perf_counter() - started) * 1000)
            assert r.status_code == 401
    known, unknown = statistics.median(times["known"]), statistics.median(times["unknown"])
    # Both pay for one argon2id verification (~20+ ms); a skipped hash would be ~1 ms: a ratio of 20+.
    assert unknown > 10 and known > 10
    assert 1 / 3 < unknown / known < 3, (known, unknown)


def test_me(api: Api) -> None:
    user = api.register()
    r = api.request("GET", "/api/auth/me", user=user)
    assert r.status_code == 200
    assert r.json() == {"id": user.user_id, "email": user.email, "createdAt": r.json()["createdAt"]}
    assert_error(api.http.get("/api/auth/me"), 401, "unauthorized")
    assert_error(api.http.get("/api/auth/me", headers={"Authorization": "Basic abc"}), 401, "unauthorized")
    assert_error(api.http.get("/api/auth/me", headers={"Authorization": "Bearer nope"}), 401, "invalid_token")


def _forge(claims: dict[str, Any], *, key: bytes | str | None = None, alg: str = "HS256") -> str:
    return jwt.encode(claims, key if key is not None else get_settings().jwt_secret, algorithm=alg)


def _claims(user_id: str, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {
        "iss": "minichat",
        "aud": "minichat-api",
        "sub": user_id,
        "iat": now,
        "exp": now + 600,
        "typ": "access",
    }
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def test_forged_and_misused_tokens_are_refused(api: Api) -> None:
    user = api.register()
    header_b64 = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0"  # {"alg":"none","typ":"JWT"}
    payload = user.access.split(".")[1]
    cases = {
        "alg none": f"{header_b64}.{payload}.",
        "wrong key": _forge(_claims(user.user_id), key=b"k" * 48),
        "wrong aud": _forge(_claims(user.user_id, aud="someone-else")),
        "wrong iss": _forge(_claims(user.user_id, iss="evil")),
        "expired": _forge(_claims(user.user_id, iat=int(time.time()) - 2000, exp=int(time.time()) - 1000)),
        "no exp": _forge(_claims(user.user_id, exp=None)),
        "not access": _forge(_claims(user.user_id, typ="refresh")),
        "HS512": _forge(_claims(user.user_id), key=get_settings().jwt_secret * 2, alg="HS512"),
        "refresh as access": user.refresh,
        "tampered": user.access[:-3] + ("AAA" if not user.access.endswith("AAA") else "BBB"),
    }
    for name, token in cases.items():
        r = api.http.get("/api/auth/me", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 401, name
        assert r.json()["error"]["code"] == "invalid_token", name
    assert api.request("GET", "/api/auth/me", user=user).status_code == 200


def _refresh(api: Api, token: str) -> httpx.Response:
    return api.http.post("/api/auth/refresh", json={"refreshToken": token})


def test_refresh_rotates(api: Api) -> None:
    user = api.register()
    r = _refresh(api, user.refresh)
    assert r.status_code == 200, r.text
    pair = r.json()
    assert pair["refreshToken"] != user.refresh and pair["user"]["id"] == user.user_id
    assert (
        api.http.get("/api/auth/me", headers={"Authorization": f"Bearer {pair['accessToken']}"}).status_code
        == 200
    )
    second = _refresh(api, pair["refreshToken"])
    assert second.status_code == 200


@pytest.fixture
def no_grace() -> Any:
    """Reuse of a rotated token is treated as theft at once (the 10 s grace is for racing tabs)."""
    original = get_settings()
    set_settings(original.with_(refresh_reuse_grace=0))
    yield
    set_settings(original)


def test_reused_refresh_token_revokes_the_family(api: Api, db: Any, no_grace: Any) -> None:
    user = api.register()
    newer = _refresh(api, user.refresh).json()["refreshToken"]
    time.sleep(0.01)
    assert_error(_refresh(api, user.refresh), 401, "invalid_token")
    # The thief's reuse ended the whole family: the legitimate newer token is dead too.
    assert_error(_refresh(api, newer), 401, "invalid_token")
    revoked = db.execute("SELECT count(*) FROM refresh_tokens WHERE revoked_at IS NOT NULL").fetchone()[0]
    assert revoked == 2
    # Other sessions (other families) of the same user are untouched.
    login = api.http.post("/api/auth/login", json={"email": user.email, "password": user.password})
    assert _refresh(api, login.json()["refreshToken"]).status_code == 200


def test_reuse_within_grace_is_refused_but_keeps_the_family(api: Api) -> None:
    user = api.register()
    newer = _refresh(api, user.refresh).json()["refreshToken"]
    assert_error(_refresh(api, user.refresh), 401, "invalid_token")
    assert _refresh(api, newer).status_code == 200


def test_refresh_family_absolute_lifetime(api: Api, db: Any) -> None:
    user = api.register()
    newer = _refresh(api, user.refresh).json()["refreshToken"]
    lifetimes = db.execute("SELECT DISTINCT expires_at FROM refresh_tokens").fetchall()
    assert len(lifetimes) == 1  # rotation never extends the family
    db.execute("UPDATE refresh_tokens SET expires_at = now() - interval '1 second'")
    assert_error(_refresh(api, newer), 401, "invalid_token")


@pytest.mark.parametrize(
    "body", [{}, {"refreshToken": ""}, {"refreshToken": 5}, {"refreshToken": "x", "a": 1}]
)
def test_refresh_validation(api: Api, body: dict[str, Any]) -> None:
    assert_error(api.http.post("/api/auth/refresh", json=body), 400, "validation_error")


def test_unknown_refresh_token(api: Api) -> None:
    assert_error(_refresh(api, "x" * 43), 401, "invalid_token")


def test_logout_revokes_the_family(api: Api) -> None:
    user = api.register()
    newer = _refresh(api, user.refresh).json()["refreshToken"]
    r = api.request("POST", "/api/auth/logout", user=user, json={"refreshToken": newer})
    assert r.status_code == 204 and r.content == b""
    assert_error(_refresh(api, newer), 401, "invalid_token")
    assert_error(api.http.post("/api/auth/logout", json={"refreshToken": newer}), 401, "unauthorized")


def test_logout_cannot_revoke_another_users_session(api: Api) -> None:
    alice, mallory = api.register(), api.register()
    r = api.request("POST", "/api/auth/logout", user=mallory, json={"refreshToken": alice.refresh})
    assert r.status_code == 204
    assert _refresh(api, alice.refresh).status_code == 200


def test_auth_writes_audit_events_to_the_outbox(api: Api, db: Any) -> None:
    user = api.register()
    api.http.post("/api/auth/login", json={"email": user.email, "password": user.password})
    rows = db.execute("SELECT queue, payload FROM outbox ORDER BY id").fetchall()
    assert [(q, p["action"], p["userId"]) for q, p in rows] == [
        ("audit_event", "user.registered", user.user_id),
        ("audit_event", "user.login", user.user_id),
    ]
