"""The reaper: no user is ever stuck behind a generation whose stream never opened or whose process died.

Runs on a schedule (AWS) or a timer (local mode). Each generation it ends gets what a normal end gets:
the terminal state, the partial answer recovered from the event buffer, estimated usage, an audit event,
the user's lock released, and error/usage/done appended to the buffer so that followers see `done`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import redis

from minichat import db, generations, kv, limits
from minichat.errors import ServiceUnavailable, StreamNotOpened, WorkerLost
from minichat.log import get_logger
from minichat.providers.base import estimate_tokens
from minichat.sse import encode_event

__all__ = ["QUEUED_TIMEOUT_S", "SILENCE_TIMEOUT_S", "ReapResult", "reap"]

log = get_logger("minichat.reaper")

QUEUED_TIMEOUT_S = 60.0  # SPEC §4: queued with no stream opened
SILENCE_TIMEOUT_S = 30.0  # streaming processes renew heartbeat_at every 5 s


@dataclass
class ReapResult:
    stream_not_opened: int = 0
    worker_lost: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"streamNotOpened": self.stream_not_opened, "workerLost": self.worker_lost}


def _buffered(client: redis.Redis, generation_id: str) -> tuple[str, int]:
    """The text of the deltas already buffered, and the last event number (0 when none)."""
    entries: Any = client.xrange(generations.events_key(generation_id))
    parts: list[str] = []
    last = 0
    for entry_id, fields in entries:
        last = int(entry_id.split(b"-")[1])
        frame = fields[b"f"].decode()
        data = json.loads(frame.split("\ndata: ", 1)[1])
        if data.get("type") == "delta":
            parts.append(data["delta"])
    return "".join(parts), last


def _close_buffer(client: redis.Redis, row: dict[str, Any], last: int, ttl: int) -> None:
    key = generations.events_key(str(row["id"]))
    frames = [
        {"type": "error", "code": row["error_code"], "message": row["error_message"]},
        {
            "type": "usage",
            "inputTokens": row["input_tokens"],
            "outputTokens": row["output_tokens"],
            "estimated": row["usage_estimated"],
        },
        {"type": "done", "status": row["status"]},
    ]
    pipe = client.pipeline(transaction=False)
    for offset, data in enumerate(frames, start=1):
        fields = {"f": encode_event(last + offset, data)}
        if data["type"] == "done":
            fields["e"] = b"1"
        pipe.xadd(key, fields, id=f"0-{last + offset}")  # type: ignore[arg-type]
    pipe.expire(key, ttl)
    pipe.execute(raise_on_error=False)


def reap(
    *, queued_for: float = QUEUED_TIMEOUT_S, silent_for: float = SILENCE_TIMEOUT_S, buffer_ttl: int = 3600
) -> ReapResult:
    """End every stale in-flight generation; safe to run from several places at once."""
    result = ReapResult()
    with db.transaction() as conn:
        candidates = generations.stale(conn, queued_for=queued_for, silent_for=silent_for)
    client = kv.get_redis()
    for candidate in candidates:
        generation_id = str(candidate["id"])
        queued = candidate["status"] == "queued"
        error = (
            StreamNotOpened() if queued else WorkerLost("The generation was interrupted: its stream stopped.")
        )
        try:
            text, last = ("", 0) if queued else _buffered(client, generation_id)
        except (redis.RedisError, ValueError, KeyError, IndexError):
            text, last = "", 0  # the partial answer is lost with the buffer; the user is freed all the same
        with db.transaction() as conn:
            row = generations.finish(
                conn,
                generation_id=generation_id,
                status="failed",
                from_states=(candidate["status"],),
                text=text,
                output_tokens=estimate_tokens(text),
                estimated=True,
                error_code=error.code,
                error_message=error.message,
                silent_for=queued_for if queued else silent_for,
            )
        if row is None:
            continue  # it moved on (a heartbeat, a cancel, its own end) before we got to it
        if queued:
            result.stream_not_opened += 1
        else:
            result.worker_lost += 1
        try:
            limits.release_inflight(client, user_id=str(candidate["user_id"]), generation_id=generation_id)
            if not queued:
                _close_buffer(client, row, last, buffer_ttl)
        except redis.RedisError:
            log.warning(
                "reaper could not reach Redis; the lock expires on its own", generation_id=generation_id
            )
        log.info("generation reaped", generation_id=generation_id, code=error.code, partial_chars=len(text))
    return result


def run_reaper(stop: Any, *, interval: float = 5.0) -> None:
    """Local mode's timer: reap every `interval` seconds until `stop` (a threading.Event) is set."""
    while not stop.is_set():
        try:
            reap()
        except ServiceUnavailable as exc:
            log.warning("reaper skipped a round", error=type(exc).__name__)
        stop.wait(interval)
