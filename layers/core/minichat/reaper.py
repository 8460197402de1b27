"""The reaper: no user is ever stuck behind a generation whose stream never opened or whose process died.

Runs on a schedule (AWS) or a timer (local mode). Each generation it ends gets what a normal end gets:
the terminal state, the partial answer recovered from the event buffer, estimated usage, an audit event,
the user's lock released, and error/usage/done appended to the buffer so that followers see `done`.
Each one is ended in its own transaction; one that cannot be is logged and tried again next run, and
never stops the others.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from minichat import db, generations, kv
from minichat.config import get_settings
from minichat.errors import MiniChatError, StreamNotOpened, WorkerLost
from minichat.log import get_logger

__all__ = ["QUEUED_TIMEOUT_S", "SILENCE_TIMEOUT_S", "ReapResult", "reap", "reap_window", "run_reaper"]

log = get_logger("minichat.reaper")

QUEUED_TIMEOUT_S = 60.0  # SPEC §4: queued with no stream opened
SILENCE_TIMEOUT_S = 30.0  # streaming processes renew heartbeat_at every 5 s
# Between two runs, a reaper looks again no later than this when a queued generation is coming due
# (it may be claimed meanwhile: then there is nothing to wait for).
_RECHECK_S = 5.0
# A generation already due after a round (it came due just then, or could not be ended): look again
# after this, not at once, so a row that keeps failing costs one attempt a second, not a busy loop.
_OVERDUE_S = 1.0


def _wait_for(due: float) -> float:
    return due if due > 0 else _OVERDUE_S


@dataclass
class ReapResult:
    stream_not_opened: int = 0
    worker_lost: int = 0
    skipped: int = 0  # could not be ended this time (logged); tried again next run

    def add(self, other: ReapResult) -> None:
        self.stream_not_opened += other.stream_not_opened
        self.worker_lost += other.worker_lost
        self.skipped += other.skipped

    def as_dict(self) -> dict[str, int]:
        return {
            "streamNotOpened": self.stream_not_opened,
            "workerLost": self.worker_lost,
            "skipped": self.skipped,
        }


def reap(*, queued_for: float = QUEUED_TIMEOUT_S, silent_for: float = SILENCE_TIMEOUT_S) -> ReapResult:
    """End every stale in-flight generation; safe to run from several places at once. Each buffer it
    closes is kept MINICHAT_STREAM_BUFFER_TTL seconds, as the engine keeps those it closes."""
    result = ReapResult()
    with db.read() as conn:
        candidates = generations.stale(conn, queued_for=queued_for, silent_for=silent_for)
    if not candidates:
        return result
    client = kv.get_redis()
    ttl = get_settings().stream_buffer_ttl
    for candidate in candidates:
        generation_id = str(candidate["id"])
        queued = candidate["status"] == "queued"
        error: MiniChatError = (
            StreamNotOpened() if queued else WorkerLost("The generation was interrupted: its stream stopped.")
        )
        try:
            row = generations.end_elsewhere(
                client,
                candidate,
                error=error,
                silent_for=queued_for if queued else silent_for,
                buffer_ttl=ttl,
            )
        except redis.RedisError as exc:
            # Its streamed text is in the buffer we cannot read: ending it now would lose that text.
            result.skipped += 1
            log.warning(
                "reaping deferred: event buffer unreadable",
                generation_id=generation_id,
                error=type(exc).__name__,
            )
            continue
        except Exception as exc:  # one row must never stop the others (nor the reaper)
            result.skipped += 1
            log.error("generation could not be reaped", generation_id=generation_id, error=type(exc).__name__)
            continue
        if row is None:
            continue  # it moved on (a heartbeat, a cancel, its own end) before we got to it
        if queued:
            result.stream_not_opened += 1
        else:
            result.worker_lost += 1
        log.info("generation reaped", generation_id=generation_id, code=error.code)
    return result


# `finished_at IS NULL` (in flight) lets generations_in_flight_idx serve it (migration 0008).
NEXT_DUE = (
    "SELECT EXTRACT(EPOCH FROM min(created_at) + make_interval(secs => %s) - now())::float8 AS due"
    " FROM generations WHERE finished_at IS NULL AND status = 'queued'"
)


def _next_due_s(queued_for: float) -> float | None:
    """Seconds until the oldest queued generation is due (≤ 0: overdue), None when nothing is queued."""
    with db.read() as conn:
        row = conn.execute(NEXT_DUE, (queued_for,)).fetchone()
    return None if row is None or row["due"] is None else float(row["due"])


def reap_window(
    *,
    window_s: float,
    queued_for: float = QUEUED_TIMEOUT_S,
    sleep: Callable[[float], Any] = time.sleep,
) -> ReapResult:
    """Reap now, then again whenever a queued generation comes due within the next `window_s` seconds.

    A schedule fires at most once a minute: a run that only reaped what was due at its start would fail
    a generation queued just after it at up to twice the SPEC's 60 s. Each run covers its window, so with
    a window as long as the schedule's period a queued generation is failed when its 60 s are up.
    """
    end = time.monotonic() + window_s
    total = ReapResult()
    while True:
        total.add(reap(queued_for=queued_for))
        due = _next_due_s(queued_for)
        left = end - time.monotonic()
        if due is None or due >= left:
            return total
        sleep(min(_wait_for(due), _RECHECK_S, left))


def run_reaper(stop: Any, *, interval: float = 5.0, queued_for: float = QUEUED_TIMEOUT_S) -> None:
    """Local mode's timer: reap every `interval` seconds (sooner when a queued generation comes due)
    until `stop` (a threading.Event) is set. No exception ends it."""
    while not stop.is_set():
        wait = interval
        try:
            reap(queued_for=queued_for)
            due = _next_due_s(queued_for)
            if due is not None:
                wait = min(interval, _wait_for(due))
        except Exception as exc:
            log.error("reaper round failed", error=type(exc).__name__)
        stop.wait(wait)
