"""The SSE frames, byte for byte, and the decoder clients and tests use."""

from __future__ import annotations

import json

from minichat.sse import Decoder, encode_comment, encode_delta, encode_event, parse_sse


def test_delta_event_exact_bytes() -> None:
    assert encode_event(1, {"type": "delta", "delta": "Hello"}) == (
        b'id: 1\ndata: {"type":"delta","delta":"Hello"}\n\n'
    )


def test_usage_and_done_events_exact_bytes() -> None:
    usage = {"type": "usage", "inputTokens": 123, "outputTokens": 45, "estimated": False}
    assert encode_event(7, usage) == (
        b'id: 7\ndata: {"type":"usage","inputTokens":123,"outputTokens":45,"estimated":false}\n\n'
    )
    assert encode_event(12, {"type": "done", "status": "succeeded"}) == (
        b'id: 12\ndata: {"type":"done","status":"succeeded"}\n\n'
    )


def test_unicode_is_sent_as_utf8_not_escaped() -> None:
    frame = encode_event(2, {"type": "delta", "delta": "héllo 世界 🌍"})
    assert frame == 'id: 2\ndata: {"type":"delta","delta":"héllo 世界 🌍"}\n\n'.encode()
    assert b"\\u" not in frame


def test_newlines_in_a_delta_stay_inside_the_json_string() -> None:
    frame = encode_event(3, {"type": "delta", "delta": "line one\nline two\r\n\rend\t"})
    assert frame == b'id: 3\ndata: {"type":"delta","delta":"line one\\nline two\\r\\n\\rend\\t"}\n\n'
    # Exactly one data line: the only raw line breaks are the frame's own.
    assert frame.count(b"\n") == 3
    assert b"\r" not in frame


def test_quotes_and_backslashes_are_escaped() -> None:
    frame = encode_event(4, {"type": "delta", "delta": 'say "hi" \\ bye'})
    assert frame == b'id: 4\ndata: {"type":"delta","delta":"say \\"hi\\" \\\\ bye"}\n\n'


def test_line_separator_characters_are_not_line_breaks_in_sse() -> None:
    # U+2028/U+2029 and NEL are valid raw in JSON and are not SSE line terminators.
    text = "a\u2028b\u2029c\x85d"
    frame = encode_event(5, {"type": "delta", "delta": text})
    assert frame == ('id: 5\ndata: {"type":"delta","delta":"a\u2028b\u2029c\x85d"}\n\n').encode()
    assert json.loads(parse_sse(frame)[0][1])["delta"] == text


def test_lone_surrogate_falls_back_to_an_ascii_escape_losslessly() -> None:
    frame = encode_event(6, {"type": "delta", "delta": "é\ud800x"})
    assert frame == b'id: 6\ndata: {"type":"delta","delta":"\\u00e9\\ud800x"}\n\n'
    frame.decode("utf-8")  # valid UTF-8
    assert json.loads(parse_sse(frame)[0][1])["delta"] == "é\ud800x"


def test_comment_frames() -> None:
    assert encode_comment() == b": ping\n\n"
    assert encode_comment("keep-alive") == b": keep-alive\n\n"
    assert encode_comment("two\nlines") == b": two\n: lines\n\n"
    assert parse_sse(encode_comment("a\r\nb")) == []


def test_parse_round_trips_encoded_events_with_comments_between() -> None:
    body = (
        encode_event(1, {"type": "delta", "delta": "a\nb"})
        + encode_comment()
        + encode_event(2, {"type": "delta", "delta": "ü"})
        + encode_event(3, {"type": "done", "status": "succeeded"})
    )
    assert parse_sse(body) == [
        ("1", '{"type":"delta","delta":"a\\nb"}'),
        ("2", '{"type":"delta","delta":"ü"}'),
        ("3", '{"type":"done","status":"succeeded"}'),
    ]


def test_parse_handles_crlf_cr_multiline_data_and_missing_ids() -> None:
    text = "id: 1\r\ndata: first\r\ndata: second\r\n\r\ndata:no-space\r\rid:9\rdata:  two spaces\r\r"
    assert parse_sse(text) == [("1", "first\nsecond"), (None, "no-space"), ("9", " two spaces")]


def test_parse_follows_the_standard_on_edge_cases() -> None:
    text = (
        "\ufeffid: 1\n\n"  # BOM skipped; an id with no data dispatches nothing
        "event: ignored\ndata\n\n"  # a field with no colon: empty value, still an event
        "retry: 10\ndata: x\nid\n\n"  # "id" alone sets an empty id
        ": just a comment\n\n"
        "data: incomplete"  # no blank line after it: never dispatched
    )
    assert parse_sse(text) == [(None, ""), ("", "x")]
    assert parse_sse(text.encode()) == parse_sse(text)


def test_the_decoder_gives_the_same_events_however_the_body_is_split() -> None:
    text = (
        "\ufeffid: 1\r\ndata: first\r\ndata: second\r\n\r\n: comment\n\n"
        'data:{"a":1}\n\ndata: ü\r\rid:9\rdata:  x\r\n\r\ndata: tail'
    )
    body = text.encode()
    whole = Decoder().feed(body)
    assert [(i, d.decode()) for i, d in whole] == [
        (b"1", "first\nsecond"),
        (None, '{"a":1}'),
        (None, "ü"),
        (b"9", " x"),
    ]
    for cut in range(len(body) + 1):
        decoder = Decoder()
        assert decoder.feed(body[:cut]) + decoder.feed(body[cut:]) == whole, cut
    one_by_one = Decoder()
    assert [e for i in range(len(body)) for e in one_by_one.feed(body[i : i + 1])] == whole


def test_a_delta_frame_is_the_same_bytes_either_way() -> None:
    for text in ["Hello", "", "héllo 世界 🌍", 'a\nb\r"\\\t\x00', "é\ud800x", "\u2028", '{"type":"x"}']:
        assert encode_delta(9, text) == encode_event(9, {"type": "delta", "delta": text})
