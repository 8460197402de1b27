"""Input checks: bounds, unknown fields, cursors, ids, titles — pure, no network."""

from __future__ import annotations

import re

import pytest

from minichat.chats import title_from
from minichat.errors import InvalidJson, NotFound, PayloadTooLarge, ValidationError
from minichat.validate import (
    cursor_pattern,
    decode_cursor,
    encode_cursor,
    number_field,
    parse_json_object,
    parse_limit,
    parse_uuid,
    require_fields,
    text_field,
)


def test_parse_json_object() -> None:
    assert parse_json_object(b'{"a": 1}') == {"a": 1}
    assert parse_json_object(None, allow_empty=True) == {}
    for raw in (b"", b"[]", b"nope", b"\xff\xfe"):
        with pytest.raises(InvalidJson):
            parse_json_object(raw)
    with pytest.raises(PayloadTooLarge):
        parse_json_object(b" " * (256 * 1024 + 1))
    with pytest.raises(ValidationError):
        parse_json_object(b'{"a":' + b"[" * 100 + b"]" * 100 + b"}")


def test_unknown_and_required_fields_name_the_field() -> None:
    with pytest.raises(ValidationError) as err:
        require_fields({"a": 1, "userId": 2}, allowed={"a"})
    assert err.value.extra == {"field": "userId"}
    with pytest.raises(ValidationError) as err:
        require_fields({}, allowed={"a"}, required={"a"})
    assert err.value.extra == {"field": "a"}


def test_text_field_bounds() -> None:
    assert text_field({"t": " x "}, "t", max_len=5, strip=True) == "x"
    assert text_field({}, "t", max_len=5) is None
    for body in ({"t": "toolong"}, {"t": 1}, {"t": "a\x00b"}):
        with pytest.raises(ValidationError):
            text_field(body, "t", max_len=5)
    with pytest.raises(ValidationError):
        text_field({"t": "   "}, "t", min_len=1, max_len=5, blank=False)


def test_number_field() -> None:
    assert number_field({"x": 1.5}, "x", low=0, high=2, integer=False) == 1.5
    for value in (True, "1", 2.5, float("nan")):
        with pytest.raises(ValidationError):
            number_field({"x": value}, "x", low=0, high=2, integer=False)
    with pytest.raises(ValidationError):
        number_field({"x": 1.0}, "x", low=1, high=10, integer=True)


def test_limit_and_uuid() -> None:
    assert parse_limit(None) == 50 and parse_limit({"limit": "200"}) == 200
    for raw in ("0", "201", "x", "-3", ""):
        with pytest.raises(ValidationError):
            parse_limit({"limit": raw})
    assert parse_uuid("6F9619FF-8B86-D011-B42D-00C04FC964FF") == "6f9619ff-8b86-d011-b42d-00c04fc964ff"
    with pytest.raises(NotFound):
        parse_uuid("nope")


def test_cursor_round_trip_and_rejects() -> None:
    for values in ([42], [-1], [2**63 - 1], [-(2**63)], [0, 2**62, -5]):
        assert decode_cursor(encode_cursor(values), size=len(values)) == values
    assert decode_cursor(None, size=1) is None and decode_cursor("", size=1) is None
    for raw in ("%%%", encode_cursor([1, 2]), "WyJ4IiwieSJd", "A" * 10, "A" * 12, "A" * 10 + "="):
        with pytest.raises(ValidationError):
            decode_cursor(raw, size=1)


def test_every_cursor_of_the_documented_shape_is_a_position() -> None:
    """The OpenAPI pattern is the whole rule: anything matching it decodes, anything else is refused."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    for size, length in ((1, 11), (3, 32)):
        pattern = re.compile(cursor_pattern(size))
        for i in range(200):
            raw = "".join(alphabet[(i * 7 + j * 13) % 64] for j in range(length))
            assert pattern.fullmatch(raw)
            assert len(decode_cursor(raw, size=size) or []) == size
        assert not pattern.fullmatch("A" * (length + 1)) and not pattern.fullmatch("A" * (length - 1))


def test_title_from_first_message() -> None:
    assert title_from("  hello \n world ") == "hello world"
    assert title_from("   ") == "New chat"
    long = "word " * 40
    title = title_from(long)
    assert len(title) <= 80 and title.endswith("…") and not title[:-1].endswith(" ")
