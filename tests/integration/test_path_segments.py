"""A path is read by segments (migration 0006): the segments a message continues or starts, the path of
any leaf in any tree, paged, the model's history, the backfill of older trees, and the lock that keeps a
segment one chain when two messages land under one parent at once."""

from __future__ import annotations

import json
import random
import threading
import time
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from minichat import generations
from minichat.chats import _LIST_PATH, insert_message, owned_chat_for_update
from minichat.generations import Outcome
from minichat.migrate import migrations_dir


@pytest.fixture
def tree_db(db: Any, database_url: str) -> Any:
    with psycopg.connect(database_url, row_factory=dict_row) as conn:
        yield conn


def _user_and_chat(conn: psycopg.Connection[Any]) -> tuple[str, str]:
    with conn.transaction():
        user_id = str(
            conn.execute(
                "INSERT INTO users (email, password_hash) VALUES (%s, 'x') RETURNING id",
                (f"tree-{random.random()}@x.io",),
            ).fetchone()["id"]
        )
        chat_id = str(
            conn.execute("INSERT INTO chats (user_id) VALUES (%s) RETURNING id", (user_id,)).fetchone()["id"]
        )
    return user_id, chat_id


def _add(conn: psycopg.Connection[Any], user_id: str, chat_id: str, parent: str | None, role: str) -> str:
    with conn.transaction():
        owned_chat_for_update(conn, user_id=user_id, chat_id=chat_id)
        row = insert_message(
            conn, chat_id=chat_id, role=role, content=f"m{random.random()}", parent_id=parent
        )
    return str(row["id"])


def _rows(conn: psycopg.Connection[Any], chat_id: str) -> dict[str, dict[str, Any]]:
    rows = conn.execute(
        "SELECT id::text, parent_id::text, role, content, seq, segment_id::text FROM messages"
        " WHERE chat_id = %s",
        (chat_id,),
    ).fetchall()
    return {r["id"]: r for r in rows}


def _walk(rows: dict[str, dict[str, Any]], leaf: str) -> list[str]:
    """The reference: parent pointers, one at a time."""
    path = []
    at: str | None = leaf
    while at is not None:
        path.append(at)
        at = rows[at]["parent_id"]
    return path[::-1]


def _listed(conn: psycopg.Connection[Any], user_id: str, chat_id: str, leaf: str, limit: int) -> list[str]:
    """The path as the API pages it, `limit` at a time."""
    ids: list[str] = []
    after = 0
    while True:
        params = {"after": after, "limit": limit, "chat_id": chat_id, "user_id": user_id, "leaf_id": leaf}
        rows = conn.execute(_LIST_PATH, params).fetchall()
        page = [(r["seq"], json.loads(r["item"])["id"]) for r in rows if r["item"] is not None]
        ids += [message_id for _, message_id in page[:limit]]
        if len(page) <= limit:
            return ids
        after = page[limit - 1][0]


def test_any_leaf_of_a_random_tree_lists_its_path_and_the_model_sees_its_newest(
    tree_db: psycopg.Connection[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    conn = tree_db
    rng = random.Random(20261206)
    user_id, chat_id = _user_and_chat(conn)
    ids: list[str] = []
    roles: dict[str | None, str] = {None: "assistant"}
    for _ in range(240):
        # Mostly the newest message (a conversation), often an older one (a fork), now and then a root.
        pick = rng.random()
        parent = None if pick < 0.03 or not ids else ids[-1] if pick < 0.7 else rng.choice(ids)
        role = "user" if roles[parent] == "assistant" else "assistant"
        new = _add(conn, user_id, chat_id, parent, role)
        roles[new] = role
        ids.append(new)
    rows = _rows(conn, chat_id)

    # The insert's rule: a root, or a child beside an older one, starts a segment; a first child continues.
    for row in rows.values():
        parent = row["parent_id"]
        older = [
            r
            for r in rows.values()
            if parent is not None and r["parent_id"] == parent and r["seq"] < row["seq"]
        ]
        expected = row["id"] if parent is None or older else rows[parent]["segment_id"]
        assert row["segment_id"] == expected
    assert 20 < len({r["segment_id"] for r in rows.values()}) < 200  # forks happened, runs too

    leaves = [i for i in ids if not any(r["parent_id"] == i for r in rows.values())]
    for leaf in [*rng.sample(leaves, 12), ids[-1]]:
        expected = _walk(rows, leaf)
        for limit in (7, 200):
            assert _listed(conn, user_id, chat_id, leaf, limit) == expected

        generation = conn.execute(
            "INSERT INTO generations (chat_id, user_id, model, parent_message_id) VALUES (%s, %s, 'mock', %s)"
            " RETURNING id::text",
            (chat_id, user_id, leaf),
        ).fetchone()["id"]
        history = [(rows[i]["role"], rows[i]["content"]) for i in expected]
        assert generations.history(conn, generation) == history
        conn.commit()
        # The stream's claim walks the same path in its one statement; a second open only reads the row.
        claimed, prompt = generations.open_for_stream(generation_id=generation, user_id=user_id)
        assert prompt == history and claimed["status"] == "streaming" and str(claimed["id"]) == generation
        again, none = generations.open_for_stream(generation_id=generation, user_id=user_id)
        assert none is None and again == claimed
        monkeypatch.setattr(generations, "_HISTORY_LIMIT", 5)
        assert generations.history(conn, generation) == history[-5:]
        monkeypatch.undo()
        conn.execute("DELETE FROM generations WHERE id = %s", (generation,))
        conn.commit()

    # Trees written before 0006 get the same segments from the migration's backfill.
    before = {i: r["segment_id"] for i, r in rows.items()}
    migration = (migrations_dir() / "0006_path_segments.sql").read_text()
    backfill = migration[
        migration.index("WITH RECURSIVE walk") : migration.index(";", migration.index("WITH RECURSIVE walk"))
    ]
    with conn.transaction():
        conn.execute("UPDATE messages SET segment_id = gen_random_uuid() WHERE chat_id = %s", (chat_id,))
        conn.execute(backfill)
    assert {i: r["segment_id"] for i, r in _rows(conn, chat_id).items()} == before


@pytest.mark.parametrize("path", ["transaction", "pipeline"])
def test_an_answer_landing_beside_a_new_message_starts_its_own_segment(
    tree_db: psycopg.Connection[Any], database_url: str, path: str
) -> None:
    """A user message is added under the prompt (its transaction still open) as the generation that
    answers the prompt ends: the two are children of one message, and only one continues its segment.
    Both ways a generation ends: finish() in a transaction (the reaper, a cancel), and the run's
    persist_terminal, whose statements go out together on a pipeline."""
    conn = tree_db
    user_id, chat_id = _user_and_chat(conn)
    prompt = _add(conn, user_id, chat_id, None, "user")
    generation = conn.execute(
        "INSERT INTO generations (chat_id, user_id, model, status, started_at, parent_message_id)"
        " VALUES (%s, %s, 'mock', 'streaming', now(), %s) RETURNING id::text",
        (chat_id, user_id, prompt),
    ).fetchone()["id"]
    conn.commit()

    with psycopg.connect(database_url, row_factory=dict_row) as other:
        other.execute("SELECT 1")  # a transaction of its own, open: the chat locked, the message written
        owned_chat_for_update(other, user_id=user_id, chat_id=chat_id)
        insert_message(other, chat_id=chat_id, role="user", content="beside", parent_id=prompt)

        finished: list[Any] = []

        row = {"id": generation, "chat_id": chat_id, "user_id": user_id, "model": "mock"}
        outcome = Outcome(status="succeeded", text="the answer", finish_reason="stop")

        def finish() -> None:
            if path == "pipeline":
                finished.append(generations.persist_terminal(generation=row, outcome=outcome))
                return
            with psycopg.connect(database_url, row_factory=dict_row) as mine, mine.transaction():
                finished.append(
                    generations.finish(mine, generation=row, outcome=outcome, from_states=("streaming",))
                )

        thread = threading.Thread(target=finish)
        thread.start()
        time.sleep(0.5)
        assert thread.is_alive()  # waiting for the chat's row lock
        other.commit()
    thread.join(10)
    assert finished and finished[0]["status"] == "succeeded"
    # Its events went out with it, once: ending it again (a reaper, a second run) changes nothing.
    events_sql = (
        "SELECT payload->>'action' AS action FROM outbox WHERE payload->'metadata'->>'generationId' = %s"
    )
    assert [r["action"] for r in conn.execute(events_sql, (generation,))] == ["generation.finished"]
    again = Outcome(status="failed", text="late", error_code="internal_error", error_message="x")
    if path == "pipeline":
        assert generations.persist_terminal(generation=row, outcome=again)["status"] == "succeeded"
    else:
        with conn.transaction():
            assert generations.finish(conn, generation=row, outcome=again, from_states=("streaming",)) is None
    assert [r["action"] for r in conn.execute(events_sql, (generation,))] == ["generation.finished"]
    conn.commit()

    rows = _rows(conn, chat_id)
    children = [r for r in rows.values() if r["parent_id"] == prompt]
    assert sorted(r["content"] for r in children) == ["beside", "the answer"]
    continuing = [r for r in children if r["segment_id"] == rows[prompt]["segment_id"]]
    assert [r["content"] for r in continuing] == ["beside"]  # the first committed; the answer forks
    for child in children:
        assert _listed(conn, user_id, chat_id, child["id"], 50) == [prompt, child["id"]]
