"""Generation lifecycle: create, transitions (conditional updates only), cancel, chat deletion.

queued → streaming → succeeded | canceled | failed; queued → canceled | failed. Every transition is an
UPDATE guarded by the states it may leave, so a race between cancel, completion and the reaper has
exactly one winner.
"""

from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis
from psycopg import errors as pg_errors

from minichat import accounts, admission, auth, budget, buffer, db, events, kv, limits
from minichat.chats import answer_insert, owned_chat_for_update, path_segments, queue_prompt, refusal
from minichat.chats import delete_chat as _delete_chat_rows
from minichat.config import get_settings
from minichat.errors import (
    GenerationInFlight,
    InvalidToken,
    MiniChatError,
    NotFound,
    QuotaExceeded,
    ServiceUnavailable,
)
from minichat.log import get_logger
from minichat.providers.base import ChatMessage, build_prompt, estimate_prompt_tokens, estimate_tokens
from minichat.serialize import generation_out

__all__ = [
    "CANCEL_CHANNEL",
    "COLUMNS",
    "IN_FLIGHT",
    "TERMINAL",
    "Outcome",
    "cancel_generation",
    "cancel_key",
    "count_refused_create",
    "create_generation",
    "delete_chat",
    "end_elsewhere",
    "final_state",
    "finish",
    "get_generation",
    "heartbeat",
    "history",
    "open_for_stream",
    "persist_terminal",
    "prompt_for",
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
    " request_id, finish_reason"
)
CANCEL_CHANNEL = "minichat:cancel"
_CANCEL_FLAG_TTL = 3600
# A lock younger than this whose generation row is not visible yet belongs to a create still committing.
_FRESH_LOCK_MS = 5_000
_HISTORY_LIMIT = 400
_PROMPT_ROLES = ("user", "assistant", "system")


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a generation ended: everything its terminal transaction writes."""

    status: str  # one of TERMINAL
    text: str = ""  # the assistant message (none when empty)
    input_tokens: int = 0
    output_tokens: int = 0
    estimated: bool = False
    error_code: str | None = None
    error_message: str | None = None
    finish_reason: str | None = None  # "stop" | "length", only for a generation that succeeded

    @classmethod
    def failed(cls, error: MiniChatError, **usage: Any) -> Outcome:
        return cls(status="failed", error_code=error.code, error_message=error.message, **usage)


def cancel_key(generation_id: str) -> str:
    return f"generation:{generation_id}:cancel"


def stream_url(*, user_id: str, generation_id: str) -> str:
    """A same-origin path an EventSource can open: the ticket opens this one stream only."""
    ticket = auth.issue_stream_ticket(user_id=user_id, generation_id=generation_id)
    return f"/api/generations/{generation_id}/stream?ticket={ticket}"


def _running_generation(conn: db.Conn, user_id: str) -> str | None:
    row = conn.execute(
        "SELECT id FROM generations WHERE user_id = %s AND status IN ('queued', 'streaming')", (user_id,)
    ).fetchone()
    return str(row["id"]) if row else None


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
    edit_of: str | None = None,
    regenerate_of: str | None = None,
    call_counted: bool = False,
    counted: admission.Counted | None = None,
) -> dict[str, Any]:
    """Queue a generation (with the user's message, in one transaction) under the in-flight lock.

    Two round trips: one Redis script (the call and create rate limits, the daily budget, the lock: see
    `_admit`), then one pipelined transaction (the chat locked and checked, the prompt placed, the
    generation and its audit event inserted). Every kind of create (a new message, an edit, a
    regenerate, none) takes this one path: only where its prompt goes in the chat's tree differs
    (chats.queue_prompt). `call_counted`: this request was already counted against the per-call limit.
    """
    generation_id = str(uuid.uuid4())
    _admit(
        user_id=user_id,
        chat_id=chat_id,
        generation_id=generation_id,
        count_call=not call_counted,
        counted=counted,
    )
    try:
        row = _queue(
            generation_id=generation_id,
            user_id=user_id,
            chat_id=chat_id,
            content=content,
            edit_of=edit_of,
            regenerate_of=regenerate_of,
            model=model,
            system_prompt=system_prompt,
            temperature=temperature,
            max_tokens=max_tokens,
            request_id=request_id,
        )
    except BaseException:
        _release_quietly(kv.get_redis(), user_id=user_id, generation_id=generation_id)
        raise
    return {
        "generationId": generation_id,
        "generation": generation_out(row),
        "streamUrl": stream_url(user_id=user_id, generation_id=generation_id),
    }


def count_refused_create(*, user_id: str, call_counted: bool, counted: admission.Counted | None) -> None:
    """A create refused before it was admitted (a bad body, an unknown model) still counts against the
    limits, which come first: RateLimited over them, 503 without Redis (the create limit fails closed)."""
    if not call_counted:
        admission.check_call(user_id, counted=counted)
    admission.check(admission.GENERATIONS, user_id, counted=counted)


def _admit(
    *, user_id: str, chat_id: str, generation_id: str, count_call: bool, counted: admission.Counted | None
) -> None:
    """The create's Redis checks in one script (limits.admit_create), refusing as SPEC says: 401 for a
    deleted account, 429 rate_limited, 429 quota_exceeded, 409 generation_in_flight (404 instead when
    the chat is not the user's), 503 without Redis (fail closed: without the lock nothing stops a second
    generation but the database's backstop).

    More round trips only off the usual path: the budget's counter seeded from the database (once per
    user and FRESH_TTL_S), a lock held (is its generation still running, is the chat the user's).
    """
    settings = get_settings()
    call_rate = admission.rate_of(admission.API_CALL, settings)
    create_rate = admission.rate_of(admission.GENERATIONS, settings)
    day = budget.today()
    budget_keys = budget.keys(user_id, day)
    first, seed, stale = True, None, None
    holder: str | None = None
    for _ in range(4):
        try:
            check = limits.admit_create(
                user_id=user_id,
                generation_id=generation_id,
                deleted_key=accounts.deleted_key(user_id),
                call_rate=call_rate,
                count_call=first and count_call,
                create_rate=create_rate,
                count_create=first,
                budget=budget_keys,
                seed=seed,
                stale_holder=stale,
            )
        except redis.RedisError as exc:
            raise ServiceUnavailable("Generations are unavailable right now; retry shortly.") from exc
        first = False  # the limits count a request once, whatever follows
        if check.status == limits.GONE:
            raise InvalidToken("This account no longer exists.")
        for decision in (check.call, check.create):
            if decision is not None:
                admission.decide(decision, counted)
        if check.status == limits.ADMITTED:
            return
        if check.status == limits.BUDGET_USED_UP:
            raise QuotaExceeded(f"The daily budget of {budget_keys.budget} tokens is used up.")
        if check.status == limits.NEEDS_SEED:
            with db.read() as conn:
                seed = budget.used_in_database(conn, user_id=user_id, day=day)
            continue
        holder = check.holder
        stale = _ended_holder(check, user_id=user_id, chat_id=chat_id)
    raise GenerationInFlight(holder or "")


def _ended_holder(check: limits.CreateCheck, *, user_id: str, chat_id: str) -> str | None:
    """The lock is held: raise NotFound (the chat is not the user's, whatever runs) or GenerationInFlight
    (its generation runs, or its create is still committing); else the holder, whose lock was left
    behind by a generation that has ended and never blocks (None: released in between)."""
    with db.read() as conn:
        row = conn.execute(
            "SELECT EXISTS (SELECT 1 FROM chats WHERE id = %(chat)s AND user_id = %(user)s) AS owned,"
            " (SELECT status FROM generations WHERE id = %(holder)s) AS status",
            {"chat": chat_id, "user": user_id, "holder": check.holder},
        ).fetchone()
    assert row is not None
    if not row["owned"]:
        raise NotFound("Chat not found.")
    if check.holder is None:
        return None
    if row["status"] in IN_FLIGHT:
        raise GenerationInFlight(check.holder)
    if row["status"] is None and check.holder_pttl_ms > limits.LOCK_TTL_MS - _FRESH_LOCK_MS:
        raise GenerationInFlight(check.holder)  # its create is still committing
    return check.holder


_INSERT_GENERATION = f"""
    INSERT INTO generations (id, chat_id, user_id, model, system_prompt, temperature, max_tokens,
                             request_id, parent_message_id)
    SELECT %(id)s::uuid, c.id, %(user_id)s::uuid, %(model)s::text, %(system_prompt)s::text,
           %(temperature)s::float8, %(max_tokens)s::integer, %(request_id)s::text, c.active_leaf_id
    FROM chats c WHERE c.id = %(chat_id)s::uuid
    RETURNING {COLUMNS}
"""


def _queue(
    *,
    generation_id: str,
    user_id: str,
    chat_id: str,
    content: str | None,
    edit_of: str | None,
    regenerate_of: str | None,
    model: str,
    system_prompt: str | None,
    temperature: float | None,
    max_tokens: int | None,
    request_id: str | None,
) -> dict[str, Any]:
    """The create's transaction, one round trip: the prompt placed (chats.queue_prompt), then the
    generation, which answers the chat's active leaf as that left it, and its audit event."""
    try:
        with db.batch() as conn:
            queue_prompt(
                conn,
                user_id=user_id,
                chat_id=chat_id,
                content=content,
                edit_of=edit_of,
                regenerate_of=regenerate_of,
            )
            inserted = conn.execute(
                _INSERT_GENERATION,
                {
                    "id": generation_id,
                    "user_id": user_id,
                    "chat_id": chat_id,
                    "model": model,
                    "system_prompt": system_prompt,
                    "temperature": temperature,
                    "max_tokens": max_tokens,
                    "request_id": request_id,
                },
            )
            events.record_audit(
                conn,
                user_id=user_id,
                action="generation.created",
                metadata={"generationId": generation_id, "chatId": chat_id, "model": model},
            )
    except pg_errors.RaiseException as exc:
        error = refusal(exc)
        if error is None:
            raise
        raise error from None
    except pg_errors.UniqueViolation:
        # The partial unique index caught what the lock did not (Redis lost the key).
        with db.read() as conn:
            raise GenerationInFlight(_running_generation(conn, user_id) or "") from None
    row = inserted.fetchone()
    assert row is not None
    return row


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


def stale(conn: db.Conn, *, queued_for: float, silent_for: float, limit: int = 100) -> list[dict[str, Any]]:
    """In-flight generations the reaper should end: queued with no stream opened, or streaming with no
    heartbeat (their process died)."""
    return conn.execute(STALE, (queued_for, silent_for, limit)).fetchall()


# `finished_at IS NULL` (in flight) lets generations_in_flight_idx serve it (migration 0008).
STALE = """
    SELECT id, user_id, chat_id, status, model, system_prompt FROM generations
    WHERE finished_at IS NULL
      AND ((status = 'queued' AND created_at < now() - make_interval(secs => %s))
           OR (status = 'streaming'
               AND COALESCE(heartbeat_at, created_at) < now() - make_interval(secs => %s)))
    ORDER BY created_at
    LIMIT %s
"""


def prompt_for(
    system_prompt: str | None, history: Sequence[tuple[str, str]], *, context_tokens: int | None = None
) -> list[ChatMessage]:
    """What the model is sent: the system prompt plus the newest history that fits `context_tokens` (the
    model's prompt budget; the configured default when not given, e.g. for an estimate)."""
    return build_prompt(
        system_prompt,
        [ChatMessage(role, content) for role, content in history if role in _PROMPT_ROLES],
        context_tokens=get_settings().context_tokens if context_tokens is None else context_tokens,
    )


def _newest_on_path(leaf: str) -> str:
    """SQL: recursive CTE bodies ending in `newest(seq, role, content)`, the newest _HISTORY_LIMIT
    messages of the path that ends at the message id `leaf` (an SQL expression); `%(limit)s` is the
    limit. The path's segments, the newest of each, merged. The rows carry what the prompt needs: a
    join back to `messages` by id cost a scan of the table whenever the planner took it for small (0.4
    of the claim's 0.75 ms at 1,200 messages)."""
    return f"""{path_segments(leaf)},
        newest AS (
            SELECT x.seq, x.role, x.content FROM path_segments s, LATERAL (
                SELECT m.seq, m.role, m.content FROM messages m
                WHERE m.segment_id = s.segment_id AND m.seq <= s.upto
                ORDER BY m.seq DESC LIMIT %(limit)s
            ) x
            ORDER BY x.seq DESC LIMIT %(limit)s
        )"""


def history(conn: db.Conn, generation_id: str) -> list[tuple[str, str]]:
    """(role, content) of the path that leads to the generation's answer (its newest messages), oldest
    first: nothing from other branches. One query."""
    rows = conn.execute(
        f"""
        WITH RECURSIVE {_newest_on_path("(SELECT parent_message_id FROM generations WHERE id = %(id)s)")}
        SELECT role, content FROM newest ORDER BY seq
        """,
        {"id": generation_id, "limit": _HISTORY_LIMIT},
    ).fetchall()
    return [(r["role"], r["content"]) for r in rows]


def finish(
    conn: db.Conn,
    *,
    generation: Mapping[str, Any],
    outcome: Outcome,
    from_states: tuple[str, ...],
    silent_for: float | None = None,
) -> dict[str, Any] | None:
    """The terminal transaction's work, in the caller's transaction: the terminal transition, the
    assistant message, the usage and audit events.

    `generation`: its id, chat_id, user_id and model, as read before. `silent_for` (the reaper): only if
    nothing has been heard of the generation for that many seconds, checked in the same statement, so a
    heartbeat that lands first keeps it alive.
    Returns the updated row, or None when another party ended the generation first.
    """
    row = conn.execute(
        _END, _end_params(generation, outcome, from_states=from_states, silent_for=silent_for)
    ).fetchone()
    if row is not None:
        if outcome.text:
            conn.execute(*_answer(generation, outcome))
        _count_in_budget(generation, outcome)
    return row


def _count_in_budget(generation: Mapping[str, Any], outcome: Outcome) -> None:
    """Once the end is committed, its usage goes to the daily budget's counter: before the caller releases
    the user's lock, so that the user's next create counts it."""
    if outcome.input_tokens or outcome.output_tokens:
        db.after_commit(
            functools.partial(
                budget.add_usage,
                user_id=str(generation["user_id"]),
                tokens=outcome.input_tokens + outcome.output_tokens,
                at=datetime.now(UTC),
            )
        )


def _end_params(
    generation: Mapping[str, Any],
    outcome: Outcome,
    *,
    from_states: tuple[str, ...],
    silent_for: float | None = None,
) -> dict[str, Any]:
    """The terminal statement's parameters: the transition and its usage and audit events."""
    assert outcome.status in TERMINAL
    generation_id = str(generation["id"])
    user_id = str(generation["user_id"])
    outboxed: list[events.Outboxed] = []
    if outcome.input_tokens or outcome.output_tokens:
        usage = events.usage_event(
            user_id=user_id,
            generation_id=generation_id,
            model=generation["model"],
            input_tokens=outcome.input_tokens,
            output_tokens=outcome.output_tokens,
            estimated=outcome.estimated,
        )
        outboxed.append(usage)
    metadata: dict[str, Any] = {"generationId": generation_id, "status": outcome.status}
    if outcome.error_code:
        metadata["errorCode"] = outcome.error_code
    action = "generation.canceled" if outcome.status == "canceled" else "generation.finished"
    outboxed.append(events.audit_event(user_id=user_id, action=action, metadata=metadata))
    return {
        "id": generation_id,
        "status": outcome.status,
        "input_tokens": outcome.input_tokens,
        "output_tokens": outcome.output_tokens,
        "estimated": outcome.estimated,
        "error_code": outcome.error_code,
        "error_message": outcome.error_message,
        "finish_reason": outcome.finish_reason if outcome.status == "succeeded" else None,
        "from_states": list(from_states),
        "silent_for": silent_for,
        "outbox": events.outbox_rows(*outboxed),
    }


def _answer(generation: Mapping[str, Any], outcome: Outcome) -> db.Statement:
    """The answer's insert, the statement after the terminal one: it reads nothing back, so on a pipeline
    (persist_terminal) it goes out with it."""
    return answer_insert(
        chat_id=str(generation["chat_id"]), generation_id=str(generation["id"]), content=outcome.text
    )


# The terminal transition and its events. The chat's row lock first, as every writer of a chat's messages
# takes it (chats.insert_message), and in this statement, before the answer's insert (a statement of its
# own, whose snapshot sees every message committed before the lock was granted).
_ENDED = f"""
    WITH chat AS (
        SELECT c.id FROM generations g JOIN chats c ON c.id = g.chat_id WHERE g.id = %(id)s FOR UPDATE OF c
    ), ended AS (
        UPDATE generations
        SET status = %(status)s, finished_at = now(), input_tokens = %(input_tokens)s,
            output_tokens = %(output_tokens)s, usage_estimated = %(estimated)s, error_code = %(error_code)s,
            error_message = %(error_message)s, finish_reason = %(finish_reason)s
        WHERE id = %(id)s AND status = ANY(%(from_states)s) AND EXISTS (SELECT 1 FROM chat)
          AND (%(silent_for)s::float8 IS NULL
               OR COALESCE(heartbeat_at, created_at) < now() - make_interval(secs => %(silent_for)s::float8))
        RETURNING {COLUMNS}
    ), outboxed AS (
        {events.outbox_insert("%(outbox)s::jsonb", when="EXISTS (SELECT 1 FROM ended)")}
    )"""
_END = _ENDED + "\n    SELECT * FROM ended"
# The same, refusing (minichat_refuse) when another party ended the generation first: on a pipeline, the
# statements queued after it are skipped and the transaction is rolled back. The refusal is the outer
# side of the join, so it is evaluated whether or not `ended` has a row.
_END_OR_REFUSE = (
    _ENDED
    + """
    SELECT ended.* FROM (
        SELECT minichat_refuse(CASE WHEN NOT EXISTS (SELECT 1 FROM ended) THEN 'ended_elsewhere' END)
    ) AS checked LEFT JOIN ended ON true"""
)


def end_elsewhere(
    client: redis.Redis,
    running: dict[str, Any],
    *,
    error: MiniChatError | None = None,
    from_states: tuple[str, ...] | None = None,
    silent_for: float | None = None,
    buffer_ttl: int,
) -> dict[str, Any] | None:
    """End an in-flight generation whose run is not here to end it: `failed` with `error` (the reaper),
    or `canceled` without one (a chat deletion).

    `running` is its row as read (id, user_id, chat_id, status, model, system_prompt). A streaming one
    keeps what its run already streamed (read back from the event buffer) and is counted (estimated usage: the
    prompt and that text); its followers get the closing events. The user's lock is freed.
    Returns the terminal row, or None when it had ended (or had been heard from) in the meantime.
    Raises RedisError when a streaming generation's buffer cannot be read: ending it then would lose
    its text, so the caller waits (the reaper) or goes on without it.
    """
    generation_id = str(running["id"])
    streamed = running["status"] == "streaming"
    text, last = buffer.read_text(client, generation_id) if streamed else ("", 0)
    with db.transaction() as conn:
        usage: dict[str, Any] = {}
        if streamed:
            prompt = prompt_for(running["system_prompt"], history(conn, generation_id))
            usage = {
                "input_tokens": estimate_prompt_tokens(prompt),
                "output_tokens": estimate_tokens(text),
                "estimated": True,
            }
        outcome = (
            Outcome.failed(error, text=text, **usage)
            if error is not None
            else Outcome(status="canceled", text=text, **usage)
        )
        row = finish(
            conn,
            generation=running,
            outcome=outcome,
            from_states=from_states or (running["status"],),
            silent_for=silent_for,
        )
    if row is None:
        return None
    try:
        limits.release_inflight(client, user_id=str(running["user_id"]), generation_id=generation_id)
        if streamed:
            buffer.close(client, row, after=last, ttl=buffer_ttl)
    except redis.RedisError:
        log.warning("could not reach Redis after ending a generation", generation_id=generation_id)
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
            ended = finish(conn, generation=row, outcome=Outcome(status="canceled"), from_states=("queued",))
            row = ended or _owned(conn, user_id=user_id, generation_id=generation_id)
        if ended is not None:
            _release_quietly(client, user_id=user_id, generation_id=generation_id)
    return generation_out(row)


def delete_chat(*, user_id: str, chat_id: str, wait_s: float = 2.0) -> None:
    """Delete a chat; its running generation is ended (and counted) and the user's lock freed before
    this returns."""
    with db.transaction() as conn:
        owned_chat_for_update(conn, user_id=user_id, chat_id=chat_id)
        running = conn.execute(
            "SELECT id, user_id, chat_id, status, model, system_prompt FROM generations"
            " WHERE chat_id = %s AND status IN ('queued', 'streaming')",
            (chat_id,),
        ).fetchone()
    if running is not None:
        generation_id = str(running["id"])
        cancel_generation(user_id=user_id, generation_id=generation_id)
        deadline = time.monotonic() + wait_s
        while True:
            with db.read() as conn:
                current = conn.execute(
                    "SELECT status FROM generations WHERE id = %s", (generation_id,)
                ).fetchone()
            if current is None or current["status"] in TERMINAL:
                break
            if time.monotonic() > deadline:
                # Its run did not answer in time (or its process is gone): end it here, counted with
                # what it streamed, before the chat (and the row) go.
                running["status"] = current["status"]
                try:
                    end_elsewhere(
                        kv.get_redis(),
                        running,
                        from_states=IN_FLIGHT,
                        buffer_ttl=get_settings().stream_buffer_ttl,
                    )
                except redis.RedisError as exc:
                    raise ServiceUnavailable("Cannot end the chat's generation; retry shortly.") from exc
                break
            time.sleep(0.02)
    _delete_chat_rows(user_id=user_id, chat_id=chat_id)


# --- the stream function's database work (run in its thread pool) ------------------------------------


def open_for_stream(
    *, generation_id: str, user_id: str
) -> tuple[dict[str, Any], list[tuple[str, str]] | None]:
    """Claim a queued generation (with its chat history), or just load it; NotFound for others' ids.

    One statement, one round trip (it commits on its own): the claim, the walk up its path when it
    claimed, and the row as it is when it did not (already claimed, or ended).
    """
    with db.read() as conn:
        row = conn.execute(
            _OPEN_FOR_STREAM, {"id": generation_id, "user_id": user_id, "limit": _HISTORY_LIMIT}
        ).fetchone()
        if row is None and conn.execute("SELECT 1 FROM users WHERE id = %s", (user_id,)).fetchone() is None:
            # A ticket or token of a deleted account (its Redis marker lost): refused, as SPEC §7.4 says.
            raise InvalidToken("This account no longer exists.")
    if row is None:
        raise NotFound("Generation not found.")
    history = row.pop("history")
    if not row.pop("claimed"):
        return row, None
    return row, [(role, content) for role, content in history]


# queued → streaming (one winner, the status guard); a row that was not queued is read as it is (the
# statement's snapshot never shows the claim's own update, hence the NOT EXISTS).
_OPEN_FOR_STREAM = f"""
    WITH RECURSIVE claimed AS (
        UPDATE generations SET status = 'streaming', started_at = now(), heartbeat_at = now()
        WHERE id = %(id)s AND user_id = %(user_id)s AND status = 'queued'
        RETURNING {COLUMNS}, parent_message_id
    ), {_newest_on_path("(SELECT parent_message_id FROM claimed)")}
    SELECT {", ".join(f"c.{c.strip()}" for c in COLUMNS.split(","))}, true AS claimed, (
        SELECT COALESCE(json_agg(json_build_array(n.role, n.content) ORDER BY n.seq), '[]'::json)
        FROM newest n
    ) AS history
    FROM claimed c
    UNION ALL
    SELECT {COLUMNS}, false, NULL FROM generations
    WHERE id = %(id)s AND user_id = %(user_id)s AND NOT EXISTS (SELECT 1 FROM claimed)
"""


def persist_terminal(*, generation: Mapping[str, Any], outcome: Outcome) -> dict[str, Any]:
    """The run's terminal transaction (streaming → its outcome); the row as the database has it after.

    One round trip: the transition with its events, then the answer, on one pipeline (db.batch). When
    another party ended the generation first (the chat deleted, the reaper), the transition refuses,
    nothing is written, and the row is read as that party left it.
    """
    generation_id = str(generation["id"])
    try:
        with db.batch() as conn:
            ended = conn.execute(_END_OR_REFUSE, _end_params(generation, outcome, from_states=("streaming",)))
            if outcome.text:
                conn.execute(*_answer(generation, outcome))
            _count_in_budget(generation, outcome)
        row = ended.fetchone()
    except pg_errors.RaiseException as exc:
        if exc.diag.constraint_name != "ended_elsewhere":
            raise
        with db.read() as conn:
            row = conn.execute(
                f"SELECT {COLUMNS} FROM generations WHERE id = %s", (generation_id,)
            ).fetchone()
    if row is None:  # the chat, and the generation with it, is gone
        return {
            "id": generation_id,
            "status": "canceled",
            "input_tokens": 0,
            "output_tokens": 0,
            "usage_estimated": True,
            "error_code": None,
            "error_message": None,
        }
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
