"""An OpenAI-compatible streaming chat server with scripted behaviour, for tests and benchmarks.

The behaviour comes from the server's default, overridden per request by a model name such as
`stub-tokens-100-rate-50` (100 tokens at 50 tokens/s), `stub-error-500`, `stub-stall-after-1`,
`stub-ttft-ms-2000`, `stub-drop-after-3` (cut the connection), `stub-fail-after-3` (an in-stream error
object), `stub-linger-ms-3000`, `stub-usage-inline-1-crlf-1`, and hostile output: `stub-nul-at-2` (token 2
carries a NUL), `stub-surrogate-at-4` (token 4 carries a lone surrogate, as the JSON escape \ud800),
`stub-tokens-250-token-chars-1000` (tokens padded to 1,000 characters); the keys are the fields of
Behavior. Any other model name gets the default behaviour. One server thus serves every scenario.

    with serve_stub(OpenAIStub()) as base_url:   # "http://127.0.0.1:<port>/v1"
        ...

    python -m minichat_local.openai_stub --port 8100 --tokens 200 --rate 50
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, fields, replace
from typing import Any

import uvicorn

__all__ = [
    "ERROR_BODY_MARKER",
    "Behavior",
    "OpenAIStub",
    "ScriptedFailure",
    "StubStats",
    "add_behavior_options",
    "behavior_from_args",
    "main",
    "prompt_tokens",
    "read_body",
    "scripted_tokens",
    "serve_cli",
    "serve_stub",
    "stub_text",
    "stub_token",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

# Marker placed in every error body so tests can prove a body never reaches a client-facing message.
ERROR_BODY_MARKER = "stub-upstream-error-body"

_KEY_VALUE = re.compile(r"-([a-z]+(?:-[a-z]+)*)-(\d+(?:\.\d+)?)")
_MODEL_KEYS = {
    "tokens": "tokens",
    "rate": "rate",
    "ttft-ms": "ttft_ms",
    "error": "error",
    "stall-after": "stall_after",
    "drop-after": "drop_after",
    "fail-after": "fail_after",
    "linger-ms": "linger_ms",
    "usage-inline": "usage_inline",
    "crlf": "crlf",
    "nul-at": "nul_at",
    "surrogate-at": "surrogate_at",
    "token-chars": "token_chars",
}
_FLOAT_KEYS = ("rate", "ttft_ms", "linger_ms")
# Unpaced streams hand the loop over now and then, or one long stream would starve all the others
# (uvicorn's send only awaits when the socket buffer is full).
_YIELD_EVERY = 16
_ROLE_CHOICE = (
    '{"index":0,"delta":{"role":"assistant","content":"","refusal":null},'
    '"logprobs":null,"finish_reason":null}'
)


@dataclass(frozen=True)
class Behavior:
    """What the stub does with one request."""

    tokens: int = 20
    rate: float = 0.0  # tokens per second; 0 sends as fast as the socket takes them
    ttft_ms: float = 0.0  # wait before the first content token
    error: int | None = None  # answer this HTTP status with an error body instead of a stream
    stall_after: int | None = None  # after this many tokens send nothing until the client leaves
    drop_after: int | None = None  # after this many tokens cut the connection (no usage, no [DONE])
    fail_after: int | None = None  # after this many tokens send an in-stream {"error": ...} object
    linger_ms: float = 0.0  # keep the body open this long after [DONE]
    usage_inline: int = 0  # 1: usage on the last choice chunk (as some compatible servers do)
    crlf: int = 0  # 1: CRLF line ends
    nul_at: int | None = None  # this token ends with a NUL character
    surrogate_at: int | None = None  # this token ends with a lone surrogate (sent as the escape \ud800)
    token_chars: int = 0  # pad every token with "x" to this many characters

    def token(self, index: int) -> str:
        """The text token `index` carries (as a client's JSON parser reads it)."""
        text = stub_token(index)
        if len(text) < self.token_chars:
            text += "x" * (self.token_chars - len(text))
        if index == self.nul_at:
            text += "\x00"
        if index == self.surrogate_at:
            text += "\ud800"
        return text

    def text(self, tokens: int) -> str:
        """The exact text a stream of `tokens` tokens with this behaviour carries."""
        return "".join(self.token(i) for i in range(tokens))

    def for_model(self, model: str) -> Behavior:
        """This behaviour overridden by a `stub-key-value-...` model name; ValueError if it is malformed."""
        if not model.startswith("stub"):
            return self
        rest = model[4:]
        changes: dict[str, Any] = {}
        end = 0
        for match in _KEY_VALUE.finditer(rest):
            if match.start() != end or match.group(1) not in _MODEL_KEYS:
                break
            name = _MODEL_KEYS[match.group(1)]
            value = float(match.group(2))
            changes[name] = value if name in _FLOAT_KEYS else int(value)
            end = match.end()
        if end != len(rest):
            raise ValueError(f"unknown stub model {model!r}; keys: {', '.join(_MODEL_KEYS)}")
        return replace(self, **changes)


@dataclass
class StubStats:
    """Counters for assertions and benchmarks; written only by the server's loop."""

    requests: int = 0
    completed: int = 0  # streams that reached [DONE]
    disconnected: int = 0  # streams whose client left before the end
    active: int = 0
    max_active: int = 0
    last_request: dict[str, Any] = field(default_factory=dict)
    last_authorization: str | None = None
    clients: set[tuple[str, int]] = field(default_factory=set)  # distinct client sockets: pool reuse
    disconnect_times: list[float] = field(default_factory=list)  # time.monotonic() when each was seen

    @property
    def connections(self) -> int:
        """How many distinct TCP connections the requests came over."""
        return len(self.clients)

    def disconnects_after(self, moment: float) -> list[float]:
        """Seconds from `moment` (time.monotonic()) to each disconnect seen since."""
        return [t - moment for t in self.disconnect_times if t >= moment]

    def record(self, scope: Scope, request: dict[str, Any]) -> None:
        """Count a request that reached the model."""
        self.requests += 1
        self.last_request = request
        if scope.get("client"):
            self.clients.add(tuple(scope["client"]))
        authorization = dict(scope["headers"]).get(b"authorization")
        self.last_authorization = authorization.decode() if authorization else None

    async def follow(self, receive: Receive, send_stream: Callable[[asyncio.Event], Awaitable[bool]]) -> None:
        """Count a stream while `send_stream(gone)` sends it (True: it reached its end); `gone` is set
        when the client leaves."""
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        gone = asyncio.Event()
        watcher = asyncio.create_task(_watch_disconnect(receive, gone, self))
        try:
            finished = await send_stream(gone)
        finally:
            watcher.cancel()
            self.active -= 1
        if finished:
            self.completed += 1
        elif gone.is_set():
            self.disconnected += 1


def stub_text(tokens: int) -> str:
    """The exact text a stream of `tokens` tokens carries: "w0 w1 w2 ..."."""
    return "".join(stub_token(i) for i in range(tokens))


def stub_token(index: int) -> str:
    """Token `index` of a stub stream."""
    return f" w{index}" if index else "w0"


def prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """The prompt_tokens the stub reports for `messages` (four characters a token, four per message)."""
    return sum(-(-len(str(m.get("content") or "")) // 4) + 4 for m in messages)


class OpenAIStub:
    """The ASGI app: `POST /v1/chat/completions` (streamed or not) and `GET /v1/models`."""

    def __init__(self, behavior: Behavior | None = None) -> None:
        self.behavior = behavior or Behavior()
        self.stats = StubStats()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        path, method = scope["path"], scope["method"]
        if path == "/v1/models" and method == "GET":
            await _json(send, 200, {"object": "list", "data": [{"id": "stub", "object": "model"}]})
            return
        if path != "/v1/chat/completions" or method != "POST":
            await _error(send, 404, "not found")
            return

        try:
            request = json.loads(await read_body(receive))
            model = str(request["model"])
            behavior = self.behavior.for_model(model)
        except (ValueError, KeyError, TypeError) as exc:
            await _error(send, 400, f"bad request: {exc}")
            return

        self.stats.record(scope, request)
        if behavior.error is not None:
            await _error(send, behavior.error, f"{ERROR_BODY_MARKER}: scripted HTTP {behavior.error}")
            return
        limit = request.get("max_completion_tokens") or request.get("max_tokens")
        if not request.get("stream"):
            await _json(send, 200, _completion(model, request=request, behavior=behavior, limit=limit))
            return

        await self.stats.follow(
            receive,
            lambda gone: _stream(send, gone, model=model, request=request, behavior=behavior, limit=limit),
        )


async def read_body(receive: Receive) -> bytes:
    """The whole request body."""
    body = bytearray()
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return bytes(body)


async def _watch_disconnect(receive: Receive, gone: asyncio.Event, stats: StubStats) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    stats.disconnect_times.append(time.monotonic())
    gone.set()


class ScriptedFailure(Exception):
    """The behaviour's `fail_after` token was reached: the stub sends its in-stream error."""


async def scripted_tokens(behavior: Behavior, count: int, gone: asyncio.Event) -> AsyncIterator[int]:
    """The indexes of the tokens to send, when `behavior` says (first-token wait, rate); stops early when
    the client leaves, at a stall (once the client left) or at a drop; ScriptedFailure at `fail_after`.
    A caller that got fewer than `count` tokens, or whose client is gone, ends the body unfinished."""
    if behavior.ttft_ms:
        with suppress(TimeoutError):
            await asyncio.wait_for(gone.wait(), behavior.ttft_ms / 1000)
    loop = asyncio.get_running_loop()
    start = loop.time()
    for index in range(count):
        if gone.is_set():
            return
        if index == behavior.stall_after:
            await gone.wait()
            return
        if index == behavior.drop_after:
            return  # ending without finishing the body makes the server cut the connection mid-stream
        if index == behavior.fail_after:
            raise ScriptedFailure
        if behavior.rate:
            delay = start + index / behavior.rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        elif index % _YIELD_EVERY == _YIELD_EVERY - 1:
            await asyncio.sleep(0)
        yield index
    if behavior.stall_after is not None and behavior.stall_after >= count:
        await gone.wait()


async def _stream(
    send: Send, gone: asyncio.Event, *, model: str, request: dict[str, Any], behavior: Behavior, limit: Any
) -> bool:
    """Send the SSE chunks; True when the stream reached [DONE]."""
    include_usage = bool((request.get("stream_options") or {}).get("include_usage"))
    count = behavior.tokens if not isinstance(limit, int) else min(behavior.tokens, limit)
    finish_reason = "length" if count < behavior.tokens else "stop"
    end = "\r\n\r\n" if behavior.crlf else "\n\n"
    # Only the content changes from chunk to chunk: the rest of the JSON is built once.
    head = (
        f'data: {{"id":"chatcmpl-{uuid.uuid4().hex[:24]}","object":"chat.completion.chunk",'
        f'"created":{int(time.time())},"model":{json.dumps(model)},"system_fingerprint":"fp_stub",'
        '"choices":['
    )
    tail = '],"usage":null}' + end if include_usage else "]}" + end
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-cache"),
                (b"x-request-id", uuid.uuid4().hex.encode()),
            ],
        }
    )

    async def frame(text: str, *, more: bool = True) -> None:
        await send({"type": "http.response.body", "body": text.encode(), "more_body": more})

    await frame(head + _ROLE_CHOICE + tail)
    sent = 0
    try:
        async for index in scripted_tokens(behavior, count, gone):
            # A lone surrogate has no UTF-8 form: it can only travel as its JSON escape.
            content = json.dumps(behavior.token(index), ensure_ascii=index == behavior.surrogate_at)
            await frame(
                f'{head}{{"index":0,"delta":{{"content":{content}}},"logprobs":null,"finish_reason":null}}{tail}'
            )
            sent += 1
    except ScriptedFailure:
        error = {"error": {"message": f"{ERROR_BODY_MARKER}: scripted failure", "type": "server_error"}}
        await frame(f"data: {json.dumps(error)}{end}", more=False)
        return False
    if sent < count or gone.is_set():
        return False
    finish = f'{{"index":0,"delta":{{}},"logprobs":null,"finish_reason":"{finish_reason}"}}'
    if include_usage and behavior.usage_inline:
        await frame(f'{head}{finish}],"usage":{_usage(request, count)}}}{end}')
    else:
        await frame(head + finish + tail)
        if include_usage:
            await frame(f'{head}],"usage":{_usage(request, count)}}}{end}')
    await frame(f"data: [DONE]{end}", more=behavior.linger_ms > 0)
    if behavior.linger_ms:
        with suppress(TimeoutError):
            await asyncio.wait_for(gone.wait(), behavior.linger_ms / 1000)
        await frame("", more=False)
    return True


def _usage(request: dict[str, Any], completion: int) -> str:
    prompt = prompt_tokens(request.get("messages") or [])
    return json.dumps(
        {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0,
                "audio_tokens": 0,
                "accepted_prediction_tokens": 0,
                "rejected_prediction_tokens": 0,
            },
        },
        separators=(",", ":"),
    )


def _completion(model: str, *, request: dict[str, Any], behavior: Behavior, limit: Any) -> dict[str, Any]:
    count = behavior.tokens if not isinstance(limit, int) else min(behavior.tokens, limit)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": behavior.text(count), "refusal": None},
                "logprobs": None,
                "finish_reason": "length" if count < behavior.tokens else "stop",
            }
        ],
        "usage": json.loads(_usage(request, count)),
    }


async def _json(send: Send, status: int, payload: dict[str, Any]) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _error(send: Send, status: int, message: str) -> None:
    await _json(
        send, status, {"error": {"message": message, "type": "stub_error", "param": None, "code": None}}
    )


@contextmanager
def serve_stub(
    app: Any = None, *, host: str = "127.0.0.1", port: int = 0, path: str = "/v1"
) -> Iterator[str]:
    """Serve `app` (an ASGI app; the OpenAI stub by default) from a background thread (port 0 = a free
    one); yields the base URL, "http://127.0.0.1:<port>" + `path`."""
    app = app or OpenAIStub()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="openai-stub", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RuntimeError("the stub server did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{port}{path}"
    finally:
        # force_exit: stalled streams never finish on their own; the loop's teardown cancels them.
        server.should_exit = True
        server.force_exit = True
        thread.join(10)
        sock.close()


def add_behavior_options(parser: argparse.ArgumentParser) -> None:
    """One `--name` option per Behavior field (the server's default behaviour)."""
    defaults = Behavior()
    for spec in fields(Behavior):
        kind = float if spec.name in _FLOAT_KEYS else int
        flag = "--" + spec.name.replace("_", "-")
        parser.add_argument(
            flag, type=kind, default=getattr(defaults, spec.name), help=f"default {spec.name}"
        )


def behavior_from_args(args: argparse.Namespace) -> Behavior:
    """The Behavior the options of add_behavior_options describe."""
    return Behavior(**{spec.name: getattr(args, spec.name) for spec in fields(Behavior)})


def serve_cli(
    argv: list[str] | None,
    *,
    prog: str,
    port: int,
    make_app: Callable[[Behavior], Any],
    keep_alive_s: int = 5,
) -> None:
    """A stub's command line: --host, --port and the Behavior options; serves until Ctrl-C."""
    parser = argparse.ArgumentParser(prog=prog, description=f"Serve {prog} (see its module docstring).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=port)
    parser.add_argument(
        "--keep-alive",
        type=int,
        default=keep_alive_s,
        metavar="SECONDS",
        help=f"how long an idle connection is kept open (default {keep_alive_s})",
    )
    add_behavior_options(parser)
    args = parser.parse_args(argv)
    behavior = behavior_from_args(args)
    config = uvicorn.Config(
        make_app(behavior),
        host=args.host,
        port=args.port,
        access_log=False,
        lifespan="off",
        timeout_keep_alive=args.keep_alive,
    )
    print(f"{prog} on http://{args.host}:{args.port} ({behavior})", flush=True)
    uvicorn.Server(config).run()


def main(argv: list[str] | None = None) -> None:
    """`python -m minichat_local.openai_stub`: serve the stub on /v1 until Ctrl-C."""
    serve_cli(argv, prog="minichat_local.openai_stub", port=8100, make_app=OpenAIStub)


if __name__ == "__main__":
    main()
