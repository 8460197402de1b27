"""The purge job: what is kept only for a while is deleted in bounded batches.

- idempotency keys older than 24 h (idempotency.purge_expired);
- outbox rows published more than 7 days ago (events.purge_published);
- refresh tokens of dead families (auth.purge_dead_refresh_tokens).

Each batch is one short transaction of at most BATCH rows, so the job never holds many locks or a long
transaction; it loops until every kind is done or its time budget is spent (the next run goes on).
Scheduled on AWS (template.yaml, `jobs.purge_handler`), on a timer in local mode.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from minichat import auth, db, events, idempotency
from minichat.errors import ServiceUnavailable
from minichat.log import get_logger

__all__ = ["BATCH", "purge", "purge_handler", "run_purger"]

log = get_logger("minichat.purge")

BATCH = 1000
_KINDS: dict[str, Callable[..., int]] = {
    "idempotencyKeys": idempotency.purge_expired,
    "outbox": events.purge_published,
    "refreshTokens": auth.purge_dead_refresh_tokens,
}


def purge(*, batch: int = BATCH, time_budget: float = 50.0) -> dict[str, int]:
    """Delete what has outlived its keeping, `batch` rows per statement; how many rows of each kind."""
    deadline = time.monotonic() + time_budget
    counts = dict.fromkeys(_KINDS, 0)
    for kind, purge_batch in _KINDS.items():
        while time.monotonic() < deadline:
            with db.transaction() as conn:
                deleted = purge_batch(conn, limit=batch)
            counts[kind] += deleted
            if deleted < batch:
                break
    if any(counts.values()):
        log.info("purged", **counts)
    return counts


def purge_handler(event: dict[str, Any], context: Any) -> dict[str, int]:
    """Scheduled Lambda entry point: purge within the invocation's time."""
    budget = 50.0
    remaining = getattr(context, "get_remaining_time_in_millis", None)
    if callable(remaining):
        budget = max(1.0, remaining() / 1000 - 5.0)  # keep 5 s for the last batch
    return purge(time_budget=budget)


def run_purger(stop: threading.Event, *, interval: float = 3600.0) -> None:
    """Local mode's timer: purge now, then every `interval` seconds, until `stop`."""
    while not stop.is_set():
        try:
            purge()
        except ServiceUnavailable as exc:
            log.warning("purge skipped a round", error=type(exc).__name__)
        except Exception:
            # The timer must outlive anything one round runs into; the next round tries again.
            log.exception("purge failed")
        stop.wait(interval)
