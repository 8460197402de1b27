"""The streaming function: GET /api/generations/{id}/stream as Server-Sent Events.

An ASGI app. On AWS it runs under uvicorn behind the Lambda Web Adapter in response-stream mode (run.sh);
in local mode the same app is mounted on the one origin.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import time
from collections.abc import AsyncIterator
from typing import Any

from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from minichat import accounts, auth, limits
from minichat.config import get_settings
from minichat.errors import InvalidToken, MethodNotAllowed, MiniChatError, NotFound, RateLimited
from minichat.log import accept_request_id, bind_request_id, get_logger, setup_logging
from minichat.streaming import Engine
from minichat.validate import parse_uuid

setup_logging(get_settings().log_level)
log = get_logger("minichat.stream")
_STREAM_PATH = re.compile(r"^/api/generations/[^/]+/stream/?$")
_STREAM_GET = re.compile(r"^/api/generations/([^/]+)/stream$")
_SLOT_RETRY_AFTER_S = 5  # a user's connections come and go: try again soon
_RENEW_SLOT_S = limits.STREAM_LEASE_MS / 3000  # pings come every 15 s at least, so leases never lapse
_releases: set[asyncio.Task[None]] = set()


def _error(error: MiniChatError, request_id: str) -> JSONResponse:
    return JSONResponse(
        error.envelope(request_id),
        status_code=error.status,
        headers={"X-Request-Id": request_id, **error.headers()},
    )


def _last_event_id(request: Request) -> int:
    raw = request.headers.get("last-event-id") or request.query_params.get("lastEventId") or "0"
    return int(raw) if raw.isdigit() and len(raw) < 10 else 0


def _request_id(incoming: str | None) -> str:
    # A new id the way accept_request_id makes one (32 hex digits), but without uuid4's os.urandom: that
    # call releases the GIL, and in a burst of streams taking it back from the API's and the database's
    # threads stalls the event loop (docs/architecture.md). A request id must be unique, not secret.
    if incoming:
        return accept_request_id(incoming)
    return f"{random.getrandbits(128):032x}"


async def stream(request: Request) -> Response:
    request_id = _request_id(request.headers.get("x-request-id"))
    bind_request_id(request_id)
    engine: Engine = request.app.state.engine
    try:
        generation_id = parse_uuid(request.path_params["generation_id"])
        ticket = request.query_params.get("ticket")
        if ticket:
            user_id = auth.verify_stream_ticket(ticket, generation_id=generation_id).user_id
        else:
            user_id = auth.authenticate(request.headers.get("authorization")).user_id
        slot = await _take_slot(engine, user_id)
    except MiniChatError as error:
        return _error(error, request_id)
    try:
        opened = await engine.open(generation_id=generation_id, user_id=user_id)
        if ticket:
            auth.check_stream_ticket_grace(opened.row["finished_at"])
    except MiniChatError as error:
        _give_back(engine, user_id, slot)
        return _error(error, request_id)

    return _EventStream(
        engine.frames(opened, after=_last_event_id(request)),
        engine=engine,
        user_id=user_id,
        slot=slot,
        generation_id=generation_id,
        headers={
            "Cache-Control": "no-cache, no-transform",
            "X-Accel-Buffering": "no",  # proxies must not hold frames back
            "X-Request-Id": request_id,
        },
    )


class _EventStream(StreamingResponse):
    """The SSE response: each chunk of frames goes straight to the server's `send`.

    Starlette's StreamingResponse runs the body in a task group beside a disconnect listener and each
    chunk passes through the middleware's send wrappers; here the body runs in the request's own task
    and a small watcher cancels it when the client goes away (the frames' generator then ends, and the
    user's stream slot is given back).
    """

    def __init__(
        self,
        frames: AsyncIterator[bytes],
        *,
        engine: Engine,
        user_id: str,
        slot: str | None,
        generation_id: str,
        headers: dict[str, str],
    ) -> None:
        super().__init__(frames, media_type="text/event-stream", headers=headers)
        self._frames = frames
        self._engine = engine
        self._user_id = user_id
        self._slot = slot
        self._generation_id = generation_id

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        task = asyncio.current_task()
        assert task is not None
        gone = False

        async def watch() -> None:
            nonlocal gone
            while (await receive())["type"] != "http.disconnect":
                pass
            gone = True
            task.cancel()

        watcher = asyncio.get_running_loop().create_task(watch())
        slot, renewed = self._slot, time.monotonic()
        try:
            start = {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            await send(start)
            try:
                async for chunk in self._frames:
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    if slot and time.monotonic() - renewed >= _RENEW_SLOT_S:
                        renewed = time.monotonic()
                        with contextlib.suppress(RedisError, OSError):
                            await limits.renew_stream_async(
                                self._engine.commands, user_id=self._user_id, connection_id=slot
                            )
            except MiniChatError as error:  # headers are gone: the contract's error event, then stop
                log.warning("stream interrupted", generation_id=self._generation_id, code=error.code)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not gone:
                raise
            task.uncancel()  # the client left: nothing more to send, and nobody to tell
        finally:
            watcher.cancel()
            close = getattr(self._frames, "aclose", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()
            _give_back(self._engine, self._user_id, slot)


async def _take_slot(engine: Engine, user_id: str) -> str | None:
    """One of the user's stream connections (SPEC §7.4: at most `max_streams_per_user` at once), or
    RateLimited; InvalidToken once the account is deleted. None: Redis is down, the connection is not
    counted (streams of generations already running keep working through a Redis outage)."""
    slot = f"{random.getrandbits(128):032x}"  # unique, not secret (see _request_id)
    try:
        taken = await limits.open_stream_async(
            engine.commands,
            user_id=user_id,
            connection_id=slot,
            limit=get_settings().max_streams_per_user,
            unless_exists=accounts.deleted_key(user_id),
        )
    except (RedisError, OSError) as exc:
        log.warning("stream connections not counted: redis unavailable", error=type(exc).__name__)
        return None
    if taken == -1:
        raise InvalidToken("This account no longer exists.")
    if taken == 0:
        raise RateLimited(_SLOT_RETRY_AFTER_S, "Too many open streams; close one or retry shortly.")
    return slot


def _give_back(engine: Engine, user_id: str, slot: str | None) -> None:
    """Release the slot in a task of its own: the connection's task may be cancelled already (the client
    went away), and it must not wait for Redis anyway."""
    if slot is None:
        return

    async def release() -> None:
        with contextlib.suppress(RedisError, OSError):
            await limits.close_stream_async(engine.commands, user_id=user_id, connection_id=slot)

    try:
        task = asyncio.get_running_loop().create_task(release())
    except RuntimeError:  # finalized with no loop left (shutdown): the lease ends on its own
        return
    _releases.add(task)
    task.add_done_callback(_releases.discard)


async def ready(request: Request) -> Response:
    """The Lambda Web Adapter's readiness check (AWS_LWA_READINESS_CHECK_PATH)."""
    return JSONResponse({"status": "ok"})


async def not_found(request: Request) -> Response:
    request_id = accept_request_id(request.headers.get("x-request-id"))
    if request.method != "GET" and _STREAM_PATH.match(request.url.path):
        return _error(MethodNotAllowed("GET"), request_id)  # the stream exists; only GET opens it
    return _error(NotFound("No such route."), request_id)


class _App(Starlette):
    """The stream function's app: a GET of a stream goes straight to its handler, without the
    middleware stack (whose send wrappers every frame would pass through); all else is Starlette's."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "GET" and not scope.get("root_path"):
            match = _STREAM_GET.match(scope["path"])
            if match is not None:
                scope["app"] = self
                scope["path_params"] = {"generation_id": match.group(1)}
                try:
                    response = await stream(Request(scope, receive))
                except Exception:
                    # As Starlette's ServerErrorMiddleware answers an error before the response started.
                    await PlainTextResponse("Internal Server Error", status_code=500)(scope, receive, send)
                    raise
                await response(scope, receive, send)
                return
        await super().__call__(scope, receive, send)


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
    engine = Engine(get_settings())
    await engine.start()
    app.state.engine = engine
    try:
        yield {}
    finally:
        await engine.close()


app = _App(
    routes=[
        Route("/api/generations/{generation_id}/stream", stream, methods=["GET"]),
        Route("/_ready", ready, methods=["GET"]),
        Route("/{path:path}", not_found, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
    ],
    lifespan=lifespan,
)
