"""ASGI → API Gateway (REST, payload 1.0) → the Chalice app, in a few worker threads."""

from __future__ import annotations

import asyncio
import base64
import contextvars
import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from chalice.app import Chalice
from chalice.config import Config
from chalice.local import CustomLocalChalice, LocalChalice, LocalGateway, LocalGatewayException

from minichat.errors import MiniChatError, NotFound, PayloadTooLarge
from minichat.log import accept_request_id
from minichat.validate import MAX_BODY_BYTES

__all__ = ["ChaliceBridge"]

Scope = dict[str, Any]

# Cancels have their own threads: the SPEC gives a cancel 250 ms, and with a few shared threads it would
# wait behind whatever burst of requests came first (100 creates take a few hundred ms).
_CANCEL_ROUTE = re.compile(r"^/api/generations/[^/]+/cancel/?$")


class ChaliceBridge:
    """Serves every REST route through Chalice exactly as API Gateway would invoke it."""

    def __init__(self, chalice_app: Chalice, *, threads: int = 4) -> None:
        # Chalice keeps `current_request` on the app object; its local mode makes that attribute
        # thread-local, which is what lets requests run side by side in worker threads.
        if not isinstance(chalice_app, LocalChalice):
            CustomLocalChalice.__bases__ = (LocalChalice, chalice_app.__class__)
            chalice_app.__class__ = CustomLocalChalice
        self._gateway = LocalGateway(chalice_app, Config(chalice_stage="local", config_from_disk={}))
        # A few threads, enough to overlap one request's database and Redis waits with another's work:
        # the requests share one GIL (and the event loop's), so more threads only make a burst of
        # requests share it too, all finishing late together instead of one after the other. With 4
        # rather than 32, a burst of 100 generation creates let the first streams start ~200 ms sooner
        # (bench/bench_stream.py, TTFT p50), at the same throughput. The threads stay: anyio's ended
        # after 10 s idle, and a burst started them again on the event loop, in front of running streams.
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="minichat-api")
        self._cancels = ThreadPoolExecutor(max_workers=2, thread_name_prefix="minichat-api-cancel")

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        headers: dict[str, str] = {}
        for raw_name, raw_value in scope["headers"]:
            name = raw_name.decode("latin-1").lower()
            value = raw_value.decode("latin-1")
            headers[name] = f"{headers[name]},{value}" if name in headers else value
        if any(c in scope["path"] for c in "\t\r\n"):
            # chalice.local matches routes with urllib.parse, which drops these characters: `{id}%0A`
            # would be `{id}`. API Gateway matches the path as it is, so no route matches.
            await _send_error(send, NotFound("No such route."), headers)
            return
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
            await _send_error(send, PayloadTooLarge(), headers)
            return
        body = await _read_body(receive)
        if body is None:
            await _send_error(send, PayloadTooLarge(), headers)
            return
        path = scope["path"]
        if scope.get("query_string"):
            path += "?" + scope["query_string"].decode("latin-1")
        # A copy of the context, as anyio.to_thread gives: a request's context variables (request id, rate
        # headers) never leak into the next request the same thread serves.
        context = contextvars.copy_context()
        executor = self._cancels if _CANCEL_ROUTE.match(scope["path"]) else self._executor
        response = await asyncio.get_running_loop().run_in_executor(
            executor, context.run, self._handle, scope["method"], path, headers, body or None
        )
        if response is None:
            await _send_error(send, NotFound("No such route."), headers)
            return
        await _send_lambda_response(send, response)

    def _handle(self, method: str, path: str, headers: dict[str, str], body: bytes | None) -> Any:
        try:
            return self._gateway.handle_request(method=method, path=path, headers=headers, body=body)
        except LocalGatewayException:
            return None  # API Gateway's "Missing Authentication Token": no such resource


async def _read_body(receive: Any) -> bytes | None:
    """The request body, or None once it passes the limit (it is never buffered beyond it)."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def _send_lambda_response(send: Any, response: dict[str, Any]) -> None:
    body = response.get("body") or b""
    if isinstance(body, str):
        body = base64.b64decode(body) if response.get("isBase64Encoded") else body.encode()
    out: list[tuple[bytes, bytes]] = []
    for name, value in (response.get("headers") or {}).items():
        out.append((name.lower().encode("latin-1"), str(value).encode("latin-1")))
    for name, values in (response.get("multiValueHeaders") or {}).items():
        out.extend((name.lower().encode("latin-1"), str(v).encode("latin-1")) for v in values)
    out.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": int(response["statusCode"]), "headers": out})
    await send({"type": "http.response.body", "body": body})


async def _send_error(send: Any, error: MiniChatError, headers: dict[str, str]) -> None:
    """Errors answered before Chalice is reached, in the same envelope and with a request id."""
    request_id = accept_request_id(headers.get("x-request-id"))
    body = json.dumps(error.envelope(request_id)).encode()
    await _send_lambda_response(
        send,
        {
            "statusCode": error.status,
            "headers": {"Content-Type": "application/json", "X-Request-Id": request_id, **error.headers()},
            "body": body.decode(),
        },
    )
