"""Chats and messages: CRUD, titles, pagination stable under inserts, bounds, ownership."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from helpers import Account, Api, assert_error


def test_chat_crud(api: Api, db: Any) -> None:
    user = api.register()
    chat = api.create_chat(user, "  Plans  ")
    assert set(chat) == {"id", "title", "createdAt", "updatedAt", "activeLeafId"}
    assert chat["activeLeafId"] is None
    assert chat["title"] == "Plans"
    got = api.request("GET", f"/api/chats/{chat['id']}", user=user)
    assert got.status_code == 200 and got.json() == chat
    renamed = api.request("PATCH", f"/api/chats/{chat['id']}", user=user, json={"title": "Trips"})
    assert renamed.status_code == 200 and renamed.json()["title"] == "Trips"
    assert renamed.json()["updatedAt"] >= chat["updatedAt"]
    deleted = api.request("DELETE", f"/api/chats/{chat['id']}", user=user)
    assert deleted.status_code == 204 and deleted.content == b""
    assert_error(api.request("GET", f"/api/chats/{chat['id']}", user=user), 404, "not_found")
    assert_error(api.request("DELETE", f"/api/chats/{chat['id']}", user=user), 404, "not_found")
    actions = [r[0] for r in db.execute("SELECT payload->>'action' FROM outbox ORDER BY id").fetchall()]
    assert actions == ["user.registered", "chat.created", "chat.deleted"]


def test_title_comes_from_the_first_message(api: Api) -> None:
    user = api.register()
    chat = api.create_chat(user)
    assert chat["title"] is None
    first = (
        "What is   the\nbest way to learn Rust if I already know Python and a bit of C? Asking for a friend."
    )
    r = api.request("POST", f"/api/chats/{chat['id']}/messages", user=user, json={"content": first})
    assert r.status_code == 201, r.text
    api.request("POST", f"/api/chats/{chat['id']}/messages", user=user, json={"content": "Second question"})
    title = api.request("GET", f"/api/chats/{chat['id']}", user=user).json()["title"]
    assert title.startswith("What is the best way to learn Rust") and title.endswith("…")
    assert len(title) <= 80 and "\n" not in title


def test_messages_are_appended_and_bump_the_chat(api: Api) -> None:
    user = api.register()
    chat = api.create_chat(user, "t")
    time.sleep(0.01)
    r = api.request("POST", f"/api/chats/{chat['id']}/messages", user=user, json={"content": "hello"})
    assert r.status_code == 201
    msg = r.json()
    assert set(msg) == {
        "id", "chatId", "parentId", "role", "content", "generationId", "createdAt", "siblingIds",
    }  # fmt: skip
    assert msg["parentId"] is None and msg["siblingIds"] == [msg["id"]]
    assert msg["role"] == "user" and msg["content"] == "hello" and msg["chatId"] == chat["id"]
    assert msg["generationId"] is None
    after = api.request("GET", f"/api/chats/{chat['id']}", user=user).json()
    assert after["updatedAt"] > chat["updatedAt"]
    listed = api.request("GET", f"/api/chats/{chat['id']}/messages", user=user).json()
    assert listed == {"items": [msg], "nextCursor": None}


def test_chat_list_is_newest_updated_first(api: Api) -> None:
    user = api.register()
    a, b, c = (api.create_chat(user, name) for name in "abc")
    api.request("POST", f"/api/chats/{a['id']}/messages", user=user, json={"content": "bump"})
    items = api.request("GET", "/api/chats", user=user).json()["items"]
    assert [i["id"] for i in items] == [a["id"], c["id"], b["id"]]


def _pages(api: Api, user: Account, path: str, limit: int, between: Any = None) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": limit}
        if cursor:
            params["cursor"] = cursor
        r = api.request("GET", path, user=user, params=params)
        assert r.status_code == 200, r.text
        page = r.json()
        assert len(page["items"]) <= limit
        seen += page["items"]
        cursor = page["nextCursor"]
        if cursor is None:
            return seen
        if between:
            between()


def test_chat_pagination_is_stable_under_inserts(api: Api) -> None:
    user = api.register()
    originals = [api.create_chat(user, f"chat {i}")["id"] for i in range(23)]
    seen = _pages(api, user, "/api/chats", 5, between=lambda: api.create_chat(user, "new"))
    ids = [c["id"] for c in seen]
    assert len(ids) == len(set(ids)), "an item was repeated"
    assert [i for i in ids if i in originals] == list(reversed(originals)), "an item was skipped"


def test_message_pagination_is_stable_under_inserts(api: Api) -> None:
    user = api.register()
    chat = api.create_chat(user, "long")
    path = f"/api/chats/{chat['id']}/messages"
    originals = [
        api.request("POST", path, user=user, json={"content": f"m{i}"}).json()["id"] for i in range(30)
    ]
    counter = iter(range(1000))
    seen = _pages(
        api,
        user,
        path,
        7,
        between=lambda: api.request("POST", path, user=user, json={"content": f"x{next(counter)}"}),
    )
    ids = [m["id"] for m in seen]
    assert len(ids) == len(set(ids))
    assert ids[:30] == originals  # oldest first, nothing skipped; later inserts follow at the end
    assert all(m["content"].startswith("x") for m in seen[30:])


@pytest.mark.parametrize("limit", ["0", "201", "-1", "abc", "1.5"])
def test_limit_bounds(api: Api, limit: str) -> None:
    user = api.register()
    error = assert_error(
        api.request("GET", "/api/chats", user=user, params={"limit": limit}), 400, "validation_error"
    )
    assert error["field"] == "limit"


@pytest.mark.parametrize("cursor", ["garbage", "W10", "WyJ4IiwieSJd"])
def test_bad_cursor(api: Api, cursor: str) -> None:
    user = api.register()
    chat = api.create_chat(user, "c")
    for path in ("/api/chats", f"/api/chats/{chat['id']}/messages"):
        error = assert_error(
            api.request("GET", path, user=user, params={"cursor": cursor}), 400, "validation_error"
        )
        assert error["field"] == "cursor"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "content"),
        ({"content": ""}, "content"),
        ({"content": "   \n "}, "content"),
        ({"content": "x" * 32_001}, "content"),
        ({"content": 42}, "content"),
        ({"content": "hi", "role": "assistant"}, "role"),
        ({"content": "hi", "chatId": str(uuid.uuid4())}, "chatId"),
    ],
)
def test_message_bounds(api: Api, db: Any, body: dict[str, Any], field: str) -> None:
    user = api.register()
    chat = api.create_chat(user, "c")
    r = api.request("POST", f"/api/chats/{chat['id']}/messages", user=user, json=body)
    assert assert_error(r, 400, "validation_error")["field"] == field
    assert db.execute("SELECT count(*) FROM messages").fetchone()[0] == 0


def test_longest_message_is_accepted(api: Api) -> None:
    user = api.register()
    chat = api.create_chat(user, "c")
    r = api.request("POST", f"/api/chats/{chat['id']}/messages", user=user, json={"content": "é" * 32_000})
    assert r.status_code == 201 and len(r.json()["content"]) == 32_000


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"title": "t" * 201}, "title"),
        ({"title": ""}, "title"),
        ({"title": 7}, "title"),
        ({"title": "ok", "userId": str(uuid.uuid4())}, "userId"),
        ({"title": "ok", "createdAt": "2020-01-01T00:00:00Z"}, "createdAt"),
    ],
)
def test_chat_bounds(api: Api, db: Any, body: dict[str, Any], field: str) -> None:
    user = api.register()
    r = api.request("POST", "/api/chats", user=user, json=body)
    assert assert_error(r, 400, "validation_error")["field"] == field
    chat = api.create_chat(user, "keep")
    r = api.request("PATCH", f"/api/chats/{chat['id']}", user=user, json=body)
    assert assert_error(r, 400, "validation_error")["field"] == field
    assert db.execute("SELECT title FROM chats").fetchall() == [("keep",)]


def test_patch_needs_a_title(api: Api) -> None:
    user = api.register()
    chat = api.create_chat(user, "c")
    r = api.request("PATCH", f"/api/chats/{chat['id']}", user=user, json={})
    assert assert_error(r, 400, "validation_error")["field"] == "title"


@pytest.mark.parametrize("bad_id", ["not-a-uuid", "1", "00000000-0000-0000-0000-00000000000g", "' OR 1=1 --"])
def test_non_uuid_ids_are_not_found(api: Api, bad_id: str) -> None:
    user = api.register()
    for method, suffix in [
        ("GET", ""),
        ("PATCH", ""),
        ("DELETE", ""),
        ("GET", "/messages"),
        ("POST", "/messages"),
    ]:
        r = api.request(
            method, f"/api/chats/{bad_id}{suffix}", user=user, json={"title": "x", "content": "x"}
        )
        assert_error(r, 404, "not_found")


def test_every_chat_route_on_another_users_chat_is_not_found(api: Api, db: Any) -> None:
    owner, other = api.register(), api.register()
    chat = api.create_chat(owner, "private")
    api.request("POST", f"/api/chats/{chat['id']}/messages", user=owner, json={"content": "secret"})
    before = (
        db.execute("SELECT * FROM chats ORDER BY id").fetchall(),
        db.execute("SELECT * FROM messages ORDER BY seq").fetchall(),
    )
    missing = str(uuid.uuid4())
    for chat_id in (chat["id"], missing):
        for method, suffix, body in [
            ("GET", "", None),
            ("PATCH", "", {"title": "hacked"}),
            ("DELETE", "", None),
            ("GET", "/messages", None),
            ("POST", "/messages", {"content": "injected"}),
        ]:
            r = api.request(method, f"/api/chats/{chat_id}{suffix}", user=other, json=body)
            error = assert_error(r, 404, "not_found")
            assert "private" not in r.text and "secret" not in r.text
            assert error["message"] == "Chat not found."  # the same answer as for a chat that never existed
    after = (
        db.execute("SELECT * FROM chats ORDER BY id").fetchall(),
        db.execute("SELECT * FROM messages ORDER BY seq").fetchall(),
    )
    assert after == before
    assert api.request("GET", "/api/chats", user=other).json()["items"] == []


def test_chat_routes_need_a_token(api: Api) -> None:
    chat_id = str(uuid.uuid4())
    for method, path in [
        ("GET", "/api/chats"),
        ("POST", "/api/chats"),
        ("GET", f"/api/chats/{chat_id}"),
        ("PATCH", f"/api/chats/{chat_id}"),
        ("DELETE", f"/api/chats/{chat_id}"),
        ("GET", f"/api/chats/{chat_id}/messages"),
        ("POST", f"/api/chats/{chat_id}/messages"),
    ]:
        assert_error(api.request(method, path), 401, "unauthorized")


def test_deleting_a_chat_removes_its_messages(api: Api, db: Any) -> None:
    user = api.register()
    chat = api.create_chat(user, "gone")
    api.request("POST", f"/api/chats/{chat['id']}/messages", user=user, json={"content": "bye"})
    assert api.request("DELETE", f"/api/chats/{chat['id']}", user=user).status_code == 204
    assert db.execute("SELECT count(*) FROM messages").fetchone()[0] == 0


def test_sql_in_text_fields_is_stored_verbatim(api: Api) -> None:
    user = api.register()
    nasty = "'); DROP TABLE chats; -- \u0000"[:-1] + "\\x00 %s %(x)s"
    chat = api.create_chat(user, nasty)
    assert chat["title"] == nasty.strip()
    r = api.request("POST", f"/api/chats/{chat['id']}/messages", user=user, json={"content": nasty})
    assert r.json()["content"] == nasty
    assert api.request("GET", "/api/chats", user=user).json()["items"][0]["title"] == nasty.strip()


def test_listed_messages_are_exactly_what_was_posted(api: Api) -> None:
    """The list is JSON built by PostgreSQL; each item must equal the message the POST returned."""
    user = api.register()
    chat = api.create_chat(user, "escapes")
    path = f"/api/chats/{chat['id']}/messages"
    texts = [
        'quotes " and \\ backslashes \\" \\n',
        "control \t\r\n\x01\x1f and DEL \x7f",
        "unicode: ünïcødé 日本語 🦀 \u2028\u2029 \ufeff",
        "</script><script>alert(1)</script> & < >",
        " " * 3 + "spaces kept" + " " * 3,
    ]
    posted = [api.request("POST", path, user=user, json={"content": t}).json() for t in texts]
    assert [p["content"] for p in posted] == texts
    r = api.request("GET", path, user=user)
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.json() == {"items": posted, "nextCursor": None}
    first = api.request("GET", path, user=user, params={"limit": 2}).json()
    assert first["items"] == posted[:2] and first["nextCursor"]
    rest = api.request("GET", path, user=user, params={"cursor": first["nextCursor"]}).json()
    assert rest == {"items": posted[2:], "nextCursor": None}
