"""Branches (SPEC §7.1): regenerate, edit and resend, switch; the path the chat shows and the model sees."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from psycopg import sql

from helpers import Account, Api, EventStream, assert_error
from minichat.chats import _LIST_PATH
from minichat.migrate import apply_migrations, migrations_dir


def _finish(api: Api, created: httpx.Response) -> list[tuple[int, dict[str, Any]]]:
    assert created.status_code == 201, created.text
    stream = EventStream(api.http, created.json()["streamUrl"])
    events = stream.until_done()
    stream.close()
    assert events[-1][1] == {"type": "done", "status": "succeeded"}, events
    return events


def _ask(api: Api, user: Account, chat_id: str, **body: Any) -> dict[str, Any]:
    """Run a generation to its end; returns its answer (the path's last message)."""
    created = api.create_generation(user, chat_id, **body)
    _finish(api, created)
    answer = _path(api, user, chat_id)[-1]
    assert answer["role"] == "assistant" and answer["generationId"] == created.json()["generationId"]
    return answer


def _path(api: Api, user: Account, chat_id: str, **params: Any) -> list[dict[str, Any]]:
    r = api.request("GET", f"/api/chats/{chat_id}/messages", user=user, params={"limit": 200, **params})
    assert r.status_code == 200, r.text
    assert r.json()["nextCursor"] is None
    return list(r.json()["items"])


def _chat(api: Api, user: Account, chat_id: str) -> dict[str, Any]:
    r = api.request("GET", f"/api/chats/{chat_id}", user=user)
    assert r.status_code == 200, r.text
    return dict(r.json())


def _post(api: Api, user: Account, chat_id: str, content: str) -> dict[str, Any]:
    r = api.request("POST", f"/api/chats/{chat_id}/messages", user=user, json={"content": content})
    assert r.status_code == 201, r.text
    return dict(r.json())


def _switch(api: Api, user: Account, chat_id: str, message_id: str) -> dict[str, Any]:
    r = api.request("PATCH", f"/api/chats/{chat_id}", user=user, json={"activeLeafId": message_id})
    assert r.status_code == 200, r.text
    return dict(r.json())


def _turns(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in messages]


def _ids(messages: list[dict[str, Any]]) -> list[str]:
    return [m["id"] for m in messages]


def test_an_unbranched_chat_is_one_path_and_its_leaf_follows_every_append(api: Api) -> None:
    user = api.register()
    chat = api.create_chat(user)
    assert chat["activeLeafId"] is None and _path(api, user, chat["id"]) == []
    first = _post(api, user, chat["id"], "first")
    assert first["parentId"] is None and first["siblingIds"] == [first["id"]]
    assert _chat(api, user, chat["id"])["activeLeafId"] == first["id"]

    created = api.create_generation(user, chat["id"], content="second")
    question = _path(api, user, chat["id"])[-1]
    # The create moves the leaf to the new user message, which follows the old leaf ...
    assert question["content"] == "second" and question["parentId"] == first["id"]
    assert _chat(api, user, chat["id"])["activeLeafId"] == question["id"]
    _finish(api, created)
    # ... and the end of the generation moves it to the answer.
    path = _path(api, user, chat["id"])
    assert _turns(path) == [("user", "first"), ("user", "second"), ("assistant", "second")]
    assert [m["parentId"] for m in path] == [None, first["id"], question["id"]]
    assert [m["siblingIds"] for m in path] == [[m["id"]] for m in path]
    assert _chat(api, user, chat["id"])["activeLeafId"] == path[-1]["id"]


def test_regenerate_twice_gives_three_sibling_answers(api: Api) -> None:
    user = api.register()
    chat = api.create_chat(user)
    first = _ask(api, user, chat["id"], content="the question")
    question = _path(api, user, chat["id"])[0]

    created = api.create_generation(user, chat["id"], regenerateOf=first["id"])
    # Until the new answer arrives, the chat shows the prompt: the parent of the regenerated answer.
    assert _chat(api, user, chat["id"])["activeLeafId"] == question["id"]
    assert _ids(_path(api, user, chat["id"])) == [question["id"]]
    _finish(api, created)
    second = _path(api, user, chat["id"])[-1]
    third = _ask(api, user, chat["id"], regenerateOf=first["id"])

    path = _path(api, user, chat["id"])
    assert _ids(path) == [question["id"], third["id"]]
    assert _chat(api, user, chat["id"])["activeLeafId"] == third["id"]
    assert third["parentId"] == second["parentId"] == question["id"]
    assert third["siblingIds"] == [first["id"], second["id"], third["id"]]  # oldest first
    assert question["siblingIds"] == [question["id"]]  # the prompt itself has no versions
    # Each version's own path lists the same three siblings.
    for answer in (first, second):
        listed = _path(api, user, chat["id"], leafId=answer["id"])
        assert _ids(listed) == [question["id"], answer["id"]]
        assert listed[-1]["siblingIds"] == third["siblingIds"]


def test_an_edit_of_the_first_message_makes_a_new_root(api: Api) -> None:
    user = api.register()
    chat = api.create_chat(user)
    answer = _ask(api, user, chat["id"], content="helo")
    original = _path(api, user, chat["id"])[0]
    created = api.create_generation(user, chat["id"], content="hello", editOf=original["id"])
    edited = _path(api, user, chat["id"])
    assert _turns(edited) == [("user", "hello")]
    assert _chat(api, user, chat["id"])["activeLeafId"] == edited[0]["id"]
    _finish(api, created)
    path = _path(api, user, chat["id"])
    assert _turns(path) == [("user", "hello"), ("assistant", "hello")]
    root = path[0]
    assert root["parentId"] is None and root["siblingIds"] == [original["id"], root["id"]]
    assert path[1]["parentId"] == root["id"] and path[1]["siblingIds"] == [path[1]["id"]]
    # The old branch is still there, and knows about its new sibling.
    old = _path(api, user, chat["id"], leafId=answer["id"])
    assert _turns(old) == [("user", "helo"), ("assistant", "helo")]
    assert old[0]["siblingIds"] == [original["id"], root["id"]]


def test_an_edit_of_a_later_message_keeps_the_turns_before_it(api: Api) -> None:
    user = api.register()
    chat = api.create_chat(user)
    _ask(api, user, chat["id"], content="one")
    _ask(api, user, chat["id"], content="two")
    before = _path(api, user, chat["id"])
    _ask(api, user, chat["id"], content="TWO", editOf=before[2]["id"])
    path = _path(api, user, chat["id"])
    assert _turns(path) == [("user", "one"), ("assistant", "one"), ("user", "TWO"), ("assistant", "TWO")]
    assert _ids(path[:2]) == _ids(before[:2])
    assert path[2]["parentId"] == before[1]["id"]
    assert path[2]["siblingIds"] == [before[2]["id"], path[2]["id"]]


def test_plain_creates_append_to_the_active_leaf(api: Api) -> None:
    user = api.register()
    chat = api.create_chat(user)
    first = _ask(api, user, chat["id"], content="q")
    second = _ask(api, user, chat["id"], regenerateOf=first["id"])
    _switch(api, user, chat["id"], first["id"])
    posted = _post(api, user, chat["id"], "after the first answer")
    assert posted["parentId"] == first["id"] and posted["siblingIds"] == [posted["id"]]
    answer = _ask(api, user, chat["id"], content="and more")
    path = _path(api, user, chat["id"])
    assert _ids(path) == [path[0]["id"], first["id"], posted["id"], path[3]["id"], answer["id"]]
    assert path[3]["parentId"] == posted["id"]
    # The other answer's branch is unchanged.
    assert _ids(_path(api, user, chat["id"], leafId=second["id"])) == [path[0]["id"], second["id"]]


def test_a_create_without_content_answers_the_active_leaf(api: Api) -> None:
    user = api.register()
    chat = api.create_chat(user)
    created = api.create_generation(user, chat["id"], content="are you there?", model="mock-slow")
    gid = created.json()["generationId"]
    canceled = api.request("POST", f"/api/generations/{gid}/cancel", user=user)
    assert canceled.json()["status"] == "canceled"  # canceled while queued: no answer was written
    question = _path(api, user, chat["id"])
    assert _turns(question) == [("user", "are you there?")]
    assert _chat(api, user, chat["id"])["activeLeafId"] == question[0]["id"]
    answer = _ask(api, user, chat["id"])
    assert answer["parentId"] == question[0]["id"] and answer["content"] == "are you there?"


def test_the_model_sees_only_the_branch_that_leads_to_its_answer(api: Api, openai_stub: Any) -> None:
    from minichat_local.openai_stub import stub_text

    user = api.register()
    chat = api.create_chat(user)
    _ask(api, user, chat["id"], content="alpha question")
    alpha = _path(api, user, chat["id"])
    _ask(api, user, chat["id"], content="beta question", editOf=alpha[0]["id"])
    beta = _path(api, user, chat["id"])

    def sent() -> list[tuple[str, str]]:
        return [(m["role"], m["content"]) for m in openai_stub.stats.last_request["messages"]]

    system = ("system", "Be brief.")
    # Continuing on the edited branch: the system prompt and that branch, nothing of "alpha".
    stub = {"model": "stub-tokens-12", "systemPrompt": "Be brief."}
    stub_answer = _ask(api, user, chat["id"], content="gamma question", **stub)
    assert sent() == [system, *_turns(beta), ("user", "gamma question")]
    assert stub_answer["content"] == stub_text(12)

    # A regenerate sees the prompt of the answer it replaces, not that answer.
    _ask(api, user, chat["id"], regenerateOf=stub_answer["id"], **stub)
    assert sent() == [system, *_turns(beta), ("user", "gamma question")]

    # Back on the first branch: only it.
    _switch(api, user, chat["id"], alpha[-1]["id"])
    _ask(api, user, chat["id"], content="delta question", **stub)
    assert sent() == [system, *_turns(alpha), ("user", "delta question")]

    # An edit sees what precedes the edited message, and the new text in its place.
    third = _path(api, user, chat["id"])[2]
    _ask(api, user, chat["id"], content="DELTA question", editOf=third["id"], **stub)
    assert sent() == [system, *_turns(alpha), ("user", "DELTA question")]


def test_patch_switches_branches_to_the_newest_leaf_under_a_message(api: Api) -> None:
    user = api.register()
    chat = api.create_chat(user, "branches")
    first = _ask(api, user, chat["id"], content="q1")
    question = _path(api, user, chat["id"])[0]
    second = _ask(api, user, chat["id"], regenerateOf=first["id"])
    follow_up = _ask(api, user, chat["id"], content="q2")  # continues under the second answer
    updated_at = _chat(api, user, chat["id"])["updatedAt"]

    # A leaf: exactly that branch.
    switched = _switch(api, user, chat["id"], first["id"])
    assert switched["activeLeafId"] == first["id"] and switched["title"] == "branches"
    assert _ids(_path(api, user, chat["id"])) == [question["id"], first["id"]]
    # A message with replies: the newest leaf under it (switching to "2 / 2" lands where it was left).
    assert _switch(api, user, chat["id"], second["id"])["activeLeafId"] == follow_up["id"]
    assert _switch(api, user, chat["id"], question["id"])["activeLeafId"] == follow_up["id"]
    assert _path(api, user, chat["id"])[-1]["id"] == follow_up["id"]
    # Switching is reading: updatedAt stays. It persists (a reload shows the same branch).
    _switch(api, user, chat["id"], first["id"])
    again = _chat(api, user, chat["id"])
    assert again["activeLeafId"] == first["id"] and again["updatedAt"] == updated_at
    assert _ids(_path(api, user, chat["id"])) == [question["id"], first["id"]]

    # title stays optional; both at once; neither is refused.
    both = api.request(
        "PATCH",
        f"/api/chats/{chat['id']}",
        user=user,
        json={"title": "renamed", "activeLeafId": second["id"]},
    )
    assert both.status_code == 200
    assert both.json()["title"] == "renamed" and both.json()["activeLeafId"] == follow_up["id"]
    assert both.json()["updatedAt"] > updated_at
    renamed = api.request("PATCH", f"/api/chats/{chat['id']}", user=user, json={"title": "only"})
    assert renamed.json()["activeLeafId"] == follow_up["id"]
    for body in ({}, {"activeLeafId": None}, {"title": None, "activeLeafId": None}):
        r = api.request("PATCH", f"/api/chats/{chat['id']}", user=user, json=body)
        assert assert_error(r, 400, "validation_error")["field"] == "title"
    r = api.request("PATCH", f"/api/chats/{chat['id']}", user=user, json={"activeLeafId": "not-an-id"})
    assert assert_error(r, 400, "validation_error")["field"] == "activeLeafId"


def test_the_end_of_a_generation_moves_the_leaf_even_after_a_switch(api: Api) -> None:
    user = api.register()
    chat = api.create_chat(user)
    # Ten words: mock-slow takes ~2 s over them, so the switch lands while the answer is written.
    first = _ask(api, user, chat["id"], content="one two three four five six seven eight nine ten")
    created = api.create_generation(user, chat["id"], regenerateOf=first["id"], model="mock-slow")
    stream = EventStream(api.http, created.json()["streamUrl"])
    stream.next()
    _switch(api, user, chat["id"], first["id"])  # the user looks at the old answer meanwhile
    assert _chat(api, user, chat["id"])["activeLeafId"] == first["id"]
    assert stream.until_done()[-1][1]["status"] == "succeeded"
    stream.close()
    answer = _path(api, user, chat["id"])[-1]
    assert answer["generationId"] == created.json()["generationId"]
    assert answer["siblingIds"] == [first["id"], answer["id"]]
    assert _chat(api, user, chat["id"])["activeLeafId"] == answer["id"]


def test_a_message_posted_while_an_answer_is_written_branches_off_its_prompt(api: Api) -> None:
    user = api.register()
    chat = api.create_chat(user)
    created = api.create_generation(user, chat["id"], content="slow question", model="mock-slow")
    stream = EventStream(api.http, created.json()["streamUrl"])
    stream.next()
    question = _path(api, user, chat["id"])[0]
    posted = _post(api, user, chat["id"], "meanwhile")  # under the active leaf: the prompt
    assert posted["parentId"] == question["id"] and posted["siblingIds"] == [posted["id"]]
    assert stream.until_done()[-1][1]["status"] == "succeeded"
    stream.close()
    answer = _path(api, user, chat["id"])[-1]
    assert answer["parentId"] == question["id"] and answer["siblingIds"] == [answer["id"]]  # other role
    assert _chat(api, user, chat["id"])["activeLeafId"] == answer["id"]
    assert _ids(_path(api, user, chat["id"], leafId=posted["id"])) == [question["id"], posted["id"]]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"content": "x", "editOf": "ANSWER"}, "editOf"),  # an assistant message
        ({"regenerateOf": "QUESTION"}, "regenerateOf"),  # a user message
        ({"regenerateOf": "ANSWER", "editOf": "QUESTION", "content": "x"}, "regenerateOf"),
        ({"regenerateOf": "ANSWER", "editOf": "QUESTION"}, "regenerateOf"),
        ({"regenerateOf": "ANSWER", "content": "x"}, "regenerateOf"),
        ({"editOf": "QUESTION"}, "content"),
        ({"editOf": "QUESTION", "content": None}, "content"),
        ({"editOf": "not-a-uuid", "content": "x"}, "editOf"),
        ({"regenerateOf": 42}, "regenerateOf"),
    ],
)
def test_wrong_branch_fields_are_validation_errors(
    api: Api, db: Any, body: dict[str, Any], field: str
) -> None:
    user = api.register()
    chat = api.create_chat(user)
    answer = _ask(api, user, chat["id"], content="q")
    ids = {"ANSWER": answer["id"], "QUESTION": answer["parentId"]}
    before = _chat(api, user, chat["id"])
    body = {k: ids.get(v, v) if isinstance(v, str) else v for k, v in body.items()}
    r = api.create_generation(user, chat["id"], **body)
    assert assert_error(r, 400, "validation_error")["field"] == field
    assert db.execute("SELECT count(*) FROM messages").fetchone()[0] == 2
    assert db.execute("SELECT count(*) FROM generations").fetchone()[0] == 1
    assert _chat(api, user, chat["id"]) == before
    _finish(api, api.create_generation(user, chat["id"], regenerateOf=answer["id"]))  # the lock was not kept


def test_another_chats_and_another_users_message_ids_are_not_found(api: Api, db: Any) -> None:
    user, other = api.register(), api.register()
    chat, sibling_chat, foreign_chat = api.create_chat(user), api.create_chat(user), api.create_chat(other)
    _ask(api, user, chat["id"], content="mine")
    mine = _path(api, user, chat["id"])
    _ask(api, user, sibling_chat["id"], content="my other chat")
    elsewhere = _path(api, user, sibling_chat["id"])
    _ask(api, other, foreign_chat["id"], content="theirs")
    theirs = _path(api, other, foreign_chat["id"])
    counts = db.execute(
        "SELECT (SELECT count(*) FROM messages), (SELECT count(*) FROM generations)"
    ).fetchone()

    for question, answer in ((elsewhere[0], elsewhere[1]), (theirs[0], theirs[1])):
        for body in ({"content": "x", "editOf": question["id"]}, {"regenerateOf": answer["id"]}):
            assert_error(api.create_generation(user, chat["id"], **body), 404, "not_found")
        for message in (question, answer):
            r = api.request(
                "PATCH", f"/api/chats/{chat['id']}", user=user, json={"activeLeafId": message["id"]}
            )
            assert_error(r, 404, "not_found")
            r = api.request(
                "GET", f"/api/chats/{chat['id']}/messages", user=user, params={"leafId": message["id"]}
            )
            assert_error(r, 404, "not_found")
    missing = str(uuid.uuid4())
    assert_error(api.create_generation(user, chat["id"], regenerateOf=missing), 404, "not_found")
    for leaf in (missing, "not-a-uuid"):
        r = api.request("GET", f"/api/chats/{chat['id']}/messages", user=user, params={"leafId": leaf})
        assert_error(r, 404, "not_found")
    # Another user's chat with the ids of its own messages: 404 too.
    assert_error(
        api.create_generation(user, foreign_chat["id"], regenerateOf=theirs[1]["id"]), 404, "not_found"
    )
    r = api.request(
        "GET", f"/api/chats/{foreign_chat['id']}/messages", user=user, params={"leafId": theirs[1]["id"]}
    )
    assert_error(r, 404, "not_found")

    now = db.execute("SELECT (SELECT count(*) FROM messages), (SELECT count(*) FROM generations)").fetchone()
    assert now == counts
    assert _ids(_path(api, user, chat["id"])) == _ids(mine)
    _finish(
        api, api.create_generation(user, chat["id"], regenerateOf=mine[1]["id"])
    )  # nothing was left locked


def test_a_regenerate_or_an_edit_while_another_generation_runs_is_409(api: Api) -> None:
    user = api.register()
    chat, busy = api.create_chat(user), api.create_chat(user)
    answer = _ask(api, user, chat["id"], content="q")
    running = api.create_generation(user, busy["id"], content="slow one", model="mock-slow")
    assert running.status_code == 201
    running_id = running.json()["generationId"]
    for body in ({"regenerateOf": answer["id"]}, {"content": "x", "editOf": answer["parentId"]}):
        error = assert_error(api.create_generation(user, chat["id"], **body), 409, "generation_in_flight")
        assert error["generationId"] == running_id
    assert _ids(_path(api, user, chat["id"])) == [answer["parentId"], answer["id"]]
    assert _chat(api, user, chat["id"])["activeLeafId"] == answer["id"]
    api.request("POST", f"/api/generations/{running_id}/cancel", user=user)
    _finish(api, api.create_generation(user, chat["id"], regenerateOf=answer["id"]))


def test_rate_limit_and_budget_hold_for_every_kind_of_create(api: Api, db: Any, settings_with: Any) -> None:
    settings_with(rate_generations="1/60")
    user = api.register()
    chat = api.create_chat(user)
    answer = _ask(api, user, chat["id"], content="q")  # the one create of the window
    kinds = [{"regenerateOf": answer["id"]}, {"content": "x", "editOf": answer["parentId"]}, {"content": "y"}]
    for body in kinds:
        r = api.create_generation(user, chat["id"], **body)
        assert_error(r, 429, "rate_limited")
        assert r.headers["x-ratelimit-limit"] == "1"
    settings_with(daily_token_budget=1)
    db.execute(
        "INSERT INTO daily_usage (user_id, day, input_tokens, output_tokens)"
        " VALUES (%s, (now() AT TIME ZONE 'UTC')::date, 1, 0)"
        " ON CONFLICT (user_id, day) DO UPDATE SET input_tokens = daily_usage.input_tokens + 1",
        (user.user_id,),
    )
    for body in kinds:
        assert_error(api.create_generation(user, chat["id"], **body), 429, "quota_exceeded")
    assert db.execute("SELECT count(*) FROM generations").fetchone()[0] == 1


def test_path_pagination_is_stable_while_a_generation_appends(api: Api) -> None:
    user = api.register()
    chat = api.create_chat(user)
    for i in range(4):
        _ask(api, user, chat["id"], content=f"turn {i}")
    branch_point = _path(api, user, chat["id"])[3]  # the second answer
    _ask(api, user, chat["id"], regenerateOf=branch_point["id"])
    for i in range(3):
        _ask(api, user, chat["id"], content=f"branch turn {i}")
    path = _path(api, user, chat["id"])
    assert len(path) == 3 + 1 + 6

    url = f"/api/chats/{chat['id']}/messages"
    seen: list[dict[str, Any]] = []
    cursor = None
    appended = iter(range(100))
    while True:
        r = api.request("GET", url, user=user, params={"limit": 3, **({"cursor": cursor} if cursor else {})})
        assert r.status_code == 200
        seen += r.json()["items"]
        cursor = r.json()["nextCursor"]
        if cursor is None:
            break
        # A generation appends to the branch between two pages.
        _ask(api, user, chat["id"], content=f"appended {next(appended)}")
    ids = _ids(seen)
    assert len(ids) == len(set(ids)), "an item was repeated"
    assert ids[: len(path)] == _ids(path), "an item was skipped or came from another branch"
    assert [m["content"] for m in seen[len(path) :: 2]] == [
        f"appended {i}" for i in range(len(seen[len(path) :]) // 2)
    ]
    # Another branch's path pages the same way, from its own leaf.
    other = _path(api, user, chat["id"], leafId=branch_point["id"])
    first = api.request("GET", url, user=user, params={"leafId": branch_point["id"], "limit": 2}).json()
    rest = api.request(
        "GET", url, user=user, params={"leafId": branch_point["id"], "cursor": first["nextCursor"]}
    ).json()
    assert _ids(first["items"] + rest["items"]) == _ids(other) and rest["nextCursor"] is None


def test_deleting_a_chat_mid_branch_cleans_up(api: Api, db: Any, redis_client: Any) -> None:
    user = api.register()
    chat, other = api.create_chat(user), api.create_chat(user)
    first = _ask(api, user, chat["id"], content="q one two three")
    _ask(api, user, chat["id"], content="Q", editOf=first["parentId"])
    created = api.create_generation(user, chat["id"], regenerateOf=first["id"], model="mock-slow")
    stream = EventStream(api.http, created.json()["streamUrl"])
    stream.next()  # streaming a regenerate on a side branch
    deleted = api.request("DELETE", f"/api/chats/{chat['id']}", user=user)
    assert deleted.status_code == 204
    assert stream.until_done()[-1][1] == {"type": "done", "status": "canceled"}
    stream.close()
    for table in ("messages", "generations"):
        assert (
            db.execute(f"SELECT count(*) FROM {table} WHERE chat_id = %s", (chat["id"],)).fetchone()[0] == 0
        )
    assert db.execute("SELECT count(*) FROM chats WHERE id = %s", (chat["id"],)).fetchone()[0] == 0
    assert redis_client.get(f"user:{user.user_id}:inflight_generation") is None
    assert_error(api.request("GET", f"/api/chats/{chat['id']}/messages", user=user), 404, "not_found")
    _ask(api, user, other["id"], content="still works")  # the lock was freed


@pytest.fixture
def pre_branch_db() -> Any:
    """A scratch database migrated to just before branches (0004)."""
    name = os.environ.get("MINICHAT_TEST_DB", "minichat_test") + "_prebranch"
    admin = os.environ.get("MINICHAT_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
    url = psycopg.conninfo.make_conninfo(admin, dbname=name)

    def recreate(drop_only: bool = False) -> None:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            if not drop_only:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    recreate()
    yield url
    recreate(drop_only=True)


def test_chats_written_before_branches_read_as_one_path(pre_branch_db: str, tmp_path: Path) -> None:
    before = tmp_path / "before"
    before.mkdir()
    for path in migrations_dir().glob("[0-9][0-9][0-9][0-9]_*.sql"):
        if path.name < "0004":
            shutil.copy(path, before / path.name)
    apply_migrations(pre_branch_db, before)
    with psycopg.connect(pre_branch_db, autocommit=True) as conn:
        user = conn.execute("INSERT INTO users (email, password_hash) VALUES ('old@x.io', 'x') RETURNING id")
        user_id = user.fetchone()[0]
        chats = [
            conn.execute("INSERT INTO chats (user_id) VALUES (%s) RETURNING id", (user_id,)).fetchone()[0]
            for _ in range(3)
        ]
        # Chat 0: four messages, two of them written in one transaction (one created_at; seq orders them).
        with conn.transaction():
            for role, text in (("user", "a"), ("assistant", "b")):
                conn.execute(
                    "INSERT INTO messages (chat_id, role, content) VALUES (%s, %s, %s)",
                    (chats[0], role, text),
                )
        for role, text in (("user", "c"), ("assistant", "d")):
            conn.execute(
                "INSERT INTO messages (chat_id, role, content) VALUES (%s, %s, %s)", (chats[0], role, text)
            )
        # Chat 1: interleaved with chat 0's rows; a generation still in flight. Chat 2: empty.
        conn.execute("INSERT INTO messages (chat_id, role, content) VALUES (%s, 'user', 'x')", (chats[1],))
        conn.execute("INSERT INTO messages (chat_id, role, content) VALUES (%s, 'user', 'e')", (chats[0],))
        conn.execute("INSERT INTO messages (chat_id, role, content) VALUES (%s, 'user', 'y')", (chats[1],))
        running = conn.execute(
            "INSERT INTO generations (chat_id, user_id, model) VALUES (%s, %s, 'mock-echo') RETURNING id",
            (chats[1], user_id),
        ).fetchone()[0]
        updated = conn.execute("SELECT id, updated_at FROM chats ORDER BY id").fetchall()

    assert apply_migrations(pre_branch_db) == [
        p.name for p in sorted(migrations_dir().glob("[0-9][0-9][0-9][0-9]_*.sql")) if p.name >= "0004"
    ]
    with psycopg.connect(pre_branch_db, autocommit=True) as conn:

        def listed(chat_id: Any, limit: int = 50) -> list[str]:
            params = {"after": 0, "limit": limit, "chat_id": chat_id, "user_id": user_id, "leaf_id": None}
            rows = conn.execute(_LIST_PATH, params).fetchall()
            return [json.loads(item)["content"] for _, _, item in rows if item is not None]

        assert listed(chats[0]) == ["a", "b", "c", "d", "e"]
        assert listed(chats[1]) == ["x", "y"]
        assert listed(chats[2]) == []
        seqs = conn.execute(
            "SELECT m.content, p.content FROM messages m LEFT JOIN messages p ON p.id = m.parent_id"
            " WHERE m.chat_id = %s ORDER BY m.seq",
            (chats[0],),
        ).fetchall()
        assert seqs == [("a", None), ("b", "a"), ("c", "b"), ("d", "c"), ("e", "d")]
        leaves = conn.execute(
            "SELECT c.id, m.content FROM chats c LEFT JOIN messages m ON m.id = c.active_leaf_id"
            " ORDER BY c.id"
        ).fetchall()
        assert dict(leaves) == {chats[0]: "e", chats[1]: "y", chats[2]: None}
        # The generation in flight answers the chat's last message; nobody's updatedAt changed.
        parent = conn.execute(
            "SELECT m.content FROM generations g JOIN messages m ON m.id = g.parent_message_id"
            " WHERE g.id = %s",
            (running,),
        ).fetchone()
        assert parent == ("y",)
        assert conn.execute("SELECT id, updated_at FROM chats ORDER BY id").fetchall() == updated
