"""Who may go ahead: the rate limits of each kind of request, and what a Redis outage means for each.

The rules the API's routes used to decide themselves (SPEC §2, §7.4): which limit counts what, that a
deleted account's tokens are refused in the same Redis call, and that when Redis cannot be reached the
limits fail open (auth and reads go on) except a generation's create, which fails closed (503). A route
only says which limit applies and shapes the reply: `counted` receives every decision that counted the
request, for its X-RateLimit-* headers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import redis

from minichat import accounts, limits
from minichat.config import Settings, get_settings
from minichat.errors import InvalidCredentials, InvalidToken, RateLimited, ServiceUnavailable
from minichat.limits import Decision, Rate
from minichat.log import get_logger

__all__ = [
    "ACCOUNT_PASSWORD_FAILURES",
    "API_CALL",
    "GENERATIONS",
    "LOGIN_FAILURES",
    "LOGIN_IP",
    "Counted",
    "Limit",
    "check",
    "check_call",
    "failures_limited",
    "rate_of",
]

log = get_logger("minichat.admission")

Counted = Callable[[Decision], None]


@dataclass(frozen=True)
class Limit:
    """A rate limit: its Redis bucket, the setting with its rate, and whether it fails closed."""

    bucket: str
    setting: str  # the Settings attribute: "10/60", or "off"
    fail_closed: bool = False


# Every failed login per (email, client IP), every login attempt per client IP (checked before the
# password hash), wrong passwords of an account deletion per (account, client IP), every authenticated
# call per user, every generation create per user (fails closed: without Redis there is no lock either).
LOGIN_FAILURES = Limit("login-failures", "rate_login_email")
LOGIN_IP = Limit("auth-ip", "rate_login_ip")
ACCOUNT_PASSWORD_FAILURES = Limit("account-password-failures", "rate_login_email")
API_CALL = Limit("api", "rate_api")
GENERATIONS = Limit("generations", "rate_generations", fail_closed=True)

_parsed: dict[tuple[str, str], Rate | None] = {}


def rate_of(limit: Limit, settings: Settings | None = None) -> Rate | None:
    """The limit's configured rate (None: off), parsed once per text."""
    text = getattr(settings or get_settings(), limit.setting)
    key = (limit.bucket, text)
    if key not in _parsed:
        _parsed[key] = Rate.parse(text, name=limit.bucket)
    return _parsed[key]


def decide(decision: Decision, counted: Counted | None) -> None:
    """Report a counting decision, then refuse (429) when it says no."""
    if counted is not None:
        counted(decision)
    if not decision.allowed:
        raise RateLimited(decision.retry_after_s)


def unavailable(limit: Limit, exc: redis.RedisError) -> None:
    """Redis is down: a limit that fails closed refuses (503); the others let the request go on."""
    if limit.fail_closed:
        raise ServiceUnavailable("Rate limits cannot be checked right now; retry shortly.") from exc
    log.warning("rate limit skipped: redis unavailable", bucket=limit.bucket)


def check(
    limit: Limit,
    key: str,
    *,
    peek: bool = False,
    account: str | None = None,
    counted: Counted | None = None,
) -> None:
    """Count this request against `limit` for `key`; RateLimited (429) when over.

    `peek`: check without counting. `account`: also refuse the token (InvalidToken) when that user's
    account was deleted, in the same Redis call.
    """
    rate = rate_of(limit)
    if rate is None and account is None:
        return
    try:
        decision = limits.hit(
            bucket=limit.bucket,
            key=key,
            rate=rate,
            peek=peek,
            unless_exists=accounts.deleted_key(account) if account else None,
        )
    except redis.RedisError as exc:
        unavailable(limit, exc)
        return
    if decision.gone:
        raise InvalidToken("This account no longer exists.")
    if rate is not None:
        decide(decision, counted)


def check_call(user_id: str, *, counted: Counted | None = None) -> None:
    """Every authenticated call: the per-user limit, and the deleted-account check."""
    check(API_CALL, user_id, account=user_id, counted=counted)


@contextlib.contextmanager
def failures_limited(limit: Limit, key: str, *, counted: Counted | None = None) -> Iterator[None]:
    """Refuse (429) once `key` has failed its password too often; count the failure if this one does."""
    check(limit, key, peek=True, counted=counted)
    try:
        yield
    except InvalidCredentials:
        check(limit, key, counted=counted)
        raise
