"""A stand-in for Amazon Bedrock ConverseStream, speaking AWS event-stream framing (tests, benchmarks).

MiniChat's provider and the real boto3 client talk to it through MINICHAT_BEDROCK_ENDPOINT_URL. Given
`secrets` (access key id → secret key), it checks each request's SigV4 signature as AWS does (botocore
recomputes it from the request as received) and answers 403 InvalidSignatureException /
UnrecognizedClientException otherwise; without, any credentials pass (the signature is only recorded).
`POST /model/{modelId}/converse-stream`
answers `application/vnd.amazon.eventstream`: messageStart, one contentBlockDelta per token,
contentBlockStop, messageStop (stopReason `max_tokens` when inferenceConfig.maxTokens cut the answer,
else `end_turn`) and metadata (usage). Every message is framed as Bedrock frames it: a prelude (total and
headers length, CRC32), the `:event-type` / `:content-type` / `:message-type` headers, a JSON payload and
the message CRC32.

The behaviour comes from the model id, as for the OpenAI stub (minichat_local.openai_stub.Behavior):
`stub-tokens-100-rate-50` (100 tokens at 50 tokens/s), `stub-stall-after-1` (one token, then nothing until
the client leaves; `-0`: nothing after messageStart), `stub-ttft-ms-2000`, a `:version` suffix ignored (as
in `anthropic.claude-v2:1`), `stub-error-429` (an HTTP error
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
import hmac
import json
import re
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
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
    "sigv4_error",
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


_AUTHORIZATION = re.compile(
    r"AWS4-HMAC-SHA256 Credential=(?P<key>[^/]+)/(?P<day>\d{8})/(?P<region>[^/]+)/(?P<service>[^/]+)/"
    r"aws4_request, SignedHeaders=(?P<signed>[a-z0-9;-]+), Signature=(?P<signature>[0-9a-f]{64})"
)


def sigv4_error(scope: Scope, body: bytes, secrets: Mapping[str, str]) -> str | None:
    """None if the request carries a valid SigV4 signature by one of `secrets`' keys, else the error code
    AWS would answer with. botocore recomputes the signature from the request as received: the raw path
    (a model id's `:` stays `%3A`), the signed headers, the body and the X-Amz-Date."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
    match = _AUTHORIZATION.fullmatch(headers.get("authorization", ""))
    if match is None:
        return "IncompleteSignatureException"
    key, signed = match["key"], match["signed"].split(";")
    if key not in secrets:
        return "UnrecognizedClientException"
    timestamp = headers.get("x-amz-date", "")
    if not timestamp.startswith(match["day"]) or "host" not in signed or "x-amz-date" not in signed:
        return "IncompleteSignatureException"
    path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
    query = scope.get("query_string", b"").decode("latin-1")
    request = AWSRequest(
        method=scope["method"],
        url=f"http://{headers.get('host', '')}{path}" + (f"?{query}" if query else ""),
        data=body,
        headers={name: headers.get(name, "") for name in signed if name != "host"},
    )
    request.context["timestamp"] = timestamp
    signer = SigV4Auth(
        Credentials(key, secrets[key], headers.get("x-amz-security-token")), match["service"], match["region"]
    )
    if signer.signed_headers(signer.headers_to_sign(request)) != match["signed"]:
        return "InvalidSignatureException"
    expected = signer.signature(signer.string_to_sign(request, signer.canonical_request(request)), request)
    return None if hmac.compare_digest(expected, match["signature"]) else "InvalidSignatureException"


@dataclass
class BedrockStubStats(StubStats):
    """The OpenAI stub's counters, plus the model id of the last request (it travels in the path) and
    the signatures checked."""

    last_model: str = ""
    signatures_checked: int = 0
    signature_errors: list[str] = field(default_factory=list)


class BedrockStub:
    """The ASGI app: `POST /model/{modelId}/converse-stream`.

    `fail_next`: HTTP statuses to answer the next requests with, one each, before the model's behaviour
    (a throttled first attempt, then an answer)."""

    def __init__(self, behavior: Behavior | None = None, *, secrets: Mapping[str, str] | None = None) -> None:
        self.behavior = behavior or Behavior()
        self.secrets = dict(secrets) if secrets else None
        self.fail_next: list[int] = []
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
        body = await read_body(receive)
        if self.secrets is not None:
            self.stats.signatures_checked += 1
            refused = sigv4_error(scope, body, self.secrets)
            if refused is not None:
                self.stats.requests += 1
                self.stats.signature_errors.append(refused)
                await _error(send, 403, refused, f"{ERROR_BODY_MARKER}: the signature does not match")
                return
        try:
            request = json.loads(body)
            behavior = self.behavior.for_model(model.partition(":")[0])
        except ValueError as exc:
            await _error(send, 400, "ValidationException", f"{ERROR_BODY_MARKER}: {exc}")
            return

        self.stats.record(scope, request)
        self.stats.last_model = model
        if self.fail_next:
            status = self.fail_next.pop(0)
            kind = ERROR_TYPES.get(status, "InternalServerException")
            await _error(send, status, kind, f"{ERROR_BODY_MARKER}: scripted {kind} for {model}")
            return
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
