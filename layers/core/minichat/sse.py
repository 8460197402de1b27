"""Pure encode/decode of Server-Sent Events frames (the stream protocol, SPEC §3)."""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["Decoder", "encode_comment", "encode_delta", "encode_event", "parse_sse"]

# One encoder built once: json.dumps with non-default options builds a new encoder on every call.
_COMPACT = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_COMPACT_ASCII = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"))
_LINE_BREAK = re.compile(r"\r\n|\r|\n")
_BOM = b"\xef\xbb\xbf"


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


def encode_delta(event_id: int, text: str) -> bytes:
    """encode_event(event_id, {"type": "delta", "delta": text}), byte for byte, without the dict: the
    frame every token becomes."""
    try:
        return f'id: {event_id}\ndata: {{"type":"delta","delta":{_COMPACT.encode(text)}}}\n\n'.encode()
    except UnicodeEncodeError:  # a lone surrogate, as in encode_event
        return f'id: {event_id}\ndata: {{"type":"delta","delta":{_COMPACT_ASCII.encode(text)}}}\n\n'.encode()


def encode_comment(text: str = "ping") -> bytes:
    """A comment frame (`: ping`), ignored by clients; keeps idle connections and proxies alive."""
    lines = _LINE_BREAK.split(text)
    return "".join(f": {line}\n" for line in lines).encode() + b"\n"


class Decoder:
    """Incremental SSE decoding, as the HTML living standard reads an event stream: feed the body's bytes
    as they arrive, get back each event completed by them as (id or None, data).

    Lines end with CRLF, LF or CR (a CRLF split between two blocks counts once); comments and the
    `event` and `retry` fields are skipped; an event without data is not dispatched. The id is the
    event's own `id` field (None without one). The fast path, one `data: ` line per event in LF-ended
    blocks as every OpenAI-compatible server sends, costs one split and a prefix check per line.
    """

    __slots__ = ("_data", "_id", "_pending_cr", "_started", "_tail")

    def __init__(self) -> None:
        self._tail = b""  # the last line, still incomplete
        self._data: list[bytes] = []  # the data lines of the event being read
        self._id: bytes | None = None
        self._pending_cr = False  # the last block ended with CR: an LF starting the next one ends nothing
        self._started = False

    def feed(self, block: bytes) -> list[tuple[bytes | None, bytes]]:
        if not self._started:
            block = self._tail + block
            self._tail = b""
            if len(block) < 3 and _BOM.startswith(block):
                self._tail = block  # may still be the BOM
                return []
            self._started = True
            if block[:3] == _BOM:
                block = block[3:]
        if self._pending_cr:
            self._pending_cr = False
            if block[:1] == b"\n":
                block = block[1:]
        if b"\r" in block:
            self._pending_cr = block[-1:] == b"\r"
            block = block.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = (self._tail + block).split(b"\n") if self._tail else block.split(b"\n")
        self._tail = lines.pop()
        events: list[tuple[bytes | None, bytes]] = []
        data = self._data
        for line in lines:
            if line:
                if line[:5] == b"data:":
                    data.append(line[6:] if line[5:6] == b" " else line[5:])
                elif line[:1] != b":":
                    field, _, value = line.partition(b":")
                    if value[:1] == b" ":
                        value = value[1:]
                    if field == b"data":
                        data.append(value)
                    elif field == b"id" and b"\0" not in value:
                        self._id = value
                continue
            if data:
                events.append((self._id, data[0] if len(data) == 1 else b"\n".join(data)))
                data = self._data = []
            self._id = None
        return events


def parse_sse(stream: str | bytes) -> list[tuple[str | None, str]]:
    """Decode a complete SSE body into (id or None, data) per event (a Decoder fed the whole body; a
    trailing event with no blank line after it is incomplete and, per the standard, dropped)."""
    raw = stream.encode("utf-8", "surrogatepass") if isinstance(stream, str) else stream
    return [
        (
            None if event_id is None else event_id.decode("utf-8", "surrogatepass"),
            data.decode("utf-8", "surrogatepass"),
        )
        for event_id, data in Decoder().feed(raw)
    ]
