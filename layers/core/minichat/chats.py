"""Chats and their messages. Every query is scoped to the owner: another user's chat is not found.

A chat's messages form a tree (SPEC §7.1): each has a parent (null at the root of a branch), and the chat
shows the path from a root to its active leaf. A child is always newer than its parent, so `seq` grows
along every path: the path's keyset pagination is the flat list's, and the newest message of a subtree
is always one of its leaves.
"""

from __future__ import annotations

import json
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg import errors as pg_errors
from psycopg.rows import tuple_row

from minichat import db, events
from minichat.errors import MiniChatError, NotFound, ValidationError
from minichat.serialize import chat_out, message_out
from minichat.validate import decode_cursor, encode_cursor

__all__ = [
    "ASSISTANT_MAX_CHARS",
    "add_message",
    "answer_insert",
    "create_chat",
    "delete_chat",
    "get_chat",
    "insert_message",
    "list_chats",
    "list_messages",
    "owned_chat_for_update",
    "path_segments",
    "queue_prompt",
    "refusal",
    "repair_text",
    "title_from",
    "update_chat",
]

_CHAT_COLUMNS = "id, title, active_leaf_id, created_at, updated_at"
_TITLE_LEN = 80
_SPACES = re.compile(r"\s+")
# SPEC §7.3: the bound of an assistant message (the messages table's CHECK), and the two characters a
# model can send that PostgreSQL text cannot hold: NUL, and a lone surrogate (no UTF-8 form).
ASSISTANT_MAX_CHARS = 200_000
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _replacement(match: re.Match[str]) -> str:
    return "" if match.group() == "\x00" else "\ufffd"


def repair_text(text: str) -> str:
    """Model text as the database can store it: NUL removed, each lone surrogate made U+FFFD."""
    if text.isascii() and "\x00" not in text:  # the common case, without a regex
        return text
    return _UNSTORABLE.sub(_replacement, text)


def _siblings(message: str) -> str:
    """SQL: the ids (uuid[]) of the messages sharing `message`'s parent and role, oldest first.

    Two index-only lookups, one per case: the roots of one chat, or the children of one message.
    """
    return f"""CASE WHEN {message}.parent_id IS NULL
        THEN ARRAY(SELECT s.id FROM messages s WHERE s.chat_id = {message}.chat_id AND s.parent_id IS NULL
                   AND s.role = {message}.role ORDER BY s.seq)
        ELSE ARRAY(SELECT s.id FROM messages s WHERE s.parent_id = {message}.parent_id
                   AND s.role = {message}.role ORDER BY s.seq)
        END"""


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


def update_chat(
    *, user_id: str, chat_id: str, title: str | None, active_leaf_id: str | None
) -> dict[str, Any]:
    """Rename a chat and/or switch its branch.

    `active_leaf_id` may name any message of the chat: the chat then shows the newest leaf under it (that
    message itself when it has no replies), so a client switching to a sibling lands on the branch last
    written under it. Only a rename bumps `updatedAt`: switching branches is reading, not writing.
    """
    with db.transaction() as conn:
        owned_chat_for_update(conn, user_id=user_id, chat_id=chat_id)
        leaf = None
        if active_leaf_id is not None:
            found = conn.execute(_NEWEST_LEAF, {"chat_id": chat_id, "message_id": active_leaf_id}).fetchone()
            if found is None:
                raise NotFound("Message not found.")
            leaf = found["id"]
        row = conn.execute(
            "UPDATE chats SET title = coalesce(%(title)s, title),"
            " updated_at = CASE WHEN %(title)s::text IS NULL THEN updated_at ELSE now() END,"
            " active_leaf_id = coalesce(%(leaf)s, active_leaf_id)"
            f" WHERE id = %(chat_id)s RETURNING {_CHAT_COLUMNS}",
            {"title": title, "leaf": leaf, "chat_id": chat_id},
        ).fetchone()
    assert row is not None
    return chat_out(row)


# The newest message under one of the chat's messages (itself included): always a leaf, as any reply
# would be newer. Walks the subtree through messages_parent_idx.
_NEWEST_LEAF = """
    WITH RECURSIVE subtree AS (
        SELECT id, seq FROM messages WHERE id = %(message_id)s AND chat_id = %(chat_id)s
        UNION ALL
        SELECT m.id, m.seq FROM subtree JOIN messages m ON m.parent_id = subtree.id
    )
    SELECT id FROM subtree ORDER BY seq DESC LIMIT 1
"""


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
    conn: db.Conn, *, chat_id: str, role: str, content: str, parent_id: str | None = None
) -> dict[str, Any]:
    """Add a message under `parent_id` and make it the chat's active leaf, in one statement.

    The chat is bumped (and titled from its first user message when it has none). The caller holds the
    chat's row lock (owned_chat_for_update): the message's segment depends on the other children of its
    parent.
    """
    row = conn.execute(
        _INSERT_MESSAGE, _message_params(chat_id=chat_id, role=role, content=content, parent_id=parent_id)
    ).fetchone()
    assert row is not None
    return row


def answer_insert(*, chat_id: str, generation_id: str, content: str) -> db.Statement:
    """A generation's answer: under the message it answers whatever the chat shows by now, and the chat's
    active leaf. The statement, for the caller's connection to run; nothing is read back, so on a
    pipeline it goes out with the statements around it. The caller holds the chat's row lock, taken by an
    earlier statement (generations.finish)."""
    return _INSERT_MESSAGE, _message_params(
        chat_id=chat_id, role="assistant", content=content, generation_id=generation_id
    )


def _message_params(
    *, chat_id: str, role: str, content: str, parent_id: str | None = None, generation_id: str | None = None
) -> dict[str, Any]:
    return {
        "chat_id": chat_id,
        "role": role,
        "content": content,
        "parent_id": parent_id,
        "generation_id": generation_id,
        "title": title_from(content),
    }


# Its siblings are found before the row exists (a statement's subqueries do not see its own insert):
# the others, then itself, the newest. They and it are marked `forked` when there are any, so that a
# listed message looks its siblings up only then. It continues its parent's segment when it is the
# parent's first child, and starts its own otherwise (a root always does): the caller holds the chat's
# row lock, taken by an earlier statement, so this statement's snapshot sees every other child. The
# chat's active_leaf_id key is checked at the end of the statement, once the row exists.
def _insert_message_sql(parent: str) -> str:
    """The message insert, its parent (unless it is an answer) the SQL expression `parent`."""
    return f"""
    WITH place AS (
        SELECT gen_random_uuid() AS id, %(chat_id)s::uuid AS chat_id, %(role)s::text AS role,
               CASE WHEN %(generation_id)s::uuid IS NULL THEN {parent}
                    ELSE g.parent_message_id END AS parent_id
        FROM (VALUES (1)) AS one LEFT JOIN generations g ON g.id = %(generation_id)s::uuid
    ), older AS (
        SELECT {_siblings("place")} AS ids FROM place
    ), fork AS (
        UPDATE messages m SET forked = true FROM older WHERE m.id = ANY(older.ids) AND NOT m.forked
    ), new AS (
        INSERT INTO messages (id, chat_id, parent_id, role, content, generation_id, forked, segment_id)
        SELECT place.id, place.chat_id, place.parent_id, place.role, %(content)s::text,
               %(generation_id)s::uuid, cardinality(older.ids) > 0,
               CASE WHEN place.parent_id IS NULL
                         OR EXISTS (SELECT 1 FROM messages c WHERE c.parent_id = place.parent_id)
                    THEN place.id
                    ELSE (SELECT p.segment_id FROM messages p WHERE p.id = place.parent_id)
               END
        FROM place, older
        RETURNING id, seq, chat_id, parent_id, role, content, generation_id, created_at
    ), chat AS (
        UPDATE chats SET updated_at = now(), active_leaf_id = (SELECT id FROM new),
            title = CASE WHEN title IS NULL AND %(role)s = 'user' THEN %(title)s ELSE title END
        WHERE id = %(chat_id)s
    )
    SELECT new.*, older.ids || new.id AS sibling_ids FROM new, older
"""


_INSERT_MESSAGE = _insert_message_sql("%(parent_id)s::uuid")


def path_segments(leaf: str, *, after: str = "0") -> str:
    """SQL: a recursive CTE body `path_segments(segment_id, upto)`, the segments of the path that ends at
    the message id `leaf` (an SQL expression), each with the seq of its last message on the path.

    One step per fork along the path (two primary-key lookups: the segment's first message, and that
    one's parent), and no further back than the seq `after`. A path's messages are then the messages
    of these segments up to `upto` (messages_segment_idx), oldest segment first: a segment's messages
    all come after its parent's segment's messages on the path.
    """
    return f"""path_segments AS (
        SELECT m.segment_id, m.seq AS upto FROM messages m WHERE m.id = {leaf}
        UNION ALL
        SELECT p.segment_id, p.seq
        FROM path_segments s JOIN messages h ON h.id = s.segment_id JOIN messages p ON p.id = h.parent_id
        WHERE h.seq > {after}
    )"""


def queue_prompt(
    conn: db.Conn,
    *,
    user_id: str,
    chat_id: str,
    content: str | None,
    edit_of: str | None,
    regenerate_of: str | None,
) -> None:
    """Queue, on a pipelined transaction (db.batch), the statements that place a generation's prompt.

    First the user's chat is locked (for the rest of the transaction: the insert that follows depends on
    the other children of its parent) and the message it branches from is checked; a failed check
    refuses (minichat_refuse), which ends the batch (see `refusal`). Then plain `content` goes under the
    active leaf, an edit beside `edit_of`; a regenerate adds nothing and shows the parent of
    `regenerate_of` until the new answer arrives. Afterwards the chat's active leaf is the message the
    answer will follow, whichever it was (none: the active leaf as it was).
    """
    branch_of, role, field = (
        (edit_of, "user", "editOf") if edit_of is not None else (regenerate_of, "assistant", "regenerateOf")
    )
    conn.execute(
        _CHECK_PROMPT,
        {"chat_id": chat_id, "user_id": user_id, "branch_of": branch_of, "role": role, "field": field},
    )
    if regenerate_of is not None:
        conn.execute(_SHOW_PARENT, {"chat_id": chat_id, "message_id": regenerate_of})
    elif content is not None:
        conn.execute(
            _INSERT_PROMPT,
            {**_message_params(chat_id=chat_id, role="user", content=content), "edit_of": edit_of},
        )


def refusal(error: pg_errors.RaiseException) -> MiniChatError | None:
    """The API error for a check of `queue_prompt` that refused (None: not one of its refusals)."""
    code = error.diag.constraint_name
    if code == "chat_not_found":
        return NotFound("Chat not found.")
    if code == "message_not_found":
        return NotFound("Message not found.")
    if code in _BRANCH_ROLES:
        role = _BRANCH_ROLES[code]
        return ValidationError(f"'{code}' must be the id of a message with role '{role}'.", field=code)
    return None


_BRANCH_ROLES = {"editOf": "user", "regenerateOf": "assistant"}

# The chat's row lock, then the checks in the order a create is refused: the chat is the user's, the
# message it branches from is the chat's, with the right role (the field that named it is the code).
_CHECK_PROMPT = """
    WITH chat AS (
        SELECT id FROM chats WHERE id = %(chat_id)s AND user_id = %(user_id)s FOR UPDATE
    ), branch AS (
        SELECT role FROM messages WHERE id = %(branch_of)s::uuid AND chat_id = %(chat_id)s
    )
    SELECT minichat_refuse(CASE
        WHEN NOT EXISTS (SELECT FROM chat) THEN 'chat_not_found'
        WHEN %(branch_of)s::uuid IS NULL THEN NULL
        WHEN NOT EXISTS (SELECT FROM branch) THEN 'message_not_found'
        WHEN (SELECT role FROM branch) <> %(role)s::text THEN %(field)s::text
    END)
"""

_SHOW_PARENT = """
    UPDATE chats SET active_leaf_id = (SELECT parent_id FROM messages WHERE id = %(message_id)s)
    WHERE id = %(chat_id)s
"""

# A prompt: under the chat's active leaf, or beside the message it edits.
_INSERT_PROMPT = _insert_message_sql(
    """CASE WHEN %(edit_of)s::uuid IS NULL
                         THEN (SELECT c.active_leaf_id FROM chats c WHERE c.id = %(chat_id)s::uuid)
                         ELSE (SELECT e.parent_id FROM messages e WHERE e.id = %(edit_of)s::uuid) END"""
)


def add_message(*, user_id: str, chat_id: str, content: str) -> dict[str, Any]:
    """A user message after the chat's active leaf."""
    with db.transaction() as conn:
        chat = owned_chat_for_update(conn, user_id=user_id, chat_id=chat_id)
        row = insert_message(
            conn, chat_id=chat_id, role="user", content=content, parent_id=chat["active_leaf_id"]
        )
    return message_out(row)


def list_messages(
    *, user_id: str, chat_id: str, limit: int, cursor: str | None, leaf_id: str | None = None
) -> str:
    """The path from the root to the active leaf (or to `leaf_id`), oldest first.

    Keyset pagination on the insertion sequence, which grows along a path: a page after the cursor is
    stable while a generation appends to the branch. The reply is JSON text (`{"items": [...],
    "nextCursor": ...}`) whose items PostgreSQL wrote: no Python object is made per message only to be
    encoded again (that cost more than the query).
    """
    position = decode_cursor(cursor, size=MESSAGES_CURSOR_SIZE)
    after = position[0] if position is not None else 0
    params = {"after": after, "limit": limit, "chat_id": chat_id, "user_id": user_id, "leaf_id": leaf_id}
    with db.read() as conn:
        # One round trip: the ownership check rides along (a chat with an empty path: one row of NULLs
        # after its leaf; another user's chat: no row). Rows as tuples: (leaf, seq, item).
        rows = conn.cursor(row_factory=tuple_row).execute(_LIST_PATH, params).fetchall()
    if not rows:
        raise NotFound("Chat not found.")
    if leaf_id is not None and rows[0][0] is None:
        raise NotFound("Message not found.")
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_cursor = encode_cursor([rows[-1][1]])
    items = ",".join(item for _, _, item in rows if item is not None)
    return f'{{"items":[{items}],"nextCursor":{json.dumps(next_cursor)}}}'


# The path's segments are found from the leaf (chats.path_segments), and the page is the first `limit`
# messages after the cursor of each, at most (an index range scan each), merged. Only the page's rows are
# read in full, and only a `forked` one (it has siblings) looks them up: most messages have none.
# The items are serialize.message_out's shape, written by PostgreSQL (measured: a third of the CPU of
# rows made into dicts and encoded here, and less than json_build_object or row_to_json). to_json
# escapes the content; to_char truncates to milliseconds as serialize.iso does.
# tests/integration/test_chats_api.py checks that a listed message equals the one its POST returned.
_LIST_PATH = f"""
    WITH RECURSIVE head AS (
        SELECT CASE WHEN %(leaf_id)s::uuid IS NULL THEN c.active_leaf_id
                    ELSE (SELECT m.id FROM messages m WHERE m.id = %(leaf_id)s::uuid AND m.chat_id = c.id)
               END AS leaf_id
        FROM chats c WHERE c.id = %(chat_id)s AND c.user_id = %(user_id)s
    ), {path_segments("(SELECT leaf_id FROM head)", after="%(after)s")}, page AS (
        SELECT x.id, x.seq FROM path_segments s, LATERAL (
            SELECT m.id, m.seq FROM messages m
            WHERE m.segment_id = s.segment_id AND m.seq > %(after)s AND m.seq <= s.upto
            ORDER BY m.seq LIMIT %(limit)s + 1
        ) x
        ORDER BY x.seq LIMIT %(limit)s + 1
    )
    SELECT head.leaf_id, m.seq,
           '{{"id":"' || m.id || '","chatId":"' || m.chat_id
           || '","parentId":' || coalesce('"' || m.parent_id || '"', 'null')
           || ',"role":"' || m.role
           || '","content":' || to_json(m.content)
           || ',"generationId":' || coalesce('"' || m.generation_id || '"', 'null')
           || ',"createdAt":"' || to_char(m.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')
           || '","siblingIds":'
           || CASE WHEN m.forked THEN array_to_json({_siblings("m")})::text ELSE '["' || m.id || '"]' END
           || '}}' AS item
    FROM head LEFT JOIN (page JOIN messages m ON m.id = page.id) ON true
    ORDER BY m.seq
"""
