"""Deleting an account (SPEC §7.4), and refusing every token of an account that is gone.

A deleted account's tokens are refused through a marker in Redis, `user:{id}:deleted`, kept as long as any
token issued before the deletion could still verify (the longest of an access token's and a stream
ticket's life). The API checks it in the same round trip as its per-user rate limit, the stream in the
one that takes a connection slot. Should the marker be lost (Redis flushed), writes still refuse the
token (db.transaction maps a user's missing row to InvalidToken) and the stream finds nothing to open.
"""

from __future__ import annotations

import contextlib

import redis

from minichat import auth, db, events, generations, kv
from minichat.config import get_settings
from minichat.errors import InvalidCredentials, InvalidToken, NotFound, ServiceUnavailable
from minichat.log import get_logger

__all__ = ["delete_account", "deleted_key"]

log = get_logger("minichat.accounts")


def deleted_key(user_id: str) -> str:
    """The marker that refuses every token of a deleted account."""
    return f"user:{user_id}:deleted"


def _marker_ttl_s() -> int:
    return max(get_settings().access_token_ttl, auth.STREAM_TICKET_MAX_AGE) + 60


def delete_account(*, user_id: str, password: str) -> None:
    """Delete the account and everything that is its own (chats, messages, generations, tokens).

    Usage events, daily usage and audit logs stay, keyed by the id alone. A running generation is ended
    first, through the same path as deleting its chat. InvalidCredentials for a wrong password.
    """
    with db.read() as conn:
        user = conn.execute("SELECT password_hash FROM users WHERE id = %s", (user_id,)).fetchone()
    if user is None:
        raise InvalidToken("This account no longer exists.")
    if not auth.verify_password(user["password_hash"], password):
        raise InvalidCredentials("The password is wrong.")
    client = kv.get_redis()
    # The marker goes first: from now on no process accepts the account's tokens, so nothing new (a
    # generation, a chat) is started while the rows are deleted. Without Redis there is no marker, and
    # tokens could outlive the account: refuse (503) rather than delete halfway.
    try:
        client.set(deleted_key(user_id), b"1", ex=_marker_ttl_s())
    except redis.RedisError as exc:
        raise ServiceUnavailable("Accounts cannot be deleted right now; retry shortly.") from exc
    try:
        with db.read() as conn:
            running = conn.execute(
                "SELECT chat_id FROM generations WHERE user_id = %s AND status IN ('queued', 'streaming')",
                (user_id,),
            ).fetchone()
        if running is not None:
            # NotFound: its chat was deleted meanwhile, and the generation ended with it.
            with contextlib.suppress(NotFound):
                generations.delete_chat(user_id=user_id, chat_id=str(running["chat_id"]))
        with db.transaction() as conn:
            # Cascades to refresh tokens, chats (their messages), generations and idempotency keys.
            conn.execute("DELETE FROM users WHERE id = %s", (user_id,))
            events.record_audit(conn, user_id=user_id, action="user.deleted", metadata={})
    except BaseException:
        try:
            client.delete(deleted_key(user_id))  # the account is still there: its tokens work again
        except redis.RedisError:
            log.warning("account deletion failed and its marker stays until it expires", user_id=user_id)
        raise
    log.info("account deleted", user_id=user_id)
