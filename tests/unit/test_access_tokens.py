"""Access-token checks, including the per-process cache of tokens already verified."""

from __future__ import annotations

import time
import uuid

import jwt
import pytest

from minichat import auth
from minichat.config import Settings
from minichat.errors import InvalidToken, Unauthorized

SETTINGS = Settings.from_env({"MINICHAT_JWT_SECRET": "a" * 40, "MINICHAT_ACCESS_TOKEN_TTL": "60"})
OTHER_KEY = SETTINGS.with_(jwt_secret_value="b" * 40)


def _token(settings: Settings, **claims: object) -> str:
    now = int(time.time())
    body = {"iss": "minichat", "aud": "minichat-api", "sub": str(uuid.uuid4()), "iat": now, "exp": now + 60}
    body.update({"typ": "access", **claims})
    return jwt.encode(body, settings.jwt_secret, algorithm="HS256")


def test_a_verified_token_is_accepted_again() -> None:
    user_id = str(uuid.uuid4())
    token = auth.issue_access_token(user_id, settings=SETTINGS)
    for _ in range(3):
        assert auth.authenticate(f"Bearer {token}", settings=SETTINGS).user_id == user_id


def test_a_cached_token_is_refused_once_expired() -> None:
    expires = int(time.time()) + 1
    token = _token(SETTINGS, exp=expires)
    assert auth.authenticate(f"Bearer {token}", settings=SETTINGS)
    time.sleep(max(0.0, expires - time.time()) + 0.05)
    with pytest.raises(InvalidToken):
        auth.authenticate(f"Bearer {token}", settings=SETTINGS)


def test_a_token_cached_under_one_key_is_refused_under_another() -> None:
    token = auth.issue_access_token(str(uuid.uuid4()), settings=SETTINGS)
    assert auth.authenticate(f"Bearer {token}", settings=SETTINGS)
    with pytest.raises(InvalidToken):
        auth.authenticate(f"Bearer {token}", settings=OTHER_KEY)


@pytest.mark.parametrize(
    "claims",
    [{"typ": "refresh"}, {"aud": "minichat-api:stream"}, {"sub": "not-a-uuid"}, {"iss": "someone-else"}],
)
def test_refused_tokens_are_never_cached(claims: dict[str, object]) -> None:
    token = _token(SETTINGS, **claims)
    for _ in range(2):
        with pytest.raises(InvalidToken):
            auth.authenticate(f"Bearer {token}", settings=SETTINGS)


@pytest.mark.parametrize("header", [None, "", "Basic abc", "Bearer ", "Bearer    "])
def test_missing_or_malformed_headers(header: str | None) -> None:
    with pytest.raises(Unauthorized):
        auth.authenticate(header, settings=SETTINGS)


def test_the_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "_VERIFIED_MAX", 5)
    auth._verified.clear()
    for _ in range(12):
        token = auth.issue_access_token(str(uuid.uuid4()), settings=SETTINGS)
        auth.authenticate(f"Bearer {token}", settings=SETTINGS)
        assert len(auth._verified) <= 5
