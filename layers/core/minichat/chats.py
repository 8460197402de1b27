"""Chats and their messages. Every query is scoped to the owner: another user's chat is not found."""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg.rows import tuple_row

from minichat import db, events
from minichat.errors import NotFound
from minichat.serialize import chat_out, message_out
from minichat.validate import decode_cursor, encode_cursor

__all__ = [
    "add_message",
    "create_chat",
    "delete_chat",
    "get_chat",
    "insert_message",
    "list_chats",
    "list_messages",
    "owned_chat_for_update",
    "rename_chat",
    "title_from",
]

_CHAT_COLUMNS = "id, title, created_at, updated_at"
_MESSAGE_COLUMNS = "id, seq, chat_id, role, content, generation_id, created_at"
_TITLE_LEN = 80
_SPACES = re.compile(r"\s+")


def title_from(content: str) -> str:
    """A chat title from its first message: one line, whitespace collapsed, cut at a word."""
    text = _SPACES.sub(" ", content).strip()
    if len(text) <= _TITLE_LEN:
        return text or "New chat"
    cut = text[: _TITLE_LEN - 1]
    if " " in cut[_TITLE_LEN // 2 :]:
        cut = cut[: cut.rindex(" ")]
    return cut.rstrip() + "…"


def create_chat(*, user_id: str, title: str | None) -> dict[str, Any]:
    with db.transaction() as conn:
        row = conn.execute(
            f"INSERT INTO chats (user_id, title) VALUES (%s, %s) RETURNING {_CHAT_COLUMNS}", (user_id, title)
        ).fetchone()
        assert row is not None
        events.record_audit(conn, user_id=user_id, action="chat.created", metadata={"chatId": str(row["id"])})
    return chat_out(row)


# A chats cursor: (updated_at in µs since the epoch, the id's high and low 64 bits); messages: (seq).
CHATS_CURSOR_SIZE = 3
MESSAGES_CURSOR_SIZE = 1
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_FIRST_US = (datetime.min.replace(tzinfo=UTC) - _EPOCH) // _MICROSECOND
_LAST_US = (datetime.max.replace(tzinfo=UTC) - _EPOCH) // _MICROSECOND
_U64 = 2**64


def _chats_cursor(updated_at: datetime, chat_id: uuid.UUID) -> str:
    high, low = divmod(chat_id.int, _U64)
    signed = [value - _U64 if value >= 2**63 else value for value in (high, low)]
    return encode_cursor([(updated_at - _EPOCH) // _MICROSECOND, *signed])


def _chats_position(cursor: str | None) -> tuple[datetime, uuid.UUID] | None:
    """Any cursor of the right shape is a position: a time beyond the calendar is clamped to its ends."""
    position = decode_cursor(cursor, size=CHATS_CURSOR_SIZE)
    if position is None:
        return None
    micros, high, low = position
    updated_at = _EPOCH + min(max(micros, _FIRST_US), _LAST_US) * _MICROSECOND
    return updated_at, uuid.UUID(int=(high % _U64) * _U64 + low % _U64)


def list_chats(*, user_id: str, limit: int, cursor: str | None) -> dict[str, Any]:
    """Newest `updatedAt` first; keyset pagination on (updated_at, id)."""
    position = _chats_position(cursor)
    params: list[Any] = [user_id]
    where = ""
    if position is not None:
        where = "AND (updated_at, id) < (%s, %s)"
        params += list(position)
    with db.read() as conn:
        rows = conn.execute(
            f"SELECT {_CHAT_COLUMNS} FROM chats WHERE user_id = %s {where}"
            " ORDER BY updated_at DESC, id DESC LIMIT %s",
            [*params, limit + 1],
        ).fetchall()
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        last = rows[-1]
        next_cursor = _chats_cursor(last["updated_at"], last["id"])
    return {"items": [chat_out(r) for r in rows], "nextCursor": next_cursor}


def get_chat(*, user_id: str, chat_id: str) -> dict[str, Any]:
    with db.read() as conn:
        row = conn.execute(
            f"SELECT {_CHAT_COLUMNS} FROM chats WHERE id = %s AND user_id = %s", (chat_id, user_id)
        ).fetchone()
    if row is None:
        raise NotFound("Chat not found.")
    return chat_out(row)


def rename_chat(*, user_id: str, chat_id: str, title: str) -> dict[str, Any]:
    with db.transaction() as conn:
        row = conn.execute(
            f"UPDATE chats SET title = %s, updated_at = now() WHERE id = %s AND user_id = %s"
            f" RETURNING {_CHAT_COLUMNS}",
            (title, chat_id, user_id),
        ).fetchone()
    if row is None:
        raise NotFound("Chat not found.")
    return chat_out(row)


def owned_chat_for_update(conn: db.Conn, *, user_id: str, chat_id: str) -> dict[str, Any]:
    """Lock the user's chat row for this transaction; NotFound for anyone else's."""
    row = conn.execute(
        f"SELECT {_CHAT_COLUMNS} FROM chats WHERE id = %s AND user_id = %s FOR UPDATE", (chat_id, user_id)
    ).fetchone()
    if row is None:
        raise NotFound("Chat not found.")
    return row


def delete_chat(*, user_id: str, chat_id: str) -> None:
    """Delete a chat and its messages; usage already counted stays counted."""
    with db.transaction() as conn:
        owned_chat_for_update(conn, user_id=user_id, chat_id=chat_id)
        conn.execute("DELETE FROM chats WHERE id = %s", (chat_id,))
        events.record_audit(conn, user_id=user_id, action="chat.deleted", metadata={"chatId": chat_id})


def insert_message(
    conn: db.Conn, *, chat_id: str, role: str, content: str, generation_id: str | None = None
) -> dict[str, Any]:
    """Append a message and bump the chat (title from the first user message when it has none)."""
    conn.execute(
        "UPDATE chats SET updated_at = now(),"
        " title = CASE WHEN title IS NULL AND %s = 'user' THEN %s ELSE title END WHERE id = %s",
        (role, title_from(content), chat_id),
    )
    row = conn.execute(
        f"INSERT INTO messages (chat_id, role, content, generation_id) VALUES (%s, %s, %s, %s)"
        f" RETURNING {_MESSAGE_COLUMNS}",
        (chat_id, role, content, generation_id),
    ).fetchone()
    assert row is not None
    return row


def add_message(*, user_id: str, chat_id: str, content: str) -> dict[str, Any]:
    with db.transaction() as conn:
        owned_chat_for_update(conn, user_id=user_id, chat_id=chat_id)
        row = insert_message(conn, chat_id=chat_id, role="user", content=content)
    return message_out(row)


def list_messages(*, user_id: str, chat_id: str, limit: int, cursor: str | None) -> str:
    """Oldest first; keyset pagination on the insertion sequence, stable under inserts.

    The reply is JSON text (`{"items": [...], "nextCursor": ...}`) whose items PostgreSQL wrote: no
    Python object is made per message only to be encoded again (that cost more than the query).
    """
    position = decode_cursor(cursor, size=MESSAGES_CURSOR_SIZE)
    after = position[0] if position is not None else 0
    with db.read() as conn:
        # One round trip: the ownership check rides along as a join (a chat without messages: one row
        # of NULLs; another user's chat: no row). Rows as tuples: (seq, item).
        rows = (
            conn.cursor(row_factory=tuple_row)
            .execute(_LIST_MESSAGES, {"after": after, "limit": limit, "chat_id": chat_id, "user_id": user_id})
            .fetchall()
        )
    if not rows:
        raise NotFound("Chat not found.")
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_cursor = encode_cursor([rows[-1][0]])
    items = ",".join(item for _, item in rows if item is not None)
    return f'{{"items":[{items}],"nextCursor":{json.dumps(next_cursor)}}}'


# serialize.message_out's shape, written by PostgreSQL (measured: a third of the CPU of rows made into
# dicts and encoded here, and less than json_build_object or row_to_json). to_json escapes the content;
# to_char truncates to milliseconds as serialize.iso does. tests/integration/test_chats_api.py checks
# that a listed message equals the one its POST returned.
_LIST_MESSAGES = """
    SELECT m.seq,
           '{"id":"' || m.id || '","chatId":"' || m.chat_id || '","role":"' || m.role
           || '","content":' || to_json(m.content)
           || ',"generationId":' || coalesce('"' || m.generation_id || '"', 'null')
           || ',"createdAt":"' || to_char(m.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')
           || '"}' AS item
    FROM chats c LEFT JOIN LATERAL (
        SELECT * FROM messages WHERE chat_id = c.id AND seq > %(after)s ORDER BY seq LIMIT %(limit)s + 1
    ) m ON true
    WHERE c.id = %(chat_id)s AND c.user_id = %(user_id)s
    ORDER BY m.seq
"""
