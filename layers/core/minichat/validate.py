"""Request input checks shared by every edge: bounds from SPEC §2, unknown fields refused.

Request bodies are declared once, as `Body` specs made of `Text` and `Number` fields: the same objects
check a request and write its JSON Schema for the OpenAPI description, so the two cannot disagree.
Every pattern here is written with explicit `\\uXXXX` character classes only, which Python's `re` and
ECMA-262 (JSON Schema's `pattern`) read the same way.
"""

from __future__ import annotations

import base64
import json
import math
import re
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from minichat.errors import InvalidJson, NotFound, PayloadTooLarge, ValidationError

__all__ = [
    "DAY_PATTERN",
    "EMAIL",
    "EMAIL_PATTERN",
    "ID",
    "IDEMPOTENCY_KEY",
    "LIMIT",
    "MAX_BODY_BYTES",
    "MAX_JSON_DEPTH",
    "NOT_BLANK_PATTERN",
    "NO_NUL_PATTERN",
    "UUID_PATTERN",
    "WHITESPACE",
    "Body",
    "Cursor",
    "Day",
    "FieldRule",
    "Id",
    "IdempotencyKey",
    "Limit",
    "Number",
    "Text",
    "Uuid",
    "cursor_pattern",
    "decode_cursor",
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

# What `str.strip()` and `str.isspace()` treat as whitespace, spelled out, so the JSON Schema patterns
# below can say exactly the same (tests compare it with str.isspace over all of Unicode).
WHITESPACE = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680"
    "\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)
_WS = r"\u0009-\u000d\u001c-\u0020\u0085\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"
# Text fields never hold NUL (PostgreSQL text cannot).
NO_NUL_PATTERN = r"^[^\u0000]*$"
# ... and a "not blank" one holds at least one character that is not whitespace.
NOT_BLANK_PATTERN = rf"^[^\u0000]*[^\u0000{_WS}][^\u0000]*$"
EMAIL_PATTERN = rf"^[^@\u0000{_WS}]+@[^@\u0000{_WS}]+\.[^@\u0000{_WS}]+$"
UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
DAY_PATTERN = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$"

_EMAIL = re.compile(EMAIL_PATTERN)
_UUID = re.compile(UUID_PATTERN)
_DAY = re.compile(DAY_PATTERN)


def _depth(value: Any, level: int = 0) -> int:
    if level > MAX_JSON_DEPTH:
        return level
    if isinstance(value, dict):
        return max((_depth(v, level + 1) for v in value.values()), default=level + 1)
    if isinstance(value, list):
        return max((_depth(v, level + 1) for v in value), default=level + 1)
    return level


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json_object(raw: bytes | str | None, *, allow_empty: bool = False) -> dict[str, Any]:
    """Parse a request body that must be a JSON object (an empty body is `{}` when allowed)."""
    if raw is None or raw in (b"", ""):
        if allow_empty:
            return {}
        raise InvalidJson("A JSON object body is required.")
    if len(raw) > MAX_BODY_BYTES:
        raise PayloadTooLarge()
    try:
        # JSON text is UTF-8 (RFC 8259): no UTF-16/32 guessing, no BOM, no NaN or Infinity.
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        value = json.loads(text, parse_constant=_no_constant)
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


def _is_blank(value: str) -> bool:
    return not value.strip(WHITESPACE)


def text_field(
    body: Mapping[str, Any],
    name: str,
    *,
    min_len: int = 0,
    max_len: int,
    strip: bool = False,
    blank: bool = True,
    required: bool = False,
) -> str | None:
    """A string field within length bounds; None when absent or null (an error when `required`).

    The bounds apply to the value as sent; `strip` then removes surrounding whitespace from what is
    returned (and `blank=False` refuses a value that is whitespace only).
    """
    value = body.get(name)
    if value is None:
        if required:
            raise ValidationError(f"Field '{name}' must be a string.", field=name)
        return None
    if not isinstance(value, str):
        raise ValidationError(f"Field '{name}' must be a string.", field=name)
    if "\x00" in value:
        raise ValidationError(f"Field '{name}' must not contain NUL characters.", field=name)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate (`"\ud800"` is valid JSON): no UTF-8 form to store
        raise ValidationError(f"Field '{name}' must be valid Unicode text.", field=name) from None
    if not min_len <= len(value) <= max_len:
        raise ValidationError(f"Field '{name}' must be {min_len} to {max_len} characters long.", field=name)
    if not blank and _is_blank(value):
        raise ValidationError(f"Field '{name}' must not be blank.", field=name)
    return value.strip(WHITESPACE) if strip else value


def number_field(
    body: Mapping[str, Any], name: str, *, low: float, high: float, integer: bool, required: bool = False
) -> Any:
    """A number within [low, high]; None when absent or null. Booleans are not numbers.

    An integer field takes an integer literal (`64`, not `64.0`; `Number.read` reads `64.0` as `64`).
    """
    value = body.get(name)
    if value is None:
        if required:
            raise ValidationError(f"Field '{name}' must be a number.", field=name)
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationError(f"Field '{name}' must be a number.", field=name)
    if integer and not isinstance(value, int):
        raise ValidationError(f"Field '{name}' must be an integer.", field=name)
    # Compared as they are: a huge integer literal has no float form (math.isfinite would raise).
    if (isinstance(value, float) and not math.isfinite(value)) or not low <= value <= high:
        raise ValidationError(f"Field '{name}' must be between {low:g} and {high:g}.", field=name)
    return value


@dataclass(frozen=True)
class Text:
    """A string field: its bounds, and how it reads and describes itself."""

    max_len: int
    min_len: int = 0
    strip: bool = False  # surrounding whitespace is removed from the stored value
    blank: bool = True  # False: at least one character that is not whitespace
    email: bool = False
    description: str = ""

    def read(self, body: Mapping[str, Any], name: str, *, required: bool = False) -> str | None:
        value = text_field(
            body,
            name,
            min_len=self.min_len,
            max_len=self.max_len,
            strip=self.strip,
            blank=self.blank,
            required=required,
        )
        if self.email and value is not None and not _EMAIL.fullmatch(value):
            raise ValidationError(f"Field '{name}' must be an email address.", field=name)
        return value

    def json_schema(self, *, nullable: bool) -> dict[str, Any]:
        if self.email:
            pattern = EMAIL_PATTERN
        elif not self.blank:
            pattern = NOT_BLANK_PATTERN
        else:
            pattern = NO_NUL_PATTERN
        schema: dict[str, Any] = {"type": ["string", "null"] if nullable else "string"}
        if self.min_len:
            schema["minLength"] = self.min_len
        schema["maxLength"] = self.max_len
        schema["pattern"] = pattern
        if self.description:
            schema["description"] = self.description
        return schema


EMAIL = Text(min_len=3, max_len=254, email=True, description="An email address (no whitespace).")


@dataclass(frozen=True)
class Number:
    """A number (or integer) field within [low, high]."""

    low: float
    high: float
    integer: bool = False
    description: str = ""

    def read(self, body: Mapping[str, Any], name: str, *, required: bool = False) -> Any:
        value = body.get(name)
        if self.integer and isinstance(value, float) and value.is_integer():
            # JSON (and JSON Schema) cannot tell 64.0 from 64: an integral number is that integer.
            body = {name: int(value)}
        return number_field(body, name, low=self.low, high=self.high, integer=self.integer, required=required)

    def json_schema(self, *, nullable: bool) -> dict[str, Any]:
        kind = "integer" if self.integer else "number"
        schema: dict[str, Any] = {
            "type": [kind, "null"] if nullable else kind,
            "minimum": self.low,
            "maximum": self.high,
        }
        if self.description:
            schema["description"] = self.description
        return schema


@dataclass(frozen=True)
class Uuid:
    """A field holding an id (a UUID, read in lower case)."""

    description: str = ""

    def read(self, body: Mapping[str, Any], name: str, *, required: bool = False) -> str | None:
        value = body.get(name)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not _UUID.fullmatch(value):
            raise ValidationError(f"Field '{name}' must be an id (a UUID).", field=name)
        return value.lower()

    def json_schema(self, *, nullable: bool) -> dict[str, Any]:
        schema: dict[str, Any] = {
            "type": ["string", "null"] if nullable else "string",
            "format": "uuid",
            "pattern": UUID_PATTERN,
        }
        if self.description:
            schema["description"] = self.description
        return schema


@dataclass(frozen=True)
class FieldRule:
    """When `field` is given: each of `needs` must be given too, and none of `excludes`."""

    field: str
    needs: tuple[str, ...] = ()
    excludes: tuple[str, ...] = ()

    def check(self, values: Mapping[str, Any]) -> None:
        if values[self.field] is None:
            return
        for name in self.excludes:
            if values[name] is not None:
                raise ValidationError(f"Field '{self.field}' cannot be sent with '{name}'.", field=self.field)
        for name in self.needs:
            if values[name] is None:
                raise ValidationError(f"Field '{name}' is required with '{self.field}'.", field=name)

    def json_schema(self) -> dict[str, Any]:
        given = {name: _NOT_NULL for name in self.needs} | {name: _NULL for name in self.excludes}
        return {
            "anyOf": [
                {"properties": {self.field: _NULL}},
                {"required": list(self.needs), "properties": given} if self.needs else {"properties": given},
            ]
        }


_NULL: dict[str, Any] = {"type": "null"}
_NOT_NULL: dict[str, Any] = {"not": _NULL}


@dataclass(frozen=True)
class Body:
    """A request body: a JSON object with exactly these fields (unknown ones are refused).

    An optional field may be null, which reads as absent; `may_be_empty` takes no body at all as `{}`.
    `at_least_one`: fields of which one must be given (an error names the first); `rules`: what given
    fields need or exclude.
    """

    fields: Mapping[str, Text | Number | Uuid]
    required: frozenset[str] = field(default_factory=frozenset)
    may_be_empty: bool = False
    at_least_one: tuple[str, ...] = ()
    rules: tuple[FieldRule, ...] = ()

    def read(self, raw: bytes | str | None) -> dict[str, Any]:
        """The body's fields (None for those absent), or the first error in it."""
        body = parse_json_object(raw, allow_empty=self.may_be_empty)
        require_fields(body, allowed=self.fields.keys(), required=self.required)
        values = {
            name: spec.read(body, name, required=name in self.required) for name, spec in self.fields.items()
        }
        if self.at_least_one and all(values[name] is None for name in self.at_least_one):
            listing = ", ".join(f"'{name}'" for name in self.at_least_one)
            raise ValidationError(f"At least one of {listing} is required.", field=self.at_least_one[0])
        for rule in self.rules:
            rule.check(values)
        return values

    def json_schema(self) -> dict[str, Any]:
        schema: dict[str, Any] = {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                name: spec.json_schema(nullable=name not in self.required)
                for name, spec in self.fields.items()
            },
        }
        if self.required:
            schema["required"] = sorted(self.required)
        constraints = [rule.json_schema() for rule in self.rules]
        if self.at_least_one:
            constraints.insert(
                0,
                {
                    "anyOf": [
                        {"required": [name], "properties": {name: _NOT_NULL}} for name in self.at_least_one
                    ]
                },
            )
        if constraints:
            schema["allOf"] = constraints
        return schema


# --- parameters (path, query, header): each kind declared once, as a spec that reads the raw text (None
# when absent) and writes the parameter's JSON Schema for the OpenAPI description.


@dataclass(frozen=True)
class Id:
    """A path id: anything but a UUID (8-4-4-4-12 hex digits) is simply not found."""

    def read(self, raw: str | None) -> str:
        if raw is None or not _UUID.fullmatch(raw):
            raise NotFound()
        return raw.lower()

    def json_schema(self) -> dict[str, Any]:
        return {"type": "string", "pattern": UUID_PATTERN}


@dataclass(frozen=True)
class Day:
    """A `YYYY-MM-DD` query parameter (a UTC day); None when absent."""

    name: str

    def read(self, raw: str | None) -> date | None:
        if raw is None:
            return None
        try:
            if not _DAY.fullmatch(raw):
                raise ValueError(raw)
            return date.fromisoformat(raw)
        except ValueError:
            raise ValidationError(f"'{self.name}' must be a day as YYYY-MM-DD.", field=self.name) from None

    def json_schema(self) -> dict[str, Any]:
        return {"type": "string", "format": "date"}


@dataclass(frozen=True)
class Limit:
    """`?limit=`: a page size from 1 to `high`, `default` when absent."""

    default: int = 50
    high: int = 200

    def read(self, raw: str | None) -> int:
        if raw is None:
            return self.default
        # ASCII digits only (str.isdigit also takes Arabic-Indic or superscript digits), and few of them:
        # int() refuses 4,300+ digits.
        if not (raw.isascii() and raw.isdigit() and len(raw) <= 6) or not 1 <= int(raw) <= self.high:
            raise ValidationError(f"'limit' must be an integer from 1 to {self.high}.", field="limit")
        return int(raw)

    def json_schema(self) -> dict[str, Any]:
        return {"type": "integer", "minimum": 1, "maximum": self.high, "default": self.default}


@dataclass(frozen=True)
class Cursor:
    """`?cursor=`: the opaque keyset position of `size` values a previous page returned (None: the first)."""

    size: int

    def read(self, raw: str | None) -> list[int] | None:
        return decode_cursor(raw, size=self.size)

    def json_schema(self) -> dict[str, Any]:
        return {"type": "string", "pattern": cursor_pattern(self.size)}


@dataclass(frozen=True)
class IdempotencyKey:
    """The Idempotency-Key header: 1-255 printable ASCII characters (HTTP strips surrounding spaces)."""

    max_len: int = 255
    pattern: str = r"^[!-~](?:[ -~]*[!-~])?$"

    def read(self, raw: str) -> str:
        if len(raw) > self.max_len or not re.fullmatch(self.pattern, raw):
            raise ValidationError(
                f"Idempotency-Key must be 1 to {self.max_len} printable ASCII characters.",
                field="Idempotency-Key",
            )
        return raw

    def json_schema(self) -> dict[str, Any]:
        return {"type": "string", "maxLength": self.max_len, "pattern": self.pattern}


ID = Id()
LIMIT = Limit()
IDEMPOTENCY_KEY = IdempotencyKey()


def parse_day(query: Mapping[str, str], name: str) -> date | None:
    """A `YYYY-MM-DD` query parameter (a UTC day); None when absent."""
    return Day(name).read(query.get(name))


def parse_uuid(value: str | None) -> str:
    """A path id: anything but a UUID (8-4-4-4-12 hex digits) is simply not found."""
    return ID.read(value)


def parse_limit(query: Mapping[str, str] | None, *, default: int = 50, high: int = 200) -> int:
    spec = LIMIT if (default, high) == (LIMIT.default, LIMIT.high) else Limit(default, high)
    return spec.read((query or {}).get("limit"))


# A cursor is a keyset position of `size` signed 64-bit integers, base64url without padding. Every string
# of that shape decodes to some position (there is no checksum to fail), so the OpenAPI pattern says
# exactly which cursors are accepted: a client, or a fuzzer, that follows the schema is never refused.
_CURSOR_BYTES = 8


def cursor_pattern(size: int) -> str:
    """The JSON Schema pattern of a `size`-value cursor (empty: the first page)."""
    return rf"^(?:[A-Za-z0-9_-]{{{math.ceil(size * _CURSOR_BYTES * 8 / 6)}}})?$"


def encode_cursor(values: list[int]) -> str:
    """An opaque cursor: the keyset position (signed 64-bit integers), base64url."""
    raw = b"".join(int(v).to_bytes(_CURSOR_BYTES, "big", signed=True) for v in values)
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(raw: str | None, *, size: int) -> list[int] | None:
    """The position a cursor names (None: the first page); 400 for anything not of a cursor's shape."""
    if raw is None or raw == "":
        return None
    if not re.fullmatch(cursor_pattern(size), raw):
        raise ValidationError("'cursor' is not a cursor this API returned.", field="cursor")
    data = base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4))
    return [
        int.from_bytes(data[i : i + _CURSOR_BYTES], "big", signed=True)
        for i in range(0, size * _CURSOR_BYTES, _CURSOR_BYTES)
    ]
