"""ASGI → API Gateway (REST, payload 1.0) → the Chalice app, in a few worker threads."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import json
import queue
import re
import threading
from collections.abc import Callable
from typing import Any

from chalice.app import Chalice
from chalice.config import Config
from chalice.local import (
    CustomLocalChalice,
    LambdaContext,
    LocalChalice,
    LocalGateway,
    LocalGatewayException,
)

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
        self._gateway = _Gateway(chalice_app, Config(chalice_stage="local", config_from_disk={}))
        # A few threads, enough to overlap one request's database and Redis waits with another's work:
        # the requests share one GIL (and the event loop's), so more threads only make a burst of
        # requests share it too, all finishing late together instead of one after the other: with 4
        # rather than 32, the first streams of a burst of creates start sooner (bench/bench_stream.py, TTFT
        # p50; docs/architecture.md), at the same throughput. The threads stay: anyio's ended
        # after 10 s idle, and a burst started them again on the event loop, in front of running streams.
        self._executor = _Threads(threads, "minichat-api")
        self._cancels = _Threads(2, "minichat-api-cancel")

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
        client = scope.get("client")
        context.run(_source_ip.set, client[0] if client else None)
        threads = self._cancels if _CANCEL_ROUTE.match(scope["path"]) else self._executor
        response = await threads.run(context.run, self._handle, scope["method"], path, headers, body or None)
        if response is None:
            await _send_error(send, NotFound("No such route."), headers)
            return
        await _send_lambda_response(send, response)

    def _handle(self, method: str, path: str, headers: dict[str, str], body: bytes | None) -> Any:
        try:
            return self._gateway.handle_request(method=method, path=path, headers=headers, body=body)
        except LocalGatewayException:
            return None  # API Gateway's "Missing Authentication Token": no such resource


# The connection's peer address: API Gateway puts the client's address in the event's
# requestContext.identity.sourceIp, where chalice.local writes a constant.
_source_ip: contextvars.ContextVar[str | None] = contextvars.ContextVar("minichat_source_ip", default=None)


class _Gateway(LocalGateway):
    """chalice.local's gateway, with the Lambda context's settings looked up once, not per request (the
    config lookups cost more than building the event), and the real peer address as `sourceIp`."""

    def _generate_lambda_event(
        self, method: str, path: str, headers: dict[str, str], body: bytes | None
    ) -> dict[str, Any]:
        event: dict[str, Any] = super()._generate_lambda_event(method, path, headers, body)
        source_ip = _source_ip.get()
        if source_ip:
            event["requestContext"]["identity"]["sourceIp"] = source_ip
        return event

    def __init__(self, app: Chalice, config: Config) -> None:
        super().__init__(app, config)
        timeout = config.lambda_timeout
        self._function_name = config.function_name
        self._memory_size = config.lambda_memory_size
        self._max_runtime_ms = (self.MAX_LAMBDA_EXECUTION_TIME if timeout is None else timeout) * 1000

    def _generate_lambda_context(self) -> LambdaContext:
        return LambdaContext(
            function_name=self._function_name,
            memory_size=self._memory_size,
            max_runtime_ms=self._max_runtime_ms,
        )


class _Threads:
    """Threads that run blocking calls for the event loop: a queue in, call_soon_threadsafe out.

    What loop.run_in_executor does, without a concurrent.futures Future (a Condition, a lock and chained
    callbacks) for every call. The threads start at once and stay.
    """

    def __init__(self, count: int, name: str) -> None:
        self._calls: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        for i in range(count):
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True).start()

    def run(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._calls.put((loop, future, fn, args))
        return future

    def _work(self) -> None:
        while True:
            loop, future, fn, args = self._calls.get()
            try:
                outcome = (True, fn(*args))
            except BaseException as exc:  # handed to the awaiting request, as run_in_executor does
                outcome = (False, exc)
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody awaits this
                loop.call_soon_threadsafe(_settle, future, outcome)


def _settle(future: asyncio.Future[Any], outcome: tuple[bool, Any]) -> None:
    if future.cancelled():
        return
    ok, value = outcome
    if ok:
        future.set_result(value)
    else:
        future.set_exception(value)


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
