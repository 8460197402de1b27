"""Request input checks shared by every edge: bounds from SPEC §2, unknown fields refused."""

from __future__ import annotations

import base64
import json
import math
import re
import uuid
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from datetime import date
from typing import Any

from minichat.errors import InvalidJson, NotFound, PayloadTooLarge, ValidationError

__all__ = [
    "MAX_BODY_BYTES",
    "decode_cursor",
    "email_field",
    "encode_cursor",
    "number_field",
    "parse_day",
    "parse_json_object",
    "parse_limit",
    "parse_uuid",
    "require_fields",
    "text_field",
]

MAX_BODY_BYTES = 256 * 1024
MAX_JSON_DEPTH = 32
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


def _depth(value: Any, level: int = 0) -> int:
    if level > MAX_JSON_DEPTH:
        return level
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level + 1)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level + 1)
    return level


def parse_json_object(raw: bytes | str | None, *, allow_empty: bool = False) -> dict[str, Any]:
    """Parse a request body that must be a JSON object (an empty body is `{}` when allowed)."""
    if raw is None or raw in (b"", ""):
        if allow_empty:
            return {}
        raise InvalidJson("A JSON object body is required.")
    if len(raw) > MAX_BODY_BYTES:
        raise PayloadTooLarge()
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InvalidJson() from None
    except RecursionError:
        raise ValidationError("The request body is nested too deeply.") from None
    if not isinstance(value, dict):
        raise InvalidJson("The request body must be a JSON object.")
    if _depth(value) > MAX_JSON_DEPTH:
        raise ValidationError("The request body is nested too deeply.")
    return value


def require_fields(
    body: Mapping[str, Any], *, allowed: AbstractSet[str], required: AbstractSet[str] = frozenset()
) -> None:
    """Refuse unknown fields (never silently applied) and missing required ones."""
    for name in body:
        if name not in allowed:
            raise ValidationError(f"Field '{name}' is not allowed here.", field=name)
    for name in sorted(required):
        if name not in body:
            raise ValidationError(f"Field '{name}' is required.", field=name)


def text_field(
    body: Mapping[str, Any],
    name: str,
    *,
    min_len: int = 0,
    max_len: int,
    strip: bool = False,
    blank: bool = True,
) -> str | None:
    """A string field within length bounds; None when absent or null."""
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValidationError(f"Field '{name}' must be a string.", field=name)
    if strip:
        value = value.strip()
    if "\x00" in value:
        raise ValidationError(f"Field '{name}' must not contain NUL characters.", field=name)
    if not min_len <= len(value) <= max_len:
        raise ValidationError(f"Field '{name}' must be {min_len} to {max_len} characters long.", field=name)
    if not blank and not value.strip():
        raise ValidationError(f"Field '{name}' must not be blank.", field=name)
    return value


def email_field(body: Mapping[str, Any]) -> str:
    value = text_field(body, "email", min_len=3, max_len=254, strip=True)
    if value is None or not _EMAIL.match(value):
        raise ValidationError("Field 'email' must be an email address.", field="email")
    return value


def number_field(body: Mapping[str, Any], name: str, *, low: float, high: float, integer: bool) -> Any:
    """A number within [low, high]; None when absent or null. Booleans are not numbers."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationError(f"Field '{name}' must be a number.", field=name)
    if integer and not isinstance(value, int):
        raise ValidationError(f"Field '{name}' must be an integer.", field=name)
    if not math.isfinite(value) or not low <= value <= high:
        raise ValidationError(f"Field '{name}' must be between {low:g} and {high:g}.", field=name)
    return value


def parse_day(query: Mapping[str, str], name: str) -> date | None:
    """A `YYYY-MM-DD` query parameter (a UTC day); None when absent."""
    raw = query.get(name)
    if raw is None or raw == "":
        return None
    try:
        if len(raw) != 10:
            raise ValueError(raw)
        return date.fromisoformat(raw)
    except ValueError:
        raise ValidationError(f"'{name}' must be a day as YYYY-MM-DD.", field=name) from None


def parse_uuid(value: str | None) -> str:
    """A path id: anything but a UUID is simply not found."""
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        raise NotFound() from None


def parse_limit(query: Mapping[str, str] | None, *, default: int = 50, high: int = 200) -> int:
    raw = (query or {}).get("limit")
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= high:
        raise ValidationError(f"'limit' must be an integer from 1 to {high}.", field="limit")
    return int(raw)


def encode_cursor(values: list[Any]) -> str:
    """An opaque cursor: the keyset position, base64url JSON."""
    return base64.urlsafe_b64encode(json.dumps(values, separators=(",", ":")).encode()).decode().rstrip("=")


def decode_cursor(raw: str | None, *, size: int) -> list[Any] | None:
    if raw is None or raw == "":
        return None
    try:
        values = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    except (ValueError, UnicodeDecodeError):
        values = None
    if not isinstance(values, list) or len(values) != size:
        raise ValidationError("'cursor' is not a cursor this API returned.", field="cursor")
    return values
