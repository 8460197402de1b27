"""Generation lifecycle: create, transitions (conditional updates only), cancel, chat deletion.

queued → streaming → succeeded | canceled | failed; queued → canceled | failed. Every transition is an
UPDATE guarded by the states it may leave, so a race between cancel, completion and the reaper has
exactly one winner.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import redis
from psycopg import errors as pg_errors

from minichat import auth, db, events, kv, limits
from minichat.chats import delete_chat as _delete_chat_rows
from minichat.chats import insert_message, owned_chat_for_update
from minichat.errors import GenerationInFlight, InvalidToken, NotFound, ServiceUnavailable
from minichat.log import get_logger
from minichat.serialize import iso

__all__ = [
    "CANCEL_CHANNEL",
    "COLUMNS",
    "IN_FLIGHT",
    "TERMINAL",
    "cancel_generation",
    "cancel_key",
    "claim",
    "create_generation",
    "delete_chat",
    "events_key",
    "final_state",
    "finish",
    "generation_out",
    "get_generation",
    "heartbeat",
    "history",
    "open_for_stream",
    "persist_terminal",
    "stale",
    "status_of",
    "stream_url",
]

log = get_logger("minichat.generations")

TERMINAL = ("succeeded", "canceled", "failed")
IN_FLIGHT = ("queued", "streaming")
COLUMNS = (
    "id, chat_id, user_id, status, model, system_prompt, temperature, max_tokens, input_tokens,"
    " output_tokens, usage_estimated, created_at, started_at, finished_at, error_code, error_message,"
    " request_id"
)
CANCEL_CHANNEL = "minichat:cancel"
_CANCEL_FLAG_TTL = 3600
# A lock younger than this whose generation row is not visible yet belongs to a create still committing.
_FRESH_LOCK_MS = 5_000
_HISTORY_LIMIT = 400


def cancel_key(generation_id: str) -> str:
    return f"generation:{generation_id}:cancel"


def events_key(generation_id: str) -> str:
    """The generation's event buffer (a Redis Stream of encoded SSE frames, entry ids `0-<n>`)."""
    return f"generation:{generation_id}:events"


def generation_out(row: dict[str, Any]) -> dict[str, Any]:
    """The contract's Generation shape."""
    return {
        "id": str(row["id"]),
        "chatId": str(row["chat_id"]),
        "status": row["status"],
        "model": row["model"],
        "systemPrompt": row["system_prompt"],
        "temperature": row["temperature"],
        "maxTokens": row["max_tokens"],
        "inputTokens": row["input_tokens"],
        "outputTokens": row["output_tokens"],
        "createdAt": iso(row["created_at"]),
        "startedAt": iso(row["started_at"]),
        "finishedAt": iso(row["finished_at"]),
        "errorCode": row["error_code"],
        "errorMessage": row["error_message"],
        "requestId": row["request_id"],
    }


def stream_url(*, user_id: str, generation_id: str) -> str:
    """A same-origin path an EventSource can open: the ticket opens this one stream only."""
    ticket = auth.issue_stream_ticket(user_id=user_id, generation_id=generation_id)
    return f"/api/generations/{generation_id}/stream?ticket={ticket}"


def _running_generation(conn: db.Conn, user_id: str) -> str | None:
    row = conn.execute(
        "SELECT id FROM generations WHERE user_id = %s AND status IN ('queued', 'streaming')", (user_id,)
    ).fetchone()
    return str(row["id"]) if row else None


def _take_lock(client: redis.Redis, *, user_id: str, generation_id: str) -> None:
    """Acquire the user's in-flight lock, clearing one left behind by a generation that has ended."""
    for _ in range(2):
        if limits.acquire_inflight(client, user_id=user_id, generation_id=generation_id):
            return
        holder = limits.inflight_holder(client, user_id)
        if holder is None:
            continue  # released in between: try again
        with db.read() as conn:
            row = conn.execute("SELECT status FROM generations WHERE id = %s", (holder,)).fetchone()
        if row is not None and row["status"] in IN_FLIGHT:
            raise GenerationInFlight(holder)
        if row is None and client.pttl(limits.inflight_key(user_id)) > limits.LOCK_TTL_MS - _FRESH_LOCK_MS:
            raise GenerationInFlight(holder)  # its create is still committing
        # A lock left behind by a terminal (or vanished) generation never blocks.
        limits.release_inflight(client, user_id=user_id, generation_id=holder)
    holder = limits.inflight_holder(client, user_id)
    raise GenerationInFlight(holder or "")


def create_generation(
    *,
    user_id: str,
    chat_id: str,
    content: str | None,
    model: str,
    system_prompt: str | None,
    temperature: float | None,
    max_tokens: int | None,
    request_id: str | None,
) -> dict[str, Any]:
    """Queue a generation (with the user's message, in one transaction) under the in-flight lock."""
    generation_id = str(uuid.uuid4())
    client = kv.get_redis()
    try:
        _take_lock(client, user_id=user_id, generation_id=generation_id)
    except redis.RedisError as exc:
        # Fail closed: without the lock there is no cheap guard against a second generation.
        raise ServiceUnavailable("Generations are unavailable right now; retry shortly.") from exc
    except GenerationInFlight:
        # A chat that is missing or someone else's is 404 whatever else is running (checked only on
        # this path, so the usual create pays no extra round trip).
        with db.read() as conn:
            if (
                conn.execute(
                    "SELECT 1 FROM chats WHERE id = %s AND user_id = %s", (chat_id, user_id)
                ).fetchone()
                is None
            ):
                raise NotFound("Chat not found.") from None
        raise
    try:
        with db.transaction() as conn:
            owned_chat_for_update(conn, user_id=user_id, chat_id=chat_id)
            if content is not None:
                insert_message(conn, chat_id=chat_id, role="user", content=content)
            try:
                with conn.transaction():  # a savepoint: the backstop's violation must not end the transaction
                    row = conn.execute(
                        f"""
                        INSERT INTO generations
                            (id, chat_id, user_id, model, system_prompt, temperature, max_tokens, request_id)
                        VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
                        RETURNING {COLUMNS}
                        """,
                        (
                            generation_id,
                            chat_id,
                            user_id,
                            model,
                            system_prompt,
                            temperature,
                            max_tokens,
                            request_id,
                        ),
                    ).fetchone()
            except pg_errors.UniqueViolation:
                # The partial unique index caught what the lock did not (Redis lost the key).
                raise GenerationInFlight(_running_generation(conn, user_id) or "") from None
            assert row is not None
            events.record_audit(
                conn,
                user_id=user_id,
                action="generation.created",
                metadata={"generationId": generation_id, "chatId": chat_id, "model": model},
            )
    except BaseException:
        _release_quietly(client, user_id=user_id, generation_id=generation_id)
        raise
    return {
        "generationId": generation_id,
        "generation": generation_out(row),
        "streamUrl": stream_url(user_id=user_id, generation_id=generation_id),
    }


def _release_quietly(client: redis.Redis, *, user_id: str, generation_id: str) -> None:
    try:
        limits.release_inflight(client, user_id=user_id, generation_id=generation_id)
    except redis.RedisError:
        log.warning("lock release failed; it expires on its own", generation_id=generation_id)


def get_generation(*, user_id: str, generation_id: str) -> dict[str, Any]:
    with db.read() as conn:
        row = _owned(conn, user_id=user_id, generation_id=generation_id)
    return generation_out(row)


def _owned(conn: db.Conn, *, user_id: str, generation_id: str) -> dict[str, Any]:
    row = conn.execute(
        f"SELECT {COLUMNS} FROM generations WHERE id = %s AND user_id = %s", (generation_id, user_id)
    ).fetchone()
    if row is None:
        raise NotFound("Generation not found.")
    return row


def claim(conn: db.Conn, *, generation_id: str, user_id: str) -> dict[str, Any] | None:
    """queued → streaming: the first stream connection's claim to run the model (one winner)."""
    return conn.execute(
        f"""
        UPDATE generations SET status = 'streaming', started_at = now(), heartbeat_at = now()
        WHERE id = %s AND user_id = %s AND status = 'queued'
        RETURNING {COLUMNS}
        """,
        (generation_id, user_id),
    ).fetchone()


def stale(conn: db.Conn, *, queued_for: float, silent_for: float, limit: int = 100) -> list[dict[str, Any]]:
    """In-flight generations the reaper should end: queued with no stream opened, or streaming with no
    heartbeat (their process died)."""
    return conn.execute(
        """
        SELECT id, user_id, status FROM generations
        WHERE (status = 'queued' AND created_at < now() - make_interval(secs => %s))
           OR (status = 'streaming'
               AND COALESCE(heartbeat_at, created_at) < now() - make_interval(secs => %s))
        ORDER BY created_at
        LIMIT %s
        """,
        (queued_for, silent_for, limit),
    ).fetchall()


def history(conn: db.Conn, chat_id: str) -> list[tuple[str, str]]:
    """(role, content) of the chat's newest messages, oldest first."""
    rows = conn.execute(
        "SELECT role, content FROM (SELECT role, content, seq FROM messages WHERE chat_id = %s"
        " ORDER BY seq DESC LIMIT %s) m ORDER BY seq",
        (chat_id, _HISTORY_LIMIT),
    ).fetchall()
    return [(r["role"], r["content"]) for r in rows]


def finish(
    conn: db.Conn,
    *,
    generation_id: str,
    status: str,
    from_states: tuple[str, ...],
    text: str = "",
    input_tokens: int = 0,
    output_tokens: int = 0,
    estimated: bool = False,
    error_code: str | None = None,
    error_message: str | None = None,
    silent_for: float | None = None,
) -> dict[str, Any] | None:
    """The terminal transition, the assistant message and the usage event in the caller's transaction.

    `silent_for` (the reaper): only if nothing has been heard of the generation for that many seconds,
    checked in the same statement, so a heartbeat that lands first keeps it alive.
    Returns the updated row, or None when another party ended the generation first.
    """
    assert status in TERMINAL
    row = conn.execute(
        f"""
        UPDATE generations
        SET status = %s, finished_at = now(), input_tokens = %s, output_tokens = %s,
            usage_estimated = %s, error_code = %s, error_message = %s
        WHERE id = %s AND status = ANY(%s)
          AND (%s::float8 IS NULL
               OR COALESCE(heartbeat_at, created_at) < now() - make_interval(secs => %s::float8))
        RETURNING {COLUMNS}
        """,
        (
            status,
            input_tokens,
            output_tokens,
            estimated,
            error_code,
            error_message,
            generation_id,
            list(from_states),
            silent_for,
            silent_for,
        ),
    ).fetchone()
    if row is None:
        return None
    if text:
        insert_message(
            conn, chat_id=row["chat_id"], role="assistant", content=text, generation_id=generation_id
        )
    user_id = str(row["user_id"])
    if input_tokens or output_tokens:
        events.record_usage(
            conn,
            user_id=user_id,
            generation_id=generation_id,
            model=row["model"],
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            estimated=estimated,
        )
    metadata: dict[str, Any] = {"generationId": generation_id, "status": status}
    if error_code:
        metadata["errorCode"] = error_code
    events.record_audit(
        conn,
        user_id=user_id,
        action="generation.canceled" if status == "canceled" else "generation.finished",
        metadata=metadata,
    )
    return row


def _request_cancel(client: redis.Redis, generation_id: str) -> None:
    pipe = client.pipeline(transaction=False)
    pipe.set(cancel_key(generation_id), b"1", ex=_CANCEL_FLAG_TTL)
    pipe.publish(CANCEL_CHANNEL, generation_id)  # wakes the streaming process at once
    pipe.execute()


def cancel_generation(*, user_id: str, generation_id: str) -> dict[str, Any]:
    """Idempotent cancel: a queued generation ends now; a streaming one within 250 ms."""
    with db.read() as conn:
        row = _owned(conn, user_id=user_id, generation_id=generation_id)
    if row["status"] in TERMINAL:
        return generation_out(row)
    client = kv.get_redis()
    try:
        _request_cancel(client, generation_id)
    except redis.RedisError as exc:
        if row["status"] == "streaming":
            raise ServiceUnavailable("Cannot reach the running generation; retry shortly.") from exc
    if row["status"] == "queued":
        with db.transaction() as conn:
            ended = finish(conn, generation_id=generation_id, status="canceled", from_states=("queued",))
            row = ended or _owned(conn, user_id=user_id, generation_id=generation_id)
        if ended is not None:
            _release_quietly(client, user_id=user_id, generation_id=generation_id)
    return generation_out(row)


def delete_chat(*, user_id: str, chat_id: str, wait_s: float = 2.0) -> None:
    """Delete a chat; its running generation is ended and the user's lock freed before this returns."""
    with db.transaction() as conn:
        owned_chat_for_update(conn, user_id=user_id, chat_id=chat_id)
        running = conn.execute(
            "SELECT id, status FROM generations WHERE chat_id = %s AND status IN ('queued', 'streaming')",
            (chat_id,),
        ).fetchone()
    if running is not None:
        generation_id = str(running["id"])
        cancel_generation(user_id=user_id, generation_id=generation_id)
        deadline = time.monotonic() + wait_s
        while True:
            with db.read() as conn:
                status = conn.execute(
                    "SELECT status FROM generations WHERE id = %s", (generation_id,)
                ).fetchone()
            if status is None or status["status"] in TERMINAL or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        with db.transaction() as conn:
            # The streaming process did not answer in time (or is gone): end it here.
            finish(conn, generation_id=generation_id, status="canceled", from_states=IN_FLIGHT)
        _release_quietly(kv.get_redis(), user_id=user_id, generation_id=generation_id)
    _delete_chat_rows(user_id=user_id, chat_id=chat_id)


# --- the stream function's database work (run in its thread pool) ------------------------------------


def open_for_stream(
    *, generation_id: str, user_id: str
) -> tuple[dict[str, Any], list[tuple[str, str]] | None]:
    """Claim a queued generation (with its chat history), or just load it; NotFound for others' ids."""
    with db.transaction() as conn:
        row = claim(conn, generation_id=generation_id, user_id=user_id)
        if row is not None:
            return row, history(conn, str(row["chat_id"]))
        row = conn.execute(
            f"SELECT {COLUMNS} FROM generations WHERE id = %s AND user_id = %s", (generation_id, user_id)
        ).fetchone()
        if row is None and conn.execute("SELECT 1 FROM users WHERE id = %s", (user_id,)).fetchone() is None:
            # A ticket or token of a deleted account (its Redis marker lost): refused, as SPEC §7.4 says.
            raise InvalidToken("This account no longer exists.")
    if row is None:
        raise NotFound("Generation not found.")
    return row, None


def persist_terminal(
    *,
    generation_id: str,
    status: str,
    text: str,
    input_tokens: int,
    output_tokens: int,
    estimated: bool,
    error_code: str | None,
    error_message: str | None,
) -> dict[str, Any]:
    with db.transaction() as conn:
        row = finish(
            conn,
            generation_id=generation_id,
            status=status,
            from_states=("streaming",),
            text=text,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            estimated=estimated,
            error_code=error_code,
            error_message=error_message,
        )
        if row is None:  # ended elsewhere first (chat deleted, reaper): report what the database says
            row = conn.execute(
                f"SELECT {COLUMNS} FROM generations WHERE id = %s", (generation_id,)
            ).fetchone()
    if row is None:  # the chat, and the generation with it, is gone
        return {"status": "canceled", "input_tokens": 0, "output_tokens": 0, "usage_estimated": True}
    return row


def heartbeat(*, generation_ids: list[str]) -> None:
    with db.transaction() as conn:
        conn.execute(
            "UPDATE generations SET heartbeat_at = now() WHERE id = ANY(%s) AND status = 'streaming'",
            (generation_ids,),
        )


def status_of(*, generation_id: str) -> str | None:
    with db.read() as conn:
        row = conn.execute("SELECT status FROM generations WHERE id = %s", (generation_id,)).fetchone()
    return row["status"] if row else None


def final_state(*, generation_id: str) -> tuple[dict[str, Any], str]:
    with db.read() as conn:
        row = conn.execute(f"SELECT {COLUMNS} FROM generations WHERE id = %s", (generation_id,)).fetchone()
        message = conn.execute(
            "SELECT content FROM messages WHERE generation_id = %s", (generation_id,)
        ).fetchone()
    if row is None:
        raise NotFound("Generation not found.")
    return row, message["content"] if message else ""
