"""The Amazon MQ event, byte for byte: decoding (minichat.usage), validation, and local mode's encoder."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pika.spec import BasicProperties

from minichat.usage import (
    InvalidMessage,
    MalformedEvent,
    MqMessage,
    decode_mq_event,
    parse_audit,
    parse_usage,
)
from minichat_local.consumer import Delivery, build_mq_event, java_date

EVENTS = Path(__file__).resolve().parents[1] / "events"

USAGE_BODIES = [
    b'{"eventId":"3f1c2b7e-5a9d-4c8e-9b1a-2d3e4f5a6b7c","userId":"0b5e7c1a-3f2d-4a6b-8c9d-1e2f3a4b5c6d",'
    b'"generationId":"a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d","model":"mock-echo","inputTokens":12,'
    b'"outputTokens":34,"estimated":false,"occurredAt":"2025-01-15T10:00:00Z"}',
    b'{"eventId":"4e2d3c8f-6b0e-4d9f-8c2b-3e4f5a6b7c8d","userId":"0b5e7c1a-3f2d-4a6b-8c9d-1e2f3a4b5c6d",'
    b'"generationId":"b2c3d4e5-f6a7-4b8c-9d0e-1f2a3b4c5d6e","model":"gpt-4o-mini","inputTokens":1000,'
    b'"outputTokens":250,"estimated":true,"occurredAt":"2025-01-15T23:59:59.999Z"}',
    b'{"eventId":"5f3e4d9a-7c1f-4e0a-9d3c-4f5a6b7c8d9e","userId":"0b5e7c1a-3f2d-4a6b-8c9d-1e2f3a4b5c6d",'
    b'"generationId":"c3d4e5f6-a7b8-4c9d-8e0f-2a3b4c5d6e7f","model":"mock-echo","inputTokens":7,'
    b'"outputTokens":8,"estimated":false,"occurredAt":"2025-01-16T01:30:00+02:00"}',
    b'{"eventId":"6a4f5e0b-8d2a-4f1b-8e4d-5a6b7c8d9e0f","userId":"7d8e9f0a-1b2c-4d3e-8f4a-5b6c7d8e9f0a",'
    b'"generationId":"d4e5f6a7-b8c9-4d0e-9f1a-3b4c5d6e7f80","model":"mock-slow","inputTokens":5,'
    b'"outputTokens":6,"estimated":false,"occurredAt":"2025-01-16T00:00:00Z"}',
]
AUDIT_BODIES = [
    b'{"eventId":"8c6b7a2d-0f4c-4b3d-9a6f-7c8d9e0f1a2b","userId":"0b5e7c1a-3f2d-4a6b-8c9d-1e2f3a4b5c6d",'
    b'"action":"user.login","metadata":{"ip":"203.0.113.7"},"occurredAt":"2025-01-15T09:59:00Z"}',
    b'{"eventId":"9d7c8b3e-1a5d-4c4e-8b7a-8d9e0f1a2b3c","userId":"0b5e7c1a-3f2d-4a6b-8c9d-1e2f3a4b5c6d",'
    b'"action":"chat.created","metadata":{"chatId":"e5f6a7b8-c9d0-4e1f-8a2b-4c5d6e7f8091",'
    b'"title":"Z\\u00fcrich trip \\u2708"},"occurredAt":"2025-01-15T09:59:30Z"}',
    b'{"eventId":"0e8d9c4f-2b6e-4d5f-9c8b-9e0f1a2b3c4d","userId":null,"action":"user.login_failed",'
    b'"metadata":{},"occurredAt":"2025-01-15T10:01:00.250000+00:00"}',
]

# Amazon's documented sample, unchanged (a text/plain message on another queue).
AWS_SAMPLE: dict[str, Any] = {
    "eventSource": "aws:rmq",
    "eventSourceArn": (
        "arn:aws:mq:us-west-2:112556298976:broker:pizzaBroker:b-9bcfa592-423a-4942-879d-eb284b418fc8"
    ),
    "rmqMessagesByQueue": {
        "pizzaQueue::/": [
            {
                "basicProperties": {
                    "contentType": "text/plain",
                    "contentEncoding": None,
                    "headers": {
                        "header1": {"bytes": [118, 97, 108, 117, 101, 49]},
                        "header2": {"bytes": [118, 97, 108, 117, 101, 50]},
                        "numberInHeader": 10,
                    },
                    "deliveryMode": 1,
                    "priority": 34,
                    "correlationId": None,
                    "replyTo": None,
                    "expiration": "60000",
                    "messageId": None,
                    "timestamp": "Jan 1, 1970, 12:33:41 AM",
                    "type": None,
                    "userId": "AIDACKCEVSQ6C2EXAMPLE",
                    "appId": None,
                    "clusterId": None,
                    "bodySize": 80,
                },
                "redelivered": False,
                "data": "eyJ0aW1lb3V0IjowLCJkYXRhIjoiQ1pybWYwR3c4T3Y0YnFMUXhENEUifQ==",
            }
        ]
    },
}


def load(name: str) -> dict[str, Any]:
    return dict(json.loads((EVENTS / name).read_text()))


def test_usage_sample_decodes_byte_for_byte() -> None:
    messages = decode_mq_event(load("amazon-mq-usage.json"))
    assert [m.body for m in messages] == USAGE_BODIES
    assert {(m.queue, m.vhost, m.error) for m in messages} == {("usage_event", "/", None)}
    assert [m.message_id for m in messages] == [json.loads(b)["eventId"] for b in USAGE_BODIES]
    assert [m.redelivered for m in messages] == [False, False, True, False]


def test_audit_sample_decodes_byte_for_byte() -> None:
    messages = decode_mq_event(load("amazon-mq-audit.json"))
    assert [m.body for m in messages] == AUDIT_BODIES
    assert {(m.queue, m.vhost) for m in messages} == {("audit_event", "/")}


def test_aws_documented_sample_decodes() -> None:
    (message,) = decode_mq_event(AWS_SAMPLE)
    assert message == MqMessage(
        queue="pizzaQueue",
        vhost="/",
        data="eyJ0aW1lb3V0IjowLCJkYXRhIjoiQ1pybWYwR3c4T3Y0YnFMUXhENEUifQ==",
        body=b'{"timeout":0,"data":"CZrmf0Gw8Ov4bqLQxD4E"}',
        message_id=None,
        redelivered=False,
    )


def test_usage_fields_are_typed_and_times_are_utc() -> None:
    events = [parse_usage(body) for body in USAGE_BODIES]
    assert events[0].event_id == uuid.UUID("3f1c2b7e-5a9d-4c8e-9b1a-2d3e4f5a6b7c")
    assert (events[1].input_tokens, events[1].output_tokens, events[1].estimated) == (1000, 250, True)
    assert events[1].occurred_at == datetime(2025, 1, 15, 23, 59, 59, 999000, tzinfo=UTC)
    # 01:30 at +02:00 is still the 15th in UTC: the day daily_usage uses.
    assert events[2].occurred_at == datetime(2025, 1, 15, 23, 30, tzinfo=UTC)


def test_audit_fields() -> None:
    login, chat, anonymous = (parse_audit(body) for body in AUDIT_BODIES)
    assert login.action == "user.login" and login.metadata == {"ip": "203.0.113.7"}
    assert chat.metadata["title"] == "Zürich trip ✈"
    assert anonymous.user_id is None
    assert anonymous.occurred_at == datetime(2025, 1, 15, 10, 1, 0, 250000, tzinfo=UTC)


@pytest.mark.parametrize(
    "event",
    [
        {},
        {"eventSource": "aws:sqs", "rmqMessagesByQueue": {}},
        {"eventSource": "aws:rmq"},
        {"eventSource": "aws:rmq", "rmqMessagesByQueue": []},
        {"eventSource": "aws:rmq", "rmqMessagesByQueue": {"usage_event::/": {}}},
    ],
)
def test_not_an_mq_event_is_refused_whole(event: dict[str, Any]) -> None:
    with pytest.raises(MalformedEvent):
        decode_mq_event(event)


def test_undecodable_entries_keep_their_reason_and_do_not_stop_the_rest() -> None:
    good = load("amazon-mq-usage.json")["rmqMessagesByQueue"]["usage_event::/"][0]
    event = {
        "eventSource": "aws:rmq",
        "rmqMessagesByQueue": {
            "usage_event::minichat": [
                {"basicProperties": {"messageId": "m1"}, "data": "not base64!"},
                {"basicProperties": {}},
                "just a string",
                {"data": "w6k="},  # valid base64 of non-JSON bytes: decoded here, refused by parse_usage
                good,
            ]
        },
    }
    messages = decode_mq_event(event)
    assert [m.error for m in messages] == [
        "data is not valid base64",
        "data is missing or not a string",
        "message entry is not an object",
        None,
        None,
    ]
    assert messages[0].message_id == "m1" and messages[0].data == "not base64!"
    assert messages[3].body == b"\xc3\xa9"
    assert messages[4].body == USAGE_BODIES[0] and messages[4].vhost == "minichat"


def _usage(**changes: Any) -> bytes:
    body = json.loads(USAGE_BODIES[0])
    for key, value in changes.items():
        if value is ...:
            del body[key]
        else:
            body[key] = value
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"\xff\xfe", "body is not UTF-8"),
        (b"{not json", "body is not valid JSON (JSONDecodeError)"),
        (b"[1, 2]", "body is not a JSON object"),
        (b'{"inputTokens": NaN}', "body is not valid JSON (NaN is not a JSON number)"),
        (_usage(eventId=...), "eventId is missing"),
        (_usage(eventId="not-a-uuid"), "eventId must be a UUID string"),
        (_usage(userId=None), "userId must be a UUID string"),
        (_usage(generationId=12), "generationId must be a UUID string"),
        (_usage(model=""), "model must be a string of 1 to 200 characters"),
        (_usage(model="a\x00b"), "model contains characters PostgreSQL cannot store"),
        (_usage(inputTokens="12"), "inputTokens must be an integer between 0 and 2147483647"),
        (_usage(inputTokens=True), "inputTokens must be an integer between 0 and 2147483647"),
        (_usage(outputTokens=-1), "outputTokens must be an integer between 0 and 2147483647"),
        (_usage(outputTokens=2**31), "outputTokens must be an integer between 0 and 2147483647"),
        (_usage(outputTokens=1.5), "outputTokens must be an integer between 0 and 2147483647"),
        (_usage(estimated="false"), "estimated must be true or false"),
        (_usage(occurredAt="yesterday"), "occurredAt must be an ISO-8601 time string"),
        (_usage(occurredAt="2025-01-15T10:00:00"), "occurredAt must carry a time zone (Z or an offset)"),
        (_usage(occurredAt=1736935200), "occurredAt must be an ISO-8601 time string"),
    ],
)
def test_invalid_usage_bodies_say_why(body: bytes, reason: str) -> None:
    with pytest.raises(InvalidMessage) as caught:
        parse_usage(body)
    assert str(caught.value) == reason


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    assert parse_usage(_usage(region="eu")).model == "mock-echo"


def _audit(**changes: Any) -> bytes:
    body = json.loads(AUDIT_BODIES[0])
    body.update(changes)
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (_audit(action="Login"), "action must look like 'noun.verb' (lowercase, dotted)"),
        (_audit(action=7), "action must be a string of 1 to 100 characters"),
        (_audit(metadata=[1]), "metadata must be an object"),
        (_audit(metadata={"a": "x\u0000y"}), "metadata contains characters PostgreSQL cannot store"),
        (_audit(metadata={"a\u0000": 1}), "metadata has a key PostgreSQL cannot store"),
        (_audit(metadata={"a": "\ud800"}), "metadata contains characters PostgreSQL cannot store"),
        (_audit(userId="nope"), "userId must be a UUID string"),
    ],
)
def test_invalid_audit_bodies_say_why(body: bytes, reason: str) -> None:
    with pytest.raises(InvalidMessage) as caught:
        parse_audit(body)
    assert str(caught.value) == reason


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (2021, "Jan 1, 1970, 12:33:41 AM"),  # the documented sample's timestamp
        (1736942400, "Jan 15, 2025, 12:00:00 PM"),
        (1736985599, "Jan 15, 2025, 11:59:59 PM"),
        (None, None),
    ],
)
def test_java_date_matches_the_event_source_mapping(seconds: int | None, text: str | None) -> None:
    assert java_date(seconds) == text


def test_local_events_have_amazons_shape_and_round_trip_byte_for_byte() -> None:
    properties = BasicProperties(
        content_type="text/plain",
        headers={"header1": "value1", "raw": b"\x00\xff", "numberInHeader": 10, "nested": {"k": "v"}},
        delivery_mode=1,
        priority=34,
        expiration="60000",
        timestamp=2021,
        user_id="AIDACKCEVSQ6C2EXAMPLE",
    )
    bodies = [b'{"timeout":0,"data":"CZrmf0Gw8Ov4bqLQxD4E"}', b"\xff\x00binary", USAGE_BODIES[0]]
    deliveries = [
        Delivery(
            queue="pizzaQueue", delivery_tag=1, redelivered=False, properties=properties, body=bodies[0]
        ),
        Delivery(
            queue="pizzaQueue", delivery_tag=2, redelivered=True, properties=BasicProperties(), body=bodies[1]
        ),
        Delivery(
            queue="usage_event",
            delivery_tag=3,
            redelivered=False,
            properties=BasicProperties(message_id="m-3", delivery_mode=2),
            body=bodies[2],
        ),
    ]
    event = build_mq_event(deliveries, vhost="/", event_source_arn=AWS_SAMPLE["eventSourceArn"])

    first = event["rmqMessagesByQueue"]["pizzaQueue::/"][0]
    expected = AWS_SAMPLE["rmqMessagesByQueue"]["pizzaQueue::/"][0]
    assert list(first["basicProperties"]) == list(expected["basicProperties"])  # same fields, same order
    assert first["basicProperties"]["headers"] == {
        "header1": {"bytes": [118, 97, 108, 117, 101, 49]},
        "raw": {"bytes": [0, 255]},
        "numberInHeader": 10,
        "nested": {"k": {"bytes": [118]}},
    }
    assert {k: v for k, v in first["basicProperties"].items() if k not in ("headers", "bodySize")} == {
        k: v for k, v in expected["basicProperties"].items() if k not in ("headers", "bodySize")
    }
    assert first["data"] == expected["data"]
    assert list(event) == ["eventSource", "eventSourceArn", "rmqMessagesByQueue"]
    assert list(event["rmqMessagesByQueue"]) == ["pizzaQueue::/", "usage_event::/"]

    decoded = decode_mq_event(json.loads(json.dumps(event)))  # through JSON, as Lambda would pass it
    assert [m.body for m in decoded] == bodies
    assert [(m.queue, m.redelivered, m.message_id) for m in decoded] == [
        ("pizzaQueue", False, None),
        ("pizzaQueue", True, None),
        ("usage_event", False, "m-3"),
    ]
