"""The security suite, through local mode, with the database compared before and after each attack.

- every route with another user's ids: 404 exactly as for a missing id, and nothing changes;
- forged and misused tokens on every secured route (alg none, wrong key, aud, iss, expired, refresh
  token or stream ticket as an access token, ...): 401;
- mass assignment on every body: 400 naming the field, nothing applied;
- oversized, deeply nested and malformed bodies and parameters: 413 / 400, never a 500;
- SQL and header injection in every string field, parameter and id: stored verbatim or refused, never
  executed; CR/LF never reaches a response header.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import jwt
import pytest

from helpers import Account, Api, EventStream, assert_error, text_of
from minichat import limits
from minichat.config import get_settings
from minichat.validate import cursor_pattern, encode_cursor

TABLES = (
    "users",
    "refresh_tokens",
    "chats",
    "generations",
    "messages",
    "usage_events",
    "daily_usage",
    "audit_logs",
    "outbox",
    "dead_letters",
    "idempotency_keys",
)


def snapshot(db: Any) -> dict[str, list[Any]]:
    """Every row of every table (the attacks must leave all of them as they were)."""
    return {table: db.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall() for table in TABLES}


def assert_clean_headers(response: httpx.Response) -> None:
    """No header was smuggled into the reply and no header value carries a line break."""
    for name, value in response.headers.raw:
        assert b"\r" not in value and b"\n" not in value, (name, value)
        assert name.lower() not in {b"set-cookie", b"x-injected"}, (name, value)
    assert response.headers["x-request-id"]


def strip_request_id(response: httpx.Response) -> dict[str, Any]:
    error = dict(response.json()["error"])
    error.pop("requestId")
    return error


@dataclass
class World:
    owner: Account
    mallory: Account
    chat: dict[str, Any]  # the owner's chat with a finished generation
    busy_chat: dict[str, Any]  # the owner's chat whose generation is still queued
    done_generation: str
    queued_generation: str
    queued_stream_url: str


@pytest.fixture
def world(api: Api, db: Any) -> World:
    owner, mallory = api.register(), api.register()
    chat = api.create_chat(owner, "private plans")
    api.request("POST", f"/api/chats/{chat['id']}/messages", user=owner, json={"content": "secret one"})
    finished = api.generate(owner, chat["id"], until_done=True, content="secret two")
    done = finished["generationId"]
    assert finished["events"][-1][1]["status"] == "succeeded"
    busy = api.create_chat(owner, "private busy")
    r = api.create_generation(owner, busy["id"], content="secret three")
    assert r.status_code == 201, r.text
    db.execute(
        "INSERT INTO daily_usage (user_id, day, input_tokens, output_tokens)"
        " VALUES (%s, (now() AT TIME ZONE 'UTC')::date, 10, 20)",
        (owner.user_id,),
    )
    return World(owner, mallory, chat, busy, done, r.json()["generationId"], r.json()["streamUrl"])


def _finish_queued(api: Api, world: World) -> None:
    """The owner's queued generation still runs to its end (nothing the attacks did touched it)."""
    stream = EventStream(api.http, world.queued_stream_url)
    events = stream.until_done()
    stream.close()
    assert events[-1][1] == {"type": "done", "status": "succeeded"}
    assert text_of(events) == "secret three"


# --- another user's ids --------------------------------------------------------------------------------


def _id_routes(chat: str, generation: str) -> list[tuple[str, str, Any]]:
    return [
        ("GET", f"/api/chats/{chat}", None),
        ("PATCH", f"/api/chats/{chat}", {"title": "hacked"}),
        ("DELETE", f"/api/chats/{chat}", None),
        ("GET", f"/api/chats/{chat}/messages", None),
        ("GET", f"/api/chats/{chat}/messages?limit=1", None),
        ("POST", f"/api/chats/{chat}/messages", {"content": "injected"}),
        ("POST", f"/api/chats/{chat}/generations", {"content": "injected"}),
        ("POST", f"/api/chats/{chat}/generations", None),
        ("GET", f"/api/generations/{generation}", None),
        ("POST", f"/api/generations/{generation}/cancel", None),
        ("GET", f"/api/generations/{generation}/stream", None),
        ("GET", f"/api/generations/{generation}/stream?lastEventId=1", None),
    ]


def test_every_route_with_another_users_ids_is_not_found_and_changes_nothing(
    api: Api, db: Any, redis_client: Any, world: World
) -> None:
    before = snapshot(db)
    lock_before = limits.inflight_holder(redis_client, world.owner.user_id)
    assert lock_before == world.queued_generation
    targets = [
        (world.chat["id"], world.done_generation),
        (world.busy_chat["id"], world.queued_generation),
        (world.chat["id"].upper(), world.queued_generation.upper()),  # the same ids, spelled otherwise
    ]
    missing = (str(uuid.uuid4()), str(uuid.uuid4()))
    attempts = 0
    for chat_id, generation_id in targets:
        for (method, path, body), (_, missing_path, _) in zip(
            _id_routes(chat_id, generation_id), _id_routes(*missing), strict=True
        ):
            headers = {**world.mallory.headers, "Idempotency-Key": f"k-{attempts}"}
            r = api.http.request(method, path, json=body, headers=headers)
            assert_error(r, 404, "not_found")
            assert "private" not in r.text and "secret" not in r.text
            # The same answer as for an id that never existed: nothing tells the two apart.
            ghost = api.http.request(method, missing_path, json=body, headers=headers)
            assert strip_request_id(r) == strip_request_id(ghost), (method, path)
            attempts += 1
    # Tickets are no way around it: mallory's own ticket opens only mallory's generation.
    mine = api.create_chat(world.mallory)
    r = api.create_generation(world.mallory, mine["id"])
    ticket = r.json()["streamUrl"].split("ticket=")[1]
    for generation_id in (world.done_generation, world.queued_generation):
        assert_error(
            api.http.get(f"/api/generations/{generation_id}/stream?ticket={ticket}"), 401, "invalid_token"
        )
    api.request("POST", f"/api/generations/{r.json()['generationId']}/cancel", user=world.mallory)
    # Logging out with the owner's refresh token revokes nothing of the owner's.
    r = api.request(
        "POST", "/api/auth/logout", user=world.mallory, json={"refreshToken": world.owner.refresh}
    )
    assert r.status_code == 204
    after = snapshot(db)
    for table in TABLES:
        if table in {"chats", "generations", "audit_logs", "outbox", "refresh_tokens", "messages"}:
            # mallory's own chat and generation (created and canceled above) are the only additions
            ours = [row for row in after[table] if row not in before[table]]
            assert all(world.owner.user_id not in str(row) for row in ours), (table, ours)
            assert all(row in after[table] for row in before[table]), table
        else:
            assert after[table] == before[table], table
    assert redis_client.get(f"generation:{world.queued_generation}:cancel") is None
    assert limits.inflight_holder(redis_client, world.owner.user_id) == world.queued_generation
    # The owner's things are as they were, and the queued generation runs.
    assert (
        api.request("GET", f"/api/chats/{world.chat['id']}", user=world.owner).json()["title"]
        == "private plans"
    )
    assert (
        api.request("POST", "/api/auth/refresh", json={"refreshToken": world.owner.refresh}).status_code
        == 200
    )
    _finish_queued(api, world)


def test_routes_without_ids_answer_only_about_the_caller(api: Api, db: Any, world: World) -> None:
    before = snapshot(db)
    mallory = world.mallory
    assert api.request("GET", "/api/chats", user=mallory).json() == {"items": [], "nextCursor": None}
    # Query parameters cannot name another user: ignored, or refused where unknown ones are refused.
    r = api.request("GET", f"/api/chats?userId={world.owner.user_id}", user=mallory)
    assert r.json()["items"] == []
    usage = api.request("GET", "/api/usage", user=mallory).json()
    assert usage["totals"] == {"inputTokens": 0, "outputTokens": 0}
    assert api.request("GET", "/api/usage", user=world.owner).json()["totals"] == {
        "inputTokens": 10,
        "outputTokens": 20,
    }
    r = api.request("GET", f"/api/usage?userId={world.owner.user_id}", user=mallory)
    assert assert_error(r, 400, "validation_error")["field"] == "userId"
    me = api.request("GET", "/api/auth/me", user=mallory, headers={"X-User-Id": world.owner.user_id})
    assert me.json()["id"] == mallory.user_id
    models = api.request("GET", f"/api/models?userId={world.owner.user_id}", user=mallory)
    assert models.status_code == 200
    assert models.json() == api.request("GET", "/api/models", user=world.owner).json()
    assert snapshot(db) == before


# --- tokens ----------------------------------------------------------------------------------------------


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


def _claims(user_id: str, **overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {"iss": "minichat", "aud": "minichat-api", "sub": user_id, "iat": now, "exp": now + 600}
    claims["typ"] = "access"
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _sign(claims: dict[str, Any], *, key: bytes | None = None, alg: str = "HS256") -> str:
    return jwt.encode(claims, key if key is not None else get_settings().jwt_secret, algorithm=alg)


def _forged_tokens(world: World) -> dict[str, str]:
    owner = world.owner.user_id
    valid_payload, signature = world.owner.access.split(".")[1:]
    now = int(time.time())
    secret = get_settings().jwt_secret
    tokens = {
        f"alg {alg}": f"{_b64({'alg': alg, 'typ': 'JWT'})}.{valid_payload}."
        for alg in ("none", "None", "NONE")
    }
    tokens |= {
        "alg none with a signature": f"{_b64({'alg': 'none'})}.{valid_payload}.{signature}",
        "alg RS256 header on an HMAC signature": f"{_b64({'alg': 'RS256', 'typ': 'JWT'})}.{valid_payload}."
        + world.owner.access.split(".")[2],
        "HS512 with the right key": _sign(_claims(owner), key=secret * 2, alg="HS512"),
        "wrong key": _sign(_claims(owner), key=b"k" * 48),
        "bad signature": world.owner.access[:-6]
        + ("AAAAAA" if not world.owner.access.endswith("AAAAAA") else "BBBBBB"),
        "wrong aud": _sign(_claims(owner, aud="someone-else")),
        "stream aud": _sign(_claims(owner, aud="minichat-api:stream")),
        "wrong iss": _sign(_claims(owner, iss="evil")),
        "expired": _sign(_claims(owner, iat=now - 2000, exp=now - 1000)),
        "not yet valid": _sign(_claims(owner, nbf=now + 3600)),
        "no exp": _sign(_claims(owner, exp=None)),
        "no iat": _sign(_claims(owner, iat=None)),
        "no sub": _sign(_claims(owner, sub=None)),
        "sub not a uuid": _sign(_claims(owner, sub="' OR 1=1 --")),
        "typ refresh": _sign(_claims(owner, typ="refresh")),
        "typ stream": _sign(_claims(owner, typ="stream")),
        "no typ": _sign(_claims(owner, typ=None)),
        "refresh token as access token": world.owner.refresh,
        "stream ticket as access token": world.queued_stream_url.split("ticket=")[1],
        "tampered payload": world.mallory.access.split(".")[0]
        + "."
        + _b64({**jwt.decode(world.mallory.access, options={"verify_signature": False}), "sub": owner})
        + "."
        + world.mallory.access.split(".")[2],
        "truncated": world.owner.access[:-10],
        "garbage": "a.b.c",
    }
    return tokens


def _secured_requests(world: World) -> list[tuple[str, str, Any]]:
    chat, generation = world.chat["id"], world.queued_generation
    return [
        ("POST", "/api/auth/logout", {"refreshToken": world.owner.refresh}),
        ("GET", "/api/auth/me", None),
        ("DELETE", "/api/auth/me", {"password": world.owner.password}),
        ("GET", "/api/chats", None),
        ("POST", "/api/chats", {"title": "forged"}),
        ("GET", f"/api/chats/{chat}", None),
        ("PATCH", f"/api/chats/{chat}", {"title": "forged"}),
        ("DELETE", f"/api/chats/{chat}", None),
        ("GET", f"/api/chats/{chat}/messages", None),
        ("POST", f"/api/chats/{chat}/messages", {"content": "forged"}),
        ("POST", f"/api/chats/{chat}/generations", {"content": "forged"}),
        ("GET", f"/api/generations/{generation}", None),
        ("GET", f"/api/generations/{generation}/stream", None),
        ("POST", f"/api/generations/{generation}/cancel", None),
        ("GET", "/api/models", None),
        ("GET", "/api/usage", None),
    ]


def test_secured_routes_are_the_documented_ones(world: World) -> None:
    from test_openapi import DOCUMENT_PATH, PUBLIC

    document = json.loads(DOCUMENT_PATH.read_text())
    documented = {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
        if method != "parameters"
    }
    covered = {
        (
            method,
            path.replace(world.chat["id"], "{chat_id}").replace(world.queued_generation, "{generation_id}"),
        )
        for method, path, _ in _secured_requests(world)
    }
    assert covered == documented - PUBLIC


def test_forged_and_misused_tokens_are_refused_on_every_route(api: Api, db: Any, world: World) -> None:
    before = snapshot(db)
    for name, token in _forged_tokens(world).items():
        for method, path, body in _secured_requests(world):
            r = api.http.request(method, path, json=body, headers={"Authorization": f"Bearer {token}"})
            error = assert_error(r, 401, "invalid_token")
            assert r.headers["www-authenticate"] == 'Bearer realm="minichat"', (name, path)
            assert error["message"], (name, path)
    for header in ("", "Bearer", "Basic " + base64.b64encode(b"a:b").decode(), "Token abc"):
        for method, path, body in _secured_requests(world):
            r = api.http.request(method, path, json=body, headers={"Authorization": header})
            assert_error(r, 401, "unauthorized")
    assert snapshot(db) == before
    assert api.request("GET", "/api/auth/me", user=world.owner).status_code == 200
    _finish_queued(api, world)


def test_forged_stream_tickets_are_refused(api: Api, db: Any, world: World) -> None:
    owner = world.owner.user_id
    generation = world.queued_generation
    now = int(time.time())

    def ticket(**overrides: Any) -> str:
        claims = {**_claims(owner, aud="minichat-api:stream", typ="stream"), "gen": generation, **overrides}
        return _sign({k: v for k, v in claims.items() if v is not None})

    real = world.queued_stream_url.split("ticket=")[1]
    forged = {
        "alg none": f"{_b64({'alg': 'none'})}.{real.split('.')[1]}.",
        "wrong key": _sign(jwt.decode(real, options={"verify_signature": False}), key=b"k" * 48),
        "expired": ticket(iat=now - 9000, exp=now - 10),
        "for another generation": ticket(gen=world.done_generation),
        "no generation": ticket(gen=None),
        "access aud": ticket(aud="minichat-api"),
        "access token": world.owner.access,
        "refresh token": world.owner.refresh,
        "typ access": ticket(typ="access"),
        "garbage": "x",
    }
    before = snapshot(db)
    for name, value in forged.items():
        r = api.http.get(f"/api/generations/{generation}/stream", params={"ticket": value})
        assert assert_error(r, 401, "invalid_token")["message"], name
    assert snapshot(db) == before  # no forged ticket started the generation
    _finish_queued(api, world)


def test_an_access_token_is_no_refresh_token(api: Api, db: Any, world: World) -> None:
    before = snapshot(db)
    for token in (world.owner.access, world.queued_stream_url.split("ticket=")[1]):
        assert_error(api.http.post("/api/auth/refresh", json={"refreshToken": token}), 401, "invalid_token")
    assert snapshot(db) == before


# --- mass assignment -------------------------------------------------------------------------------------

FORBIDDEN = [
    "userId",
    "user_id",
    "id",
    "status",
    "role",
    "createdAt",
    "updatedAt",
    "chatId",
    "generationId",
    "inputTokens",
    "outputTokens",
    "passwordHash",
    "password_hash",
    "isAdmin",
    "requestId",
    "__proto__",
    "constructor",
    "Title",
    "title ",
    "",
]


def _body_requests(world: World) -> list[tuple[str, str, dict[str, Any]]]:
    owner = world.owner
    return [
        ("POST", "/api/auth/register", {"email": "new@example.com", "password": "correct horse battery"}),
        ("POST", "/api/auth/login", {"email": owner.email, "password": owner.password}),
        ("POST", "/api/auth/refresh", {"refreshToken": owner.refresh}),
        ("POST", "/api/auth/logout", {"refreshToken": owner.refresh}),
        ("POST", "/api/chats", {"title": "t"}),
        ("PATCH", f"/api/chats/{world.chat['id']}", {"title": "t"}),
        ("POST", f"/api/chats/{world.chat['id']}/messages", {"content": "c"}),
        ("POST", f"/api/chats/{world.chat['id']}/generations", {"content": "c", "model": "mock-echo"}),
    ]


def test_mass_assignment_is_refused_and_nothing_is_applied(api: Api, db: Any, world: World) -> None:
    before = snapshot(db)
    for method, path, body in _body_requests(world):
        for name in FORBIDDEN:
            for value in (world.mallory.user_id, "succeeded", "assistant", True, {"$set": 1}, None):
                r = api.request(method, path, user=world.owner, json={**body, name: value})
                error = assert_error(r, 400, "validation_error")
                assert error["field"] == name, (path, name)
        # Nested objects where strings belong are no way in either.
        for field in body:
            r = api.request(
                method, path, user=world.owner, json={**body, field: {"userId": world.mallory.user_id}}
            )
            assert assert_error(r, 400, "validation_error")["field"] == field
    # A message's role is always `user`.
    r = api.request(
        "POST",
        f"/api/chats/{world.chat['id']}/messages",
        user=world.owner,
        json={"content": "x", "role": "system"},
    )
    assert assert_error(r, 400, "validation_error")["field"] == "role"
    assert snapshot(db) == before


def test_query_and_headers_cannot_assign_either(api: Api, db: Any, world: World) -> None:
    mallory, owner = world.mallory, world.owner
    smuggled = {"userId": owner.user_id, "user_id": owner.user_id, "status": "succeeded", "role": "assistant"}
    headers = {"X-User-Id": owner.user_id, "X-Forwarded-User": owner.user_id, "X-Role": "admin"}
    chat = api.request(
        "POST", "/api/chats", user=mallory, params=smuggled, headers=headers, json={"title": "m"}
    )
    assert chat.status_code == 201
    owner_of = db.execute("SELECT user_id FROM chats WHERE id = %s", (chat.json()["id"],)).fetchone()[0]
    assert str(owner_of) == mallory.user_id
    message = api.request(
        "POST",
        f"/api/chats/{chat.json()['id']}/messages",
        user=mallory,
        params=smuggled,
        json={"content": "hi"},
    )
    assert message.status_code == 201 and message.json()["role"] == "user"
    assert api.request("GET", "/api/chats", user=owner).json()["items"][0]["title"] != "m"


# --- size, depth and shape -------------------------------------------------------------------------------

LIMIT = 256 * 1024


def test_oversized_bodies_are_413_on_every_body_route(api: Api, db: Any, world: World) -> None:
    before = snapshot(db)
    for method, path, body in _body_requests(world):
        field = next(iter(body))
        big = json.dumps({**body, field: "x" * (LIMIT + 1)})
        r = api.request(method, path, user=world.owner, content=big)
        assert_error(r, 413, "payload_too_large")

        def chunks(field: str = field) -> Iterator[bytes]:  # no Content-Length: the limit holds while reading
            yield b'{"' + field.encode() + b'": "'
            for _ in range(LIMIT // 4096 + 1):
                yield b"y" * 4096
            yield b'"}'

        assert_error(api.request(method, path, user=world.owner, content=chunks()), 413, "payload_too_large")
        # A body exactly at the limit is read (and then judged on its content).
        padded = json.dumps(body)
        padded += " " * (LIMIT - len(padded.encode()))
        r = api.request(method, path, user=world.owner, content=padded)
        assert r.status_code != 413, path
    assert db.execute("SELECT count(*) FROM users WHERE email = 'new@example.com'").fetchone()[0] == 1
    assert snapshot(db)["generations"] == before["generations"]


def test_a_declared_length_over_the_limit_is_refused_before_reading(server: str) -> None:
    url = urlsplit(server)
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(
            b"POST /api/auth/register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {LIMIT * 4}\r\n\r\n".encode()
            + b'{"email": "'
        )
        head = sock.recv(65536).split(b"\r\n\r\n")[0]
    assert head.startswith(b"HTTP/1.1 413"), head


def _malformed_bodies() -> dict[str, bytes]:
    return {
        "33 levels": b'{"title": ' + b"[" * 33 + b"]" * 33 + b"}",
        "100k levels": b'{"title": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        "deep objects": b'{"title": ' + b'{"a": ' * 2000 + b"1" + b"}" * 2000 + b"}",
        "wide": json.dumps({f"k{i}": i for i in range(15_000)}).encode(),  # just under 256 KiB
        "huge number literal": b'{"title": ' + b"9" * 5000 + b"}",
        "huge exponent": b'{"temperature": 1e999999}',
        "not utf-8": b'{"title": "\xff\xfe"}',
        "utf-16": '{"title": "x"}'.encode("utf-16"),
        "bom": b'\xef\xbb\xbf{"title": "x"}',
        "array": b"[]",
        "string": b'"x"',
        "null": b"null",
        "number": b"1",
        "NaN": b'{"temperature": NaN}',
        "trailing garbage": b'{"title": "x"} {"title": "y"}',
        "unterminated": b'{"title": "x',
    }


@pytest.mark.parametrize("name", list(_malformed_bodies()))
def test_malformed_and_nested_bodies_are_400_everywhere(api: Api, db: Any, world: World, name: str) -> None:
    raw = _malformed_bodies()[name]
    before = snapshot(db)
    for method, path, _ in _body_requests(world):
        r = api.request(method, path, user=world.owner, content=raw)
        assert r.status_code == 400, (name, path, r.status_code, r.text[:200])
        assert r.json()["error"]["code"] in {"validation_error", "invalid_json"}
    assert snapshot(db) == before


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 10**400),
        ("temperature", -(10**400)),
        ("maxTokens", 10**400),
        ("maxTokens", 2**63),
        ("temperature", 1e308),
        ("maxTokens", 1e300),
        ("content", "\ud800 lone surrogate"),
        ("systemPrompt", "x\udfff"),
        ("model", "\ud83d"),
        ("content", "nul \x00 inside"),
        ("systemPrompt", "\x00"),
    ],
)
def test_out_of_range_values_are_400_never_500(
    api: Api, db: Any, world: World, field: str, value: Any
) -> None:
    before = snapshot(db)
    chat = world.chat["id"]
    body = json.dumps({"content": "hi", field: value}).encode()  # json.dumps keeps surrogates as \\u escapes
    r = api.request("POST", f"/api/chats/{chat}/generations", user=world.owner, content=body)
    assert assert_error(r, 400, "validation_error")["field"] == field
    assert snapshot(db) == before


@pytest.mark.parametrize("value", ["\ud800", "a\udfffb", "x\x00y"])
def test_unstorable_text_is_refused_in_every_string_field(
    api: Api, db: Any, world: World, value: str
) -> None:
    before = snapshot(db)
    owner, chat = world.owner, world.chat["id"]
    cases = [
        ("/api/auth/register", {"email": f"a{value}@x.io", "password": "correct horse battery"}, "email"),
        ("/api/auth/register", {"email": "ok@x.io", "password": f"correct horse {value}"}, "password"),
        ("/api/auth/login", {"email": owner.email, "password": f"pw {value} pw pw"}, "password"),
        ("/api/auth/refresh", {"refreshToken": value}, "refreshToken"),
        ("/api/chats", {"title": value}, "title"),
        (f"/api/chats/{chat}/messages", {"content": value}, "content"),
    ]
    for path, body, field in cases:
        r = api.request("POST", path, user=owner, content=json.dumps(body).encode())
        assert assert_error(r, 400, "validation_error")["field"] == field, path
    r = api.request("PATCH", f"/api/chats/{chat}", user=owner, content=json.dumps({"title": value}).encode())
    assert assert_error(r, 400, "validation_error")["field"] == "title"
    assert snapshot(db) == before


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/api/chats?limit=" + "9" * 5000, "limit"),
        ("/api/chats?limit=%EF%BC%91", "limit"),  # a fullwidth digit one
        ("/api/chats?limit=" + quote("\u0661"), "limit"),  # an Arabic-Indic digit one
        ("/api/chats?cursor=" + "A" * 30_000, "cursor"),
        ("/api/usage?from=" + "2" * 5000, "from"),
        ("/api/usage?to=2024-W01-1", "to"),
        ("/api/usage?to=", "to"),
    ],
)
def test_hostile_query_parameters_are_400(api: Api, world: World, path: str, field: str) -> None:
    r = api.request("GET", path, user=world.owner)
    assert assert_error(r, 400, "validation_error")["field"] == field


def test_every_pair_of_days_is_a_usage_range(api: Api, world: World) -> None:
    """What the schema allows is accepted: inverted ranges are empty, long ones their last 366 days."""
    r = api.request("GET", "/api/usage?to=0001-01-01&from=9999-12-31", user=world.owner)
    assert r.status_code == 200 and r.json()["days"] == [], r.text
    assert r.json()["totals"] == {"inputTokens": 0, "outputTokens": 0}
    r = api.request("GET", "/api/usage?from=0001-01-01&to=9999-12-31", user=world.owner)
    days = [d["day"] for d in r.json()["days"]]
    assert len(days) == 366 and days[0] == "9998-12-31" and days[-1] == "9999-12-31"


def test_the_earliest_days_are_a_valid_usage_range(api: Api, world: World) -> None:
    r = api.request("GET", "/api/usage?to=0001-01-05", user=world.owner)
    assert r.status_code == 200, r.text
    assert [d["day"] for d in r.json()["days"]] == [f"0001-01-0{i}" for i in range(1, 6)]


@pytest.mark.parametrize(
    "bad_id",
    [
        "x" * 10_000,
        "6f9619ff8b86d011b42d00c04fc964ff",  # a UUID's digits, not a UUID's spelling
        "{6f9619ff-8b86-d011-b42d-00c04fc964ff}",
        "urn:uuid:6f9619ff-8b86-d011-b42d-00c04fc964ff",
        "6f9619ff-8b86-d011-b42d-00c04fc964ff ",
        "6f9619ff-8b86-d011-b42d-00c04fc964ff\x0b",
        "%00",
        "..%2F..%2Fhealth",
        "' OR '1'='1",
    ],
)
def test_hostile_path_ids_are_not_found(api: Api, world: World, bad_id: str) -> None:
    encoded = quote(bad_id, safe="%")
    for method, path, body in _id_routes(encoded, encoded):
        r = api.request(method, path, user=world.owner, json=body)
        assert_error(r, 404, "not_found")
        assert_clean_headers(r)


# --- SQL injection ---------------------------------------------------------------------------------------

SQL = [
    "' OR '1'='1",
    "'; DROP TABLE users; --",
    "x'); DELETE FROM chats; --",
    '" OR ""="',
    "1; UPDATE generations SET status = 'succeeded'",
    "'; SELECT pg_sleep(3); --",
    "$1 $2 %s %(x)s {0} {}",
    "\\'; TRUNCATE messages; --",
    "\u2019 OR 1=1 --",  # a typographic quote
    "admin'--",
    "' UNION SELECT password_hash FROM users --",
]


def _tables_intact(db: Any) -> None:
    for table in TABLES:
        assert db.execute("SELECT to_regclass(%s)", (table,)).fetchone()[0] is not None, table


@pytest.mark.parametrize("payload", SQL)
def test_sql_in_every_string_field_is_stored_verbatim_or_refused(
    api: Api, db: Any, world: World, payload: str
) -> None:
    owner = world.owner
    started = time.monotonic()
    # Email (no whitespace allowed in one) and password: a working account, nothing else.
    email = payload.replace(" ", "") + "@example.com"
    r = api.http.post("/api/auth/register", json={"email": email, "password": payload + " pw"})
    assert r.status_code == 201, r.text
    assert r.json()["user"]["email"] == email
    login = api.http.post("/api/auth/login", json={"email": email, "password": payload + " pw"})
    assert login.status_code == 200 and login.json()["user"]["email"] == email
    assert_error(
        api.http.post("/api/auth/login", json={"email": email, "password": payload}),
        401,
        "invalid_credentials",
    )
    assert_error(
        api.http.post("/api/auth/login", json={"email": owner.email, "password": payload}),
        401,
        "invalid_credentials",
    )
    assert_error(api.http.post("/api/auth/refresh", json={"refreshToken": payload}), 401, "invalid_token")
    assert (
        api.request("POST", "/api/auth/logout", user=owner, json={"refreshToken": payload}).status_code == 204
    )
    # Titles, messages, system prompts: stored and returned verbatim.
    chat = api.create_chat(owner, payload)
    assert chat["title"] == payload.strip()
    renamed = api.request("PATCH", f"/api/chats/{chat['id']}", user=owner, json={"title": payload + "!"})
    assert renamed.json()["title"] == payload + "!"
    message = api.request("POST", f"/api/chats/{chat['id']}/messages", user=owner, json={"content": payload})
    assert message.json()["content"] == payload
    listed = api.request("GET", f"/api/chats/{chat['id']}/messages", user=owner).json()["items"]
    assert [m["content"] for m in listed] == [payload]
    # The model: refused, nothing written.
    r = api.create_generation(owner, chat["id"], model=payload)
    assert_error(r, 400, "unknown_model")
    # The system prompt (the queued generation is canceled first: one in flight per user).
    api.request("POST", f"/api/generations/{world.queued_generation}/cancel", user=owner)
    r = api.create_generation(owner, chat["id"], content=payload, systemPrompt=payload)
    assert r.status_code == 201, r.text
    assert r.json()["generation"]["systemPrompt"] == payload
    stream = EventStream(api.http, r.json()["streamUrl"])
    assert stream.until_done()[-1][1]["status"] == "succeeded"
    stream.close()
    stored = db.execute(
        "SELECT system_prompt FROM generations WHERE id = %s", (r.json()["generationId"],)
    ).fetchone()[0]
    assert stored == payload
    # Query parameters, ids and headers.
    for path in (
        f"/api/chats?limit={quote(payload)}",
        f"/api/chats?cursor={quote(payload)}",
        f"/api/chats/{chat['id']}/messages?cursor={quote(payload)}",
        f"/api/usage?from={quote(payload)}",
    ):
        assert_error(api.request("GET", path, user=owner), 400, "validation_error")
    for path in (
        f"/api/chats/{quote(payload)}",
        f"/api/generations/{quote(payload)}",
        f"/api/generations/{quote(payload)}/stream",
    ):
        assert_error(api.request("GET", path, user=owner), 404, "not_found")
    ascii_payload = payload.encode("ascii", "ignore").decode().strip()
    key = ascii_payload[:255]
    first = api.request(
        "POST", "/api/chats", user=owner, json={"title": "k"}, headers={"Idempotency-Key": key}
    )
    again = api.request(
        "POST", "/api/chats", user=owner, json={"title": "k"}, headers={"Idempotency-Key": key}
    )
    assert first.status_code == again.status_code == 201 and first.json() == again.json()
    rid = api.http.get("/api/health", headers={"X-Request-Id": ascii_payload})
    assert rid.headers["x-request-id"] != ascii_payload
    # Nothing was executed: every table is there, nobody else's rows changed, no statement slept.
    _tables_intact(db)
    assert time.monotonic() - started < 10
    assert db.execute("SELECT count(*) FROM users").fetchone()[0] >= 2
    assert api.request("GET", f"/api/chats/{world.chat['id']}", user=owner).json()["title"] == "private plans"
    assert (
        db.execute("SELECT status FROM generations WHERE id = %s", (world.queued_generation,)).fetchone()[0]
        == "canceled"
    )


def test_sql_in_a_cursor_is_refused(api: Api, world: World, db: Any) -> None:
    """A cursor is integers: SQL is refused, or (its bytes happening to have a cursor's length) read as
    the numbers those bytes are, a position like any other."""
    owner = world.owner
    for payload in SQL:
        cursor = base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")
        for path, size in ((f"/api/chats/{world.chat['id']}/messages", 1), ("/api/chats", 3)):
            r = api.request("GET", path, user=owner, params={"cursor": cursor})
            if re.fullmatch(cursor_pattern(size), cursor):
                assert r.status_code == 200, r.text
            else:
                assert_error(r, 400, "validation_error")
    _tables_intact(db)


@pytest.mark.parametrize("fill", ["A", "_", "-", "z", "8"])
def test_a_forged_cursor_of_the_right_shape_is_a_position_of_ones_own_list(
    api: Api, world: World, fill: str
) -> None:
    """Any value of the documented pattern is accepted (there is nothing to forge: it is only a position),
    and it never reaches beyond the caller's own chats and messages."""
    for path, size in (("/api/chats", 32), (f"/api/chats/{world.chat['id']}/messages", 11)):
        r = api.request("GET", path, user=world.mallory, params={"cursor": fill * size})
        if path == "/api/chats":
            assert r.status_code == 200, r.text
            assert r.json()["items"] == []  # mallory has none, and sees none of the owner's
        else:
            assert_error(r, 404, "not_found")  # the owner's chat, through any cursor
    r = api.request("GET", "/api/chats", user=world.owner, params={"cursor": encode_cursor([2**62, 0, 0])})
    assert r.status_code == 200 and world.chat["id"] in {c["id"] for c in r.json()["items"]}


def test_a_sleeping_statement_is_never_run(api: Api, world: World) -> None:
    payload = "'; SELECT pg_sleep(5); --"
    started = time.monotonic()
    for method, path, body in _body_requests(world):
        api.request(method, path, user=world.owner, json={k: payload for k in body})
    api.request("GET", f"/api/chats?cursor={quote(payload)}&limit={quote(payload)}", user=world.owner)
    assert time.monotonic() - started < 5


# --- header injection ------------------------------------------------------------------------------------

CRLF = [
    "\r\nSet-Cookie: evil=1",
    "x\r\nX-Injected: yes\r\n\r\n<html>",
    "\nX-Injected: yes",
    "\rX-Injected: yes",
    "%0d%0aSet-Cookie:%20evil=1",
    "\u2028X-Injected: yes",
    "\u0085X-Injected: yes",
    "\u560d\u560aX-Injected: yes",  # UTF-8 bytes that end in 0x0d / 0x0a in some decoders
]


@pytest.mark.parametrize("payload", CRLF)
def test_crlf_in_every_string_field_never_reaches_a_header(
    api: Api, db: Any, world: World, payload: str
) -> None:
    owner = world.owner
    replies = [
        api.http.post(
            "/api/auth/register", json={"email": payload + "@x.io", "password": payload + " password"}
        ),
        api.http.post(
            "/api/auth/register",
            json={"email": f"crlf-{uuid.uuid4().hex}@x.io", "password": payload + " pw pw"},
        ),
        api.http.post("/api/auth/login", json={"email": owner.email, "password": payload + "pw pw pw"}),
        api.http.post("/api/auth/refresh", json={"refreshToken": payload}),
        api.request("POST", "/api/auth/logout", user=owner, json={"refreshToken": payload}),
        api.request("POST", "/api/chats", user=owner, json={payload: 1}),
        api.request("GET", f"/api/chats/{world.chat['id']}/messages", user=owner, params={"cursor": payload}),
        api.request("GET", "/api/chats", user=owner, params={"limit": payload}),
        api.request("GET", "/api/usage", user=owner, params={"from": payload, "to": payload}),
        api.request("GET", "/api/usage", user=owner, params={payload: "1"}),
        api.request("GET", f"/api/chats/{quote(payload, safe='')}", user=owner),
        api.request("GET", f"/api/generations/{quote(payload, safe='')}/stream", user=owner),
        api.http.get(f"/api/generations/{world.queued_generation}/stream", params={"ticket": payload}),
        api.http.get(
            f"/api/generations/{world.done_generation}/stream",
            params={"lastEventId": payload},
            headers=owner.headers,
        ),
        api.create_generation(owner, world.chat["id"], model=payload),
    ]
    chat = api.request("POST", "/api/chats", user=owner, json={"title": payload + " t"})
    replies.append(chat)
    chat_id = chat.json()["id"]
    replies.append(api.request("PATCH", f"/api/chats/{chat_id}", user=owner, json={"title": "t " + payload}))
    message = api.request("POST", f"/api/chats/{chat_id}/messages", user=owner, json={"content": payload})
    replies.append(message)
    api.request("POST", f"/api/generations/{world.queued_generation}/cancel", user=owner)
    generation = api.create_generation(owner, chat_id, content=payload, systemPrompt=payload)
    replies.append(generation)
    for r in replies:
        assert r.status_code < 500, (r.request.url, r.text)
        assert_clean_headers(r)
    # Stored verbatim where the field is free text.
    assert message.json()["content"] == payload
    assert generation.json()["generation"]["systemPrompt"] == payload
    stream = EventStream(api.http, generation.json()["streamUrl"])
    events = stream.until_done()
    assert_clean_headers(stream.response)
    stream.close()
    assert events[-1][1]["status"] == "succeeded"
    # The SSE framing holds: every event is exactly one id line and one data line (EventStream checks).
    assert all(isinstance(e, dict) for _, e in events)


def _raw_request(server: str, head: bytes) -> bytes:
    url = urlsplit(server)
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(head)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return data.split(b"\r\n\r\n")[0]


@pytest.mark.parametrize(
    "header",
    [
        b"X-Request-Id: abc\rSet-Cookie: evil=1",
        b"X-Request-Id: abc\r\n Set-Cookie: evil=1",  # obsolete line folding
        b"X-Request-Id: abc\nSet-Cookie: evil=1",
        b"Idempotency-Key: k\rX-Injected: yes",
        b"Last-Event-ID: 1\rX-Injected: yes",
        b"X-Request-Id: \xc4\x8d\xc4\x8aX-Injected: yes",
    ],
)
def test_raw_line_breaks_in_request_headers_are_not_reflected(server: str, header: bytes) -> None:
    for path in (
        b"/api/health",
        b"/api/chats",
        b"/api/generations/" + str(uuid.uuid4()).encode() + b"/stream",
    ):
        head = _raw_request(
            server, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n" + header + b"\r\nConnection: close\r\n\r\n"
        )
        lines = head.split(b"\r\n")
        assert lines[0].startswith(b"HTTP/1.1 "), head
        names = [line.split(b":", 1)[0].strip().lower() for line in lines[1:]]
        assert b"set-cookie" not in names and b"x-injected" not in names, head


def test_request_ids_are_only_echoed_when_safe(api: Api) -> None:
    for value in ["ok-1.2_3", "x" * 128]:
        assert api.http.get("/api/health", headers={"X-Request-Id": value}).headers["x-request-id"] == value
    for value in ["x" * 129, "a b", "a;b", "a,b", "%0d%0a", "a\tb", "a/b", "a=b"]:
        r = api.http.get("/api/health", headers={"X-Request-Id": value})
        assert r.headers["x-request-id"] != value and r.headers["x-request-id"].isalnum()
        assert_clean_headers(r)


# --- found by this suite, to be fixed outside the API function (see the report) -------------------------


def test_an_unknown_page_is_404(api: Api) -> None:
    r = api.http.get("/no-such-page")
    assert r.status_code == 404


def test_an_id_with_a_line_break_is_not_that_id(api: Api, world: World) -> None:
    r = api.request("GET", f"/api/chats/{world.chat['id']}%0A", user=world.owner)
    assert_error(r, 404, "not_found")


def test_a_wrong_method_on_the_stream_is_405(api: Api, world: World) -> None:
    r = api.request("POST", f"/api/generations/{world.done_generation}/stream", user=world.owner)
    assert_error(r, 405, "method_not_allowed")
    assert r.headers["allow"] == "GET"
