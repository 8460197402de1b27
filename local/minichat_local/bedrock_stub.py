"""A stand-in for Amazon Bedrock ConverseStream, speaking AWS event-stream framing (tests, benchmarks).

The real boto3 client talks to it through MINICHAT_BEDROCK_ENDPOINT_URL (any credentials: the stand-in
does not check SigV4, it only records that a signature came). `POST /model/{modelId}/converse-stream`
answers `application/vnd.amazon.eventstream`: messageStart, one contentBlockDelta per token,
contentBlockStop, messageStop (stopReason `max_tokens` when inferenceConfig.maxTokens cut the answer,
else `end_turn`) and metadata (usage). Every message is framed as Bedrock frames it: a prelude (total and
headers length, CRC32), the `:event-type` / `:content-type` / `:message-type` headers, a JSON payload and
the message CRC32.

The behaviour comes from the model id, as for the OpenAI stub (minichat_local.openai_stub.Behavior):
`stub-tokens-100-rate-50` (100 tokens at 50 tokens/s), `stub-stall-after-1` (one token, then nothing until
the client leaves; `-0`: nothing after messageStart), `stub-ttft-ms-2000`, `stub-error-429` (an HTTP error
with `x-amzn-ErrorType`: 429 ThrottlingException, 503 ServiceUnavailableException, 408
ModelTimeoutException, 400 ValidationException, 403 AccessDeniedException, ...), `stub-fail-after-3` (an
in-stream `modelStreamErrorException`), `stub-drop-after-3` (cut the connection).

    with serve_stub(BedrockStub(), path="") as endpoint_url:   # "http://127.0.0.1:<port>"
        ...

    python -m minichat_local.bedrock_stub --port 8101 --tokens 100 --rate 50
"""

from __future__ import annotations

import asyncio
import binascii
import json
import struct
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from minichat_local.openai_stub import (
    ERROR_BODY_MARKER,
    Behavior,
    Receive,
    Scope,
    ScriptedFailure,
    Send,
    StubStats,
    read_body,
    scripted_tokens,
    serve_cli,
    stub_token,
)

__all__ = [
    "ERROR_TYPES",
    "BedrockStub",
    "BedrockStubStats",
    "encode_message",
    "main",
    "prompt_tokens",
]

# HTTP status → the error type Bedrock names in `x-amzn-ErrorType`.
ERROR_TYPES = {
    400: "ValidationException",
    403: "AccessDeniedException",
    404: "ResourceNotFoundException",
    408: "ModelTimeoutException",
    424: "ModelErrorException",
    429: "ThrottlingException",
    500: "InternalServerException",
    503: "ServiceUnavailableException",
}
_HEADER_STRING = 7


def encode_message(headers: dict[str, str], payload: bytes) -> bytes:
    """One event-stream message: prelude + prelude CRC, string headers, payload, message CRC."""
    head = b"".join(
        struct.pack("!B", len(name))
        + name.encode()
        + struct.pack("!BH", _HEADER_STRING, len(value))
        + value.encode()
        for name, value in headers.items()
    )
    total = 12 + len(head) + len(payload) + 4
    prelude = struct.pack("!II", total, len(head))
    prelude += struct.pack("!I", binascii.crc32(prelude))
    body = prelude + head + payload
    return body + struct.pack("!I", binascii.crc32(body))


def _event(event_type: str, payload: dict[str, Any]) -> bytes:
    body = json.dumps(payload, separators=(",", ":")).encode()
    return encode_message(
        {":event-type": event_type, ":content-type": "application/json", ":message-type": "event"}, body
    )


def _exception(exception_type: str, message: str) -> bytes:
    body = json.dumps({"message": message}).encode()
    return encode_message(
        {
            ":exception-type": exception_type,
            ":content-type": "application/json",
            ":message-type": "exception",
        },
        body,
    )


def prompt_tokens(request: dict[str, Any]) -> int:
    """The inputTokens the stand-in reports: four characters a token, four per message (system included)."""
    texts = [b.get("text", "") for b in request.get("system") or []]
    texts += [b.get("text", "") for m in request.get("messages") or [] for b in m.get("content") or []]
    return sum(-(-len(text) // 4) + 4 for text in texts)


@dataclass
class BedrockStubStats(StubStats):
    """The OpenAI stub's counters, plus the model id of the last request (it travels in the path)."""

    last_model: str = ""


class BedrockStub:
    """The ASGI app: `POST /model/{modelId}/converse-stream`."""

    def __init__(self, behavior: Behavior | None = None) -> None:
        self.behavior = behavior or Behavior()
        self.stats = BedrockStubStats()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        if (
            scope["method"] != "POST"
            or not path.startswith("/model/")
            or not path.endswith("/converse-stream")
        ):
            await _error(send, 404, "UnknownOperationException", "no such operation")
            return
        model = unquote(path[len("/model/") : -len("/converse-stream")])
        try:
            request = json.loads(await read_body(receive))
            behavior = self.behavior.for_model(model)
        except ValueError as exc:
            await _error(send, 400, "ValidationException", f"{ERROR_BODY_MARKER}: {exc}")
            return

        self.stats.record(scope, request)
        self.stats.last_model = model
        if behavior.error is not None:
            kind = ERROR_TYPES.get(behavior.error, "InternalServerException")
            await _error(send, behavior.error, kind, f"{ERROR_BODY_MARKER}: scripted {kind} for {model}")
            return

        await self.stats.follow(receive, lambda gone: _stream(send, gone, request=request, behavior=behavior))


async def _stream(send: Send, gone: asyncio.Event, *, request: dict[str, Any], behavior: Behavior) -> bool:
    """Send the events; True when the stream reached metadata."""
    limit = (request.get("inferenceConfig") or {}).get("maxTokens")
    count = behavior.tokens if not isinstance(limit, int) else min(behavior.tokens, limit)
    stop_reason = "max_tokens" if count < behavior.tokens else "end_turn"
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/vnd.amazon.eventstream"),
                (b"x-amzn-requestid", b"00000000-0000-0000-0000-000000000000"),
            ],
        }
    )

    async def frame(data: bytes, *, more: bool = True) -> None:
        await send({"type": "http.response.body", "body": data, "more_body": more})

    started = time.monotonic()
    await frame(_event("messageStart", {"role": "assistant"}))
    sent = 0
    try:
        async for index in scripted_tokens(behavior, count, gone):
            await frame(
                _event("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": stub_token(index)}})
            )
            sent += 1
    except ScriptedFailure:
        failure = _exception("modelStreamErrorException", f"{ERROR_BODY_MARKER}: scripted failure")
        await frame(failure, more=False)
        return False
    if sent < count or gone.is_set():
        return False
    input_tokens = prompt_tokens(request)
    await frame(
        _event("contentBlockStop", {"contentBlockIndex": 0})
        + _event("messageStop", {"stopReason": stop_reason})
        + _event(
            "metadata",
            {
                "usage": {
                    "inputTokens": input_tokens,
                    "outputTokens": count,
                    "totalTokens": input_tokens + count,
                },
                "metrics": {"latencyMs": int((time.monotonic() - started) * 1000)},
            },
        ),
        more=False,
    )
    return True


async def _error(send: Send, status: int, kind: str, message: str) -> None:
    body = json.dumps({"message": message}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (
                    b"x-amzn-errortype",
                    f"{kind}:http://internal.amazon.com/coral/com.amazon.bedrock/".encode(),
                ),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def main(argv: list[str] | None = None) -> None:
    """`python -m minichat_local.bedrock_stub`: serve the stand-in until Ctrl-C."""
    # AWS endpoints keep an idle connection open about a minute, uvicorn 5 s by default: a client that
    # reuses one as it is closed sees ConnectionClosedError, which Bedrock itself would not cause.
    serve_cli(argv, prog="minichat_local.bedrock_stub", port=8101, make_app=BedrockStub, keep_alive_s=60)


if __name__ == "__main__":
    main()
