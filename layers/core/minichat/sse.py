"""Pure encode/decode of Server-Sent Events frames (the stream protocol, SPEC §3)."""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["encode_comment", "encode_event", "parse_sse"]

# One encoder built once: json.dumps with non-default options builds a new encoder on every call.
_COMPACT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_COMPACT_ASCII = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"))
_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def encode_event(event_id: int, data: dict[str, Any]) -> bytes:
    """One event: `id: <n>`, one `data:` line of compact JSON, and the blank line that ends it."""
    # JSON escapes every control character, so a newline inside a delta stays inside the string and
    # the event is always exactly one data line.
    payload = _COMPACT.encode(data)
    try:
        return f"id: {event_id}\ndata: {payload}\n\n".encode()
    except UnicodeEncodeError:
        # A lone surrogate (a model can emit half a pair) has no UTF-8 form; the \\uXXXX escape is
        # valid JSON and gives the client back the very same string.
        payload = _COMPACT_ASCII.encode(data)
        return f"id: {event_id}\ndata: {payload}\n\n".encode()


def encode_comment(text: str = "ping") -> bytes:
    """A comment frame (`: ping`), ignored by clients; keeps idle connections and proxies alive."""
    lines = _LINE_BREAK.split(text)
    return "".join(f": {line}\n" for line in lines).encode() + b"\n"


def parse_sse(stream: str | bytes) -> list[tuple[str | None, str]]:
    """Decode a complete SSE body into (id or None, data) per event, as the HTML living standard does."""
    text = stream.decode() if isinstance(stream, bytes) else stream
    if text.startswith("\ufeff"):
        text = text[1:]
    events: list[tuple[str | None, str]] = []
    event_id: str | None = None
    data: list[str] = []
    # A trailing event with no blank line after it is incomplete and, per the standard, dropped:
    # splitting keeps the text after the last line break as a final partial line, never dispatched.
    for line in _LINE_BREAK.split(text)[:-1]:
        if not line:
            if data:
                events.append((event_id, "\n".join(data)))
            event_id, data = None, []
            continue
        if line.startswith(":"):
            continue
        field, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if field == "data":
            data.append(value)
        elif field == "id" and "\0" not in value:
            event_id = value
    return events
