"""Passwords, access tokens, refresh-token families."""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from psycopg import errors as pg_errors

from minichat import db, events
from minichat.config import Settings, get_settings
from minichat.errors import EmailTaken, InvalidCredentials, InvalidToken, Unauthorized
from minichat.serialize import user_out

__all__ = [
    "Principal",
    "authenticate",
    "check_stream_ticket_grace",
    "hash_password",
    "issue_access_token",
    "issue_stream_ticket",
    "login",
    "logout",
    "me",
    "purge_dead_refresh_tokens",
    "refresh",
    "register",
    "verify_password",
    "verify_stream_ticket",
]

# argon2id at OWASP's minimum (m=19 MiB, t=2, p=1): tens of ms of CPU a hash (docs/architecture.md).
_hasher = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1, hash_len=32, salt_len=16)
# Verified against when the email is unknown, so a login costs the same either way. A constant (of a
# random password nobody knows) with the same parameters: hashing one at import would cost a hash per cold
# start.
_DUMMY_HASH = (
    "$argon2id$v=19$m=19456,t=2,p=1$sfCRYTPcPpsUgQErZQxOwg$YPW/II4Qgb4+7nza9avyAkB77nYcXNH4zido4o/b40Y"
)
_ALGORITHM = "HS256"
_ACCESS_TYP = "access"
_STREAM_TYP = "stream"
# A hard cap on a ticket's life; it is also refused once its generation ended longer ago than the grace.
STREAM_TICKET_MAX_AGE = 2 * 3600
STREAM_TICKET_GRACE_S = 600


def hash_password(password: str) -> str:
    """An argon2id hash of the password."""
    return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    """True when the password matches; never raises for a wrong password or a bad hash."""
    try:
        return _hasher.verify(password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


@dataclass(frozen=True)
class Principal:
    """Who an access token speaks for."""

    user_id: str


def issue_access_token(user_id: str, *, settings: Settings | None = None) -> str:
    """A signed HS256 access token for the user."""
    settings = settings or get_settings()
    now = int(time.time())
    claims = {
        "iss": settings.jwt_issuer,
        "aud": settings.jwt_audience,
        "sub": str(user_id),
        "iat": now,
        "exp": now + settings.access_token_ttl,
        "typ": _ACCESS_TYP,
    }
    return jwt.encode(claims, settings.jwt_secret, algorithm=_ALGORITHM)


# Access tokens this process has verified, with their expiry: a client sends the same token on every
# call for its 15 minutes, and checking its signature and claims again each time cost a list request
# more CPU than its SQL. Keyed by the token and what it was checked against (tests switch settings).
_verified: dict[tuple[str, bytes, str, str], tuple[Principal, float]] = {}
_VERIFIED_MAX = 10_000


def authenticate(authorization: str | None, *, settings: Settings | None = None) -> Principal:
    """Check an `Authorization: Bearer` header; raises Unauthorized / InvalidToken."""
    if not authorization:
        raise Unauthorized()
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized("Use 'Authorization: Bearer <accessToken>'.")
    settings = settings or get_settings()
    key = (token, settings.jwt_secret, settings.jwt_audience, settings.jwt_issuer)
    known = _verified.get(key)
    if known is not None:
        principal, expires = known
        if time.time() < expires:  # PyJWT's own rule: expired once now >= exp
            return principal
        _verified.pop(key, None)
    try:
        claims = jwt.decode(
            token,
            settings.jwt_secret,
            algorithms=[_ALGORITHM],  # pinned: never trust the token's own header
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
            options={"require": ["exp", "iat", "sub", "iss", "aud"]},
        )
    except jwt.PyJWTError:
        raise InvalidToken() from None
    if claims.get("typ") != _ACCESS_TYP:
        raise InvalidToken()
    try:
        principal = Principal(user_id=str(uuid.UUID(str(claims["sub"]))))
    except ValueError:
        raise InvalidToken() from None
    if len(_verified) >= _VERIFIED_MAX:
        _verified.clear()  # simpler than LRU bookkeeping; the next calls verify once again
    _verified[key] = (principal, float(claims["exp"]))
    return principal


def issue_stream_ticket(*, user_id: str, generation_id: str, settings: Settings | None = None) -> str:
    """A signed ticket that opens one generation's stream and nothing else."""
    settings = settings or get_settings()
    now = int(time.time())
    claims = {
        "iss": settings.jwt_issuer,
        "aud": f"{settings.jwt_audience}:stream",  # an access-token check can never accept it
        "sub": str(user_id),
        "gen": str(generation_id),
        "iat": now,
        "exp": now + STREAM_TICKET_MAX_AGE,
        "typ": _STREAM_TYP,
    }
    return jwt.encode(claims, settings.jwt_secret, algorithm=_ALGORITHM)


def verify_stream_ticket(ticket: str, *, generation_id: str, settings: Settings | None = None) -> Principal:
    """The user a ticket speaks for, if it was issued for exactly this generation."""
    settings = settings or get_settings()
    try:
        claims = jwt.decode(
            ticket,
            settings.jwt_secret,
            algorithms=[_ALGORITHM],
            audience=f"{settings.jwt_audience}:stream",
            issuer=settings.jwt_issuer,
            options={"require": ["exp", "iat", "sub", "iss", "aud", "gen"]},
        )
    except jwt.PyJWTError:
        raise InvalidToken("The stream ticket is invalid or expired.") from None
    if claims.get("typ") != _STREAM_TYP or claims.get("gen") != generation_id:
        raise InvalidToken("The stream ticket is not for this generation.")
    return Principal(user_id=str(claims["sub"]))


def check_stream_ticket_grace(finished_at: datetime | None, *, now: datetime | None = None) -> None:
    """A ticket keeps opening its stream until 10 minutes after the generation ended (SPEC: `streamUrl`);
    InvalidToken after that. Only a ticket has this limit: an access token opens the stream any time."""
    if finished_at is None:
        return
    if ((now or datetime.now(UTC)) - finished_at).total_seconds() > STREAM_TICKET_GRACE_S:
        raise InvalidToken("The stream ticket has expired.")


def _token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def _new_refresh_token(
    conn: db.Conn,
    *,
    user_id: str,
    family_id: str,
    expires_at: datetime | None,
    parent_id: str | None,
    settings: Settings,
) -> str:
    token = secrets.token_urlsafe(32)  # 256 bits of randomness
    conn.execute(
        """
        INSERT INTO refresh_tokens (family_id, user_id, token_hash, parent_id, expires_at)
        VALUES (%s, %s, %s, %s, COALESCE(%s, now() + make_interval(secs => %s)))
        """,
        (family_id, user_id, _token_hash(token), parent_id, expires_at, settings.refresh_token_ttl),
    )
    return token


def _start_session(conn: db.Conn, *, user_id: str, action: str, settings: Settings) -> str:
    """A new refresh-token family (its first token) and the audit event, in the caller's transaction."""
    token = _new_refresh_token(
        conn, user_id=user_id, family_id=str(uuid.uuid4()), expires_at=None, parent_id=None, settings=settings
    )
    events.record_audit(conn, user_id=user_id, action=action, metadata={})
    return token


def _auth_reply(user: dict[str, Any], refresh_token: str, settings: Settings) -> dict[str, Any]:
    return {
        "user": user_out(user),
        "accessToken": issue_access_token(str(user["id"]), settings=settings),
        "refreshToken": refresh_token,
        "tokenType": "Bearer",
        "expiresIn": settings.access_token_ttl,
    }


def register(*, email: str, password: str) -> dict[str, Any]:
    """Create an account and sign it in; EmailTaken when the email exists in any letter case."""
    settings = get_settings()
    password_hash = hash_password(password)  # outside the transaction: a hash is slow on purpose
    with db.transaction() as conn:
        try:
            user = conn.execute(
                """
                INSERT INTO users (email, password_hash) VALUES (%s, %s)
                ON CONFLICT ((lower(email))) DO NOTHING
                RETURNING id, email, created_at
                """,
                (email, password_hash),
            ).fetchone()
        except pg_errors.UniqueViolation:
            user = None
        if user is None:
            raise EmailTaken()
        token = _start_session(conn, user_id=user["id"], action="user.registered", settings=settings)
    return _auth_reply(user, token, settings)


def login(*, email: str, password: str) -> dict[str, Any]:
    """Check the password and start a new refresh-token family."""
    settings = get_settings()
    with db.read() as conn:
        user = conn.execute(
            "SELECT id, email, password_hash, created_at FROM users WHERE lower(email) = lower(%s)", (email,)
        ).fetchone()
    # The same argon2 work whether or not the email exists: timing tells nothing.
    ok = verify_password(user["password_hash"] if user else _DUMMY_HASH, password)
    if user is None or not ok:
        raise InvalidCredentials()
    with db.transaction() as conn:
        token = _start_session(conn, user_id=user["id"], action="user.login", settings=settings)
    return _auth_reply(user, token, settings)


def refresh(*, refresh_token: str) -> dict[str, Any]:
    """Rotate a refresh token; reuse of a rotated one revokes its whole family."""
    settings = get_settings()
    with db.transaction() as conn:
        row = conn.execute(
            """
            SELECT t.id, t.family_id, t.user_id, t.expires_at, t.rotated_at, t.revoked_at,
                   t.expires_at <= now() AS expired,
                   now() - t.rotated_at <= make_interval(secs => %s) AS in_grace,
                   u.email, u.created_at AS user_created_at
            FROM refresh_tokens t JOIN users u ON u.id = t.user_id
            WHERE t.token_hash = %s
            FOR UPDATE OF t
            """,
            (settings.refresh_reuse_grace, _token_hash(refresh_token)),
        ).fetchone()
        if row is None or row["revoked_at"] is not None or row["expired"]:
            raise InvalidToken("The refresh token is invalid or expired.")
        if row["rotated_at"] is not None:
            if row["in_grace"]:
                # Two tabs refreshing at once: the loser is refused but the family lives on.
                raise InvalidToken("The refresh token was just rotated; use the newer one.")
            # A rotated token presented again: it may have been stolen. End the family,
            # committed before the refusal (raising inside the transaction would roll it back).
            conn.execute(
                "UPDATE refresh_tokens SET revoked_at = now() WHERE family_id = %s AND revoked_at IS NULL",
                (row["family_id"],),
            )
            token = None
        else:
            conn.execute("UPDATE refresh_tokens SET rotated_at = now() WHERE id = %s", (row["id"],))
            token = _new_refresh_token(
                conn,
                user_id=row["user_id"],
                family_id=row["family_id"],
                expires_at=row["expires_at"],  # the family's absolute lifetime does not move
                parent_id=row["id"],
                settings=settings,
            )
    if token is None:
        raise InvalidToken("The refresh token was already used; sign in again.")
    user = {"id": row["user_id"], "email": row["email"], "created_at": row["user_created_at"]}
    return _auth_reply(user, token, settings)


def logout(*, user_id: str, refresh_token: str) -> None:
    """Revoke the refresh token's family (only the caller's own; unknown tokens are ignored)."""
    with db.transaction() as conn:
        conn.execute(
            """
            UPDATE refresh_tokens SET revoked_at = now()
            WHERE revoked_at IS NULL AND user_id = %s
              AND family_id = (SELECT family_id FROM refresh_tokens WHERE token_hash = %s)
            """,
            (user_id, _token_hash(refresh_token)),
        )


def me(user_id: str) -> dict[str, Any]:
    """The signed-in user; InvalidToken when the account no longer exists."""
    with db.read() as conn:
        user = conn.execute("SELECT id, email, created_at FROM users WHERE id = %s", (user_id,)).fetchone()
    if user is None:
        raise InvalidToken()
    return user_out(user)


# A revoked family is dead at once; its tokens are kept a day for whoever investigates why.
_REVOKED_KEPT_S = 24 * 3600


def purge_dead_refresh_tokens(conn: db.Conn, *, limit: int) -> int:
    """Delete up to `limit` tokens of dead families (one batch of the purge job).

    A family is dead once its life is over (`expires_at`, the same for all its tokens) or it was revoked.
    Rotated tokens of a living family stay: presenting one again is how a stolen token is detected.
    """
    cur = conn.execute(
        """
        DELETE FROM refresh_tokens WHERE id IN (
            SELECT id FROM (
                (SELECT id FROM refresh_tokens WHERE expires_at < now() ORDER BY expires_at LIMIT %(n)s)
                UNION
                (SELECT id FROM refresh_tokens
                 WHERE revoked_at < now() - make_interval(secs => %(kept)s) LIMIT %(n)s)
            ) dead LIMIT %(n)s
        )
        """,
        {"n": limit, "kept": _REVOKED_KEPT_S},
    )
    return cur.rowcount
