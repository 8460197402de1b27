"""Idempotency-Key: the same key from the same user within 24 h returns the first response.

The key is claimed in its own transaction before the work (a row with no response yet), the response
stored after it; a retry that arrives while the first is still running waits for it briefly. A failed
first attempt (an error reply) releases the key, so the client can retry with the same key. A claim
whose request never stored a result (its process died) is taken over by the next retry after
CLAIM_TIMEOUT_S; each claim has its own id, so a first request that finishes after that can no longer
store or release what is now the retry's.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

from psycopg.types.json import Jsonb

from minichat import db
from minichat.errors import IdempotencyKeyReused
from minichat.validate import IDEMPOTENCY_KEY

__all__ = [
    "CLAIM_TIMEOUT_S",
    "KEY_TTL_S",
    "Claim",
    "Replay",
    "claim",
    "fingerprint",
    "purge_expired",
    "release",
    "store",
    "validate_key",
]

KEY_TTL_S = 24 * 3600
# No API request runs this long (API Gateway gives up after 29 s): a claim this old is abandoned.
CLAIM_TIMEOUT_S = 60
_WAIT_S = 5.0


@dataclass(frozen=True)
class Replay:
    """The stored first response."""

    status: int
    body: Any


@dataclass(frozen=True)
class Claim:
    """This request holds the key: do the work, then store (or release) under this claim."""

    user_id: str
    key: str
    claim_id: str


def validate_key(raw: str) -> str:
    return IDEMPOTENCY_KEY.read(raw)


def fingerprint(*, method: str, path: str, body: bytes) -> bytes:
    """What "the same request" means: method, concrete path and body bytes."""
    return hashlib.sha256(method.encode() + b" " + path.encode() + b"\n" + body).digest()


def claim(*, user_id: str, key: str, request_hash: bytes) -> Claim | Replay:
    """Claim the key (a Claim: go ahead and do the work) or return the first response to replay."""
    deadline = time.monotonic() + _WAIT_S
    while True:
        with db.transaction() as conn:
            # An expired key is free again, and so is a claim that never got its result.
            conn.execute(
                "DELETE FROM idempotency_keys WHERE user_id = %s AND key = %s"
                " AND (created_at < now() - make_interval(secs => %s)"
                "      OR (status_code IS NULL AND created_at < now() - make_interval(secs => %s)))",
                (user_id, key, KEY_TTL_S, CLAIM_TIMEOUT_S),
            )
            inserted = conn.execute(
                "INSERT INTO idempotency_keys (user_id, key, request_hash) VALUES (%s, %s, %s)"
                " ON CONFLICT DO NOTHING RETURNING claim_id",
                (user_id, key, request_hash),
            ).fetchone()
            if inserted is not None:
                return Claim(user_id=user_id, key=key, claim_id=str(inserted["claim_id"]))
            row = conn.execute(
                "SELECT request_hash, status_code, response_body FROM idempotency_keys"
                " WHERE user_id = %s AND key = %s",
                (user_id, key),
            ).fetchone()
        if row is None:
            continue  # released between our insert and select: claim again
        if bytes(row["request_hash"]) != request_hash:
            raise IdempotencyKeyReused()
        if row["status_code"] is not None:
            return Replay(status=row["status_code"], body=row["response_body"])
        if time.monotonic() > deadline:
            raise IdempotencyKeyReused(
                "A request with this Idempotency-Key is still being processed; retry shortly."
            )
        time.sleep(0.05)


def store(claim: Claim, *, status: int, body: Any) -> None:
    """Keep the response for replays (unless the claim was taken over meanwhile)."""
    with db.transaction() as conn:
        conn.execute(
            "UPDATE idempotency_keys SET status_code = %s, response_body = %s"
            " WHERE user_id = %s AND key = %s AND claim_id = %s AND status_code IS NULL",
            (status, Jsonb(body), claim.user_id, claim.key, claim.claim_id),
        )


def release(claim: Claim) -> None:
    """Free the key: nothing was created, the client may use it again."""
    with db.transaction() as conn:
        conn.execute(
            "DELETE FROM idempotency_keys"
            " WHERE user_id = %s AND key = %s AND claim_id = %s AND status_code IS NULL",
            (claim.user_id, claim.key, claim.claim_id),
        )


def purge_expired(conn: db.Conn, *, limit: int) -> int:
    """Delete up to `limit` keys older than 24 h, oldest first (one batch of the purge job)."""
    cur = conn.execute(
        "DELETE FROM idempotency_keys WHERE (user_id, key) IN (SELECT user_id, key FROM idempotency_keys"
        " WHERE created_at < now() - make_interval(secs => %s) ORDER BY created_at LIMIT %s)",
        (KEY_TTL_S, limit),
    )
    return cur.rowcount
