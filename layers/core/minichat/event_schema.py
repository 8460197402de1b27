"""The MQ event schema, defined once: the queues, the two events, how each is written and validated.

The producer (minichat.events: the outbox) builds a UsageEvent or AuditEvent and writes its `payload()`;
the consumer (minichat.usage: the worker) reads a message body back with `parse_usage` / `parse_audit`,
which check every field and type before anything is stored. Pure: no database, no broker.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

__all__ = [
    "AUDIT_QUEUE",
    "MAX_BODY_BYTES",
    "QUEUES",
    "USAGE_QUEUE",
    "AuditEvent",
    "InvalidMessage",
    "UsageEvent",
    "parse_audit",
    "parse_usage",
    "storable",
]

USAGE_QUEUE = "usage_event"
AUDIT_QUEUE = "audit_event"
QUEUES: tuple[str, ...] = (USAGE_QUEUE, AUDIT_QUEUE)

MAX_BODY_BYTES = 256 * 1024
_MAX_INT4 = 2**31 - 1  # usage_events token columns are `integer`
_MAX_MODEL_LEN = 200
_MAX_ACTION_LEN = 100
_MAX_METADATA_DEPTH = 32
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_ACTION = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+")


class InvalidMessage(ValueError):
    """A message the worker cannot record; its text is the dead letter's reason."""


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class UsageEvent:
    """A validated usage event."""

    event_id: uuid.UUID
    user_id: uuid.UUID
    generation_id: uuid.UUID
    model: str
    input_tokens: int
    output_tokens: int
    estimated: bool
    occurred_at: datetime

    def payload(self) -> dict[str, Any]:
        """The message body (JSON object) of this event."""
        return {
            "eventId": str(self.event_id),
            "userId": str(self.user_id),
            "generationId": str(self.generation_id),
            "model": self.model,
            "inputTokens": self.input_tokens,
            "outputTokens": self.output_tokens,
            "estimated": self.estimated,
            "occurredAt": _iso(self.occurred_at),
        }


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """A validated audit event."""

    event_id: uuid.UUID
    user_id: uuid.UUID | None
    action: str
    metadata: dict[str, Any]
    occurred_at: datetime

    def payload(self) -> dict[str, Any]:
        """The message body (JSON object) of this event."""
        return {
            "eventId": str(self.event_id),
            "userId": str(self.user_id) if self.user_id else None,
            "action": self.action,
            "metadata": self.metadata,
            "occurredAt": _iso(self.occurred_at),
        }


# ---------------------------------------------------------------------------------------------------------
# Validating bodies (pure): every field and type checked before anything is written.


def parse_usage(body: bytes) -> UsageEvent:
    """A usage event from its JSON body; InvalidMessage says what is wrong."""
    obj = _load_object(body)
    return UsageEvent(
        event_id=_uuid(obj, "eventId"),
        user_id=_uuid(obj, "userId"),
        generation_id=_uuid(obj, "generationId"),
        model=_text(obj, "model", max_len=_MAX_MODEL_LEN),
        input_tokens=_count(obj, "inputTokens"),
        output_tokens=_count(obj, "outputTokens"),
        estimated=_bool(obj, "estimated"),
        occurred_at=_time(obj, "occurredAt"),
    )


def parse_audit(body: bytes) -> AuditEvent:
    """An audit event from its JSON body; InvalidMessage says what is wrong."""
    obj = _load_object(body)
    action = _text(obj, "action", max_len=_MAX_ACTION_LEN)
    if not _ACTION.fullmatch(action):
        raise InvalidMessage("action must look like 'noun.verb' (lowercase, dotted)")
    if "metadata" not in obj:
        raise InvalidMessage("metadata is missing")
    metadata = obj["metadata"]
    if not isinstance(metadata, dict):
        raise InvalidMessage("metadata must be an object")
    _check_storable_json(metadata, "metadata", 0)
    return AuditEvent(
        event_id=_uuid(obj, "eventId"),
        user_id=_uuid(obj, "userId", nullable=True),
        action=action,
        metadata=metadata,
        occurred_at=_time(obj, "occurredAt"),
    )


def _reject_constant(name: str) -> Any:
    raise InvalidMessage(f"body is not valid JSON ({name} is not a JSON number)")


def _load_object(body: bytes) -> dict[str, Any]:
    if len(body) > MAX_BODY_BYTES:
        raise InvalidMessage(f"body is larger than {MAX_BODY_BYTES} bytes")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidMessage("body is not UTF-8") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except InvalidMessage:
        raise
    except (ValueError, RecursionError) as exc:
        raise InvalidMessage(f"body is not valid JSON ({type(exc).__name__})") from None
    if not isinstance(value, dict):
        raise InvalidMessage("body is not a JSON object")
    return value


def _present(obj: Mapping[str, Any], name: str) -> Any:
    if name not in obj:
        raise InvalidMessage(f"{name} is missing")
    return obj[name]


def _uuid(obj: Mapping[str, Any], name: str, *, nullable: bool = False) -> Any:
    value = _present(obj, name)
    if value is None and nullable:
        return None
    if not isinstance(value, str) or not _UUID.fullmatch(value):
        raise InvalidMessage(f"{name} must be a UUID string")
    return uuid.UUID(value)


def _count(obj: Mapping[str, Any], name: str) -> int:
    value = _present(obj, name)
    # bool is an int in Python, never a token count in JSON.
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _MAX_INT4:
        raise InvalidMessage(f"{name} must be an integer between 0 and {_MAX_INT4}")
    return value


def _bool(obj: Mapping[str, Any], name: str) -> bool:
    value = _present(obj, name)
    if not isinstance(value, bool):
        raise InvalidMessage(f"{name} must be true or false")
    return value


def _text(obj: Mapping[str, Any], name: str, *, max_len: int) -> str:
    value = _present(obj, name)
    if not isinstance(value, str) or not 1 <= len(value) <= max_len:
        raise InvalidMessage(f"{name} must be a string of 1 to {max_len} characters")
    if not storable(value):
        raise InvalidMessage(f"{name} contains characters PostgreSQL cannot store")
    return value


def _time(obj: Mapping[str, Any], name: str) -> datetime:
    value = _present(obj, name)
    if not isinstance(value, str):
        raise InvalidMessage(f"{name} must be an ISO-8601 time string")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidMessage(f"{name} must be an ISO-8601 time string") from None
    if parsed.tzinfo is None or parsed.utcoffset() is None:
        raise InvalidMessage(f"{name} must carry a time zone (Z or an offset)")
    return parsed.astimezone(UTC)


def storable(text: str) -> bool:
    # PostgreSQL text and jsonb refuse NUL; lone surrogates cannot be encoded to UTF-8 at all.
    if "\x00" in text:
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_storable_json(value: Any, path: str, depth: int) -> None:
    if depth > _MAX_METADATA_DEPTH:
        raise InvalidMessage(f"{path} is nested deeper than {_MAX_METADATA_DEPTH} levels")
    if isinstance(value, str):
        if not storable(value):
            raise InvalidMessage(f"{path} contains characters PostgreSQL cannot store")
    elif isinstance(value, dict):
        for key, item in value.items():
            if not storable(key):
                raise InvalidMessage(f"{path} has a key PostgreSQL cannot store")
            _check_storable_json(item, path, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _check_storable_json(item, path, depth + 1)
