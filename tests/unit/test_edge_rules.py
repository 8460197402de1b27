"""Domain rules the entry points ask the core for: streamUrl's stage prefix and a stream ticket's grace."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from minichat import auth
from minichat.errors import InvalidToken
from minichat.serialize import public_path_prefix

DEFAULT_HOST = "abc123.execute-api.us-east-1.amazonaws.com"


@pytest.mark.parametrize(
    ("stage", "host", "headers", "prefix"),
    [
        ("dev", DEFAULT_HOST, {}, "/dev"),  # the default host: paths start with the stage
        ("dev", DEFAULT_HOST, {"x-minichat-origin": "cloudfront"}, ""),  # CloudFront's one origin
        ("dev", "chat.example.com", {}, ""),  # a custom domain mapped at /
        (None, "127.0.0.1:8000", {}, ""),  # local mode
        ("", DEFAULT_HOST, {}, ""),
    ],
)
def test_stream_url_prefix(stage: str | None, host: str, headers: dict[str, str], prefix: str) -> None:
    assert public_path_prefix(stage=stage, host=host, headers=headers) == prefix


def test_a_ticket_works_until_ten_minutes_after_the_end() -> None:
    now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
    auth.check_stream_ticket_grace(None, now=now)  # still running
    auth.check_stream_ticket_grace(now - timedelta(seconds=600), now=now)
    with pytest.raises(InvalidToken):
        auth.check_stream_ticket_grace(now - timedelta(seconds=601), now=now)
