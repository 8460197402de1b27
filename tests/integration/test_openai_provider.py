"""The OpenAI provider: the real `openai` client against the OpenAI-compatible stub server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import httpx
import pytest

from minichat.errors import ProviderError, ProviderTimeout
from minichat.providers import ChatMessage, Delta, Finish, ProviderRequest, StreamItem, Usage
from minichat.providers.openai import OpenAIProvider
from minichat.sse import parse_sse
from minichat_local.openai_stub import (
    ERROR_BODY_MARKER,
    Behavior,
    OpenAIStub,
    StubStats,
    prompt_tokens,
    serve_stub,
    stub_text,
)

API_KEY = "sk-test-SECRET-do-not-leak-1234567890"
MESSAGES = [ChatMessage("system", "be brief"), ChatMessage("user", "hello there, stub")]
# What the stub reports as prompt_tokens for MESSAGES.
PROMPT_TOKENS = prompt_tokens([{"role": m.role, "content": m.content} for m in MESSAGES])
T = TypeVar("T")


@pytest.fixture(params=["aiohttp", "httpx"])
def transport(request: pytest.FixtureRequest) -> str:
    """Each provider test runs on both HTTP transports the openai client offers."""
    return str(request.param)


@pytest.fixture(scope="module")
def stub_server() -> Iterator[tuple[OpenAIStub, str]]:
    app = OpenAIStub()
    with serve_stub(app) as base_url:
        yield app, base_url


@pytest.fixture
def stub(stub_server: tuple[OpenAIStub, str]) -> tuple[OpenAIStub, str]:
    """The shared stub with fresh counters (a request still running from an earlier test keeps its own)."""
    app, _ = stub_server
    app.stats = StubStats()
    return stub_server


def _run(base_url: str, transport: Any, body: Callable[[OpenAIProvider], Awaitable[T]], **options: Any) -> T:
    """Run `body` with a fresh provider in a fresh loop, closing the provider afterwards."""

    async def main() -> T:
        provider = OpenAIProvider(
            models=["gpt-test"], api_key=API_KEY, base_url=base_url, transport=transport, **options
        )
        try:
            return await body(provider)
        finally:
            await provider.aclose()

    return asyncio.run(main())


def _request(model: str, **options: Any) -> ProviderRequest:
    return ProviderRequest(model=model, messages=MESSAGES, **options)


async def _collect(provider: OpenAIProvider, request: ProviderRequest) -> list[StreamItem]:
    return [item async for item in provider.stream(request)]


async def _collect_until_error(
    provider: OpenAIProvider, request: ProviderRequest
) -> tuple[list[StreamItem], Exception, float]:
    """Items before the error, the error, and the seconds from the last item (or the start) to it."""
    seen: list[StreamItem] = []
    last = time.perf_counter()
    try:
        async for item in provider.stream(request):
            seen.append(item)
            last = time.perf_counter()
    except (ProviderError, ProviderTimeout) as exc:
        return seen, exc, time.perf_counter() - last
    raise AssertionError(f"no error; got {seen}")


def _wait_for(condition: Callable[[], bool], timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _assert_safe(error: Exception) -> None:
    """The client-facing error carries neither the upstream body nor the key, not even in its context."""
    for text in (str(error), repr(error), repr(getattr(error, "extra", {}))):
        assert ERROR_BODY_MARKER not in text
        assert "SECRET" not in text
    assert error.__cause__ is None
    assert error.__suppress_context__


def test_streams_every_delta_then_the_usage_chunk(stub: tuple[OpenAIStub, str], transport: str) -> None:
    app, base_url = stub
    items = _run(base_url, transport, lambda p: _collect(p, _request("stub-tokens-50")))
    deltas = [item for item in items if isinstance(item, Delta)]
    assert len(deltas) == 50
    assert "".join(d.text for d in deltas) == stub_text(50)
    assert deltas[:3] == [Delta("w0"), Delta(" w1"), Delta(" w2")]
    assert items[-2:] == [Finish("stop"), Usage(input_tokens=PROMPT_TOKENS, output_tokens=50)]
    assert len(items) == 52
    # What went upstream: a streamed request asking for usage, with the key, no retries needed.
    assert app.stats.requests == 1
    assert app.stats.completed == 1
    assert app.stats.last_authorization == f"Bearer {API_KEY}"
    sent = app.stats.last_request
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}
    assert sent["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello there, stub"},
    ]
    assert "temperature" not in sent
    assert "max_tokens" not in sent


@pytest.mark.parametrize("variant", ["usage-inline-1", "crlf-1", "usage-inline-1-crlf-1"])
def test_compatible_server_variants(stub: tuple[OpenAIStub, str], transport: str, variant: str) -> None:
    _, base_url = stub
    items = _run(base_url, transport, lambda p: _collect(p, _request(f"stub-tokens-5-{variant}")))
    words = ["w0", " w1", " w2", " w3", " w4"]
    assert items == [*(Delta(t) for t in words), Finish("stop"), Usage(PROMPT_TOKENS, 5)]


def test_a_body_left_open_after_done_does_not_hold_the_stream(
    stub: tuple[OpenAIStub, str], transport: str
) -> None:
    app, base_url = stub
    started = time.monotonic()
    items = _run(base_url, transport, lambda p: _collect(p, _request("stub-tokens-3-linger-ms-5000")))
    assert items == [Delta("w0"), Delta(" w1"), Delta(" w2"), Finish("stop"), Usage(PROMPT_TOKENS, 3)]
    assert time.monotonic() - started < 2.5  # the drain after [DONE] is bounded (1 s), not the 5 s linger
    assert _wait_for(lambda: app.stats.active == 0)


def test_forwards_temperature_and_max_tokens(stub: tuple[OpenAIStub, str], transport: str) -> None:
    app, base_url = stub
    request = _request("stub-tokens-50", temperature=0.25, max_tokens=7)
    items = _run(base_url, transport, lambda p: _collect(p, request))
    assert app.stats.last_request["temperature"] == 0.25
    assert app.stats.last_request["max_tokens"] == 7
    assert "".join(i.text for i in items if isinstance(i, Delta)) == stub_text(7)
    assert items[-2:] == [Finish("length"), Usage(input_tokens=PROMPT_TOKENS, output_tokens=7)]


def test_one_provider_serves_many_streams_and_loops(stub: tuple[OpenAIStub, str], transport: str) -> None:
    app, base_url = stub
    provider = OpenAIProvider(models=["m"], api_key=API_KEY, base_url=base_url, transport=transport)

    async def twice() -> list[list[StreamItem]]:
        first = await _collect(provider, _request("stub-tokens-3"))
        second = await _collect(provider, _request("stub-tokens-4"))
        # Closed inside its own loop: a pool left behind cannot be closed once that loop is gone.
        await provider.aclose()
        return [first, second]

    # Two asyncio.run calls: the client (its connection pool) is rebuilt for the new loop.
    first_loop = asyncio.run(twice())
    assert app.stats.connections == 1  # the body was read to its end: the connection went back to the pool
    second_loop = asyncio.run(twice())
    assert app.stats.connections == 2
    assert first_loop == second_loop
    assert [len(items) for items in first_loop] == [5, 6]  # deltas, Finish, Usage
    assert app.stats.completed == 4


def test_upstream_500_is_a_provider_error_without_the_body(
    stub: tuple[OpenAIStub, str], transport: str
) -> None:
    app, base_url = stub
    seen, error, _ = _run(base_url, transport, lambda p: _collect_until_error(p, _request("stub-error-500")))
    assert seen == []
    assert isinstance(error, ProviderError)
    assert not isinstance(error, ProviderTimeout)
    assert error.message == "upstream returned HTTP 500"
    assert error.code == "provider_error"
    _assert_safe(error)
    assert app.stats.requests == 1  # max_retries=0: a retry would duplicate a stream


def test_upstream_401_does_not_leak_the_key(stub: tuple[OpenAIStub, str], transport: str) -> None:
    _, base_url = stub
    _, error, _ = _run(base_url, transport, lambda p: _collect_until_error(p, _request("stub-error-401")))
    assert isinstance(error, ProviderError)
    assert error.message == "upstream returned HTTP 401"
    _assert_safe(error)


def test_unreachable_server_is_a_provider_error(transport: str) -> None:
    # Bind then close: a port that nothing listens on.
    with serve_stub() as base_url:
        pass
    _, error, _ = _run(base_url, transport, lambda p: _collect_until_error(p, _request("stub-tokens-3")))
    assert isinstance(error, ProviderError)
    assert not isinstance(error, ProviderTimeout)
    assert error.message == "could not reach the upstream model server"
    _assert_safe(error)


def test_a_connection_cut_mid_stream_is_a_provider_error(
    stub: tuple[OpenAIStub, str], transport: str
) -> None:
    _, base_url = stub
    seen, error, _ = _run(
        base_url, transport, lambda p: _collect_until_error(p, _request("stub-drop-after-3"))
    )
    assert seen == [Delta("w0"), Delta(" w1"), Delta(" w2")]
    assert isinstance(error, ProviderError)
    assert error.message == "the connection to the upstream model server broke mid-stream"


def test_an_error_object_mid_stream_is_a_provider_error(stub: tuple[OpenAIStub, str], transport: str) -> None:
    _, base_url = stub
    seen, error, _ = _run(
        base_url, transport, lambda p: _collect_until_error(p, _request("stub-fail-after-2"))
    )
    assert seen == [Delta("w0"), Delta(" w1")]
    assert isinstance(error, ProviderError)
    assert error.message == "the upstream model server reported an error mid-stream"
    _assert_safe(error)


def test_a_stall_is_a_timeout_after_the_idle_timeout(stub: tuple[OpenAIStub, str], transport: str) -> None:
    app, base_url = stub
    seen, error, waited = _run(
        base_url,
        transport,
        lambda p: _collect_until_error(p, _request("stub-stall-after-2")),
        idle_timeout=0.4,
    )
    assert seen == [Delta("w0"), Delta(" w1")]
    assert isinstance(error, ProviderTimeout)
    assert error.code == "provider_timeout"
    assert error.message == "the model sent nothing for 0.4 s"
    assert 0.38 <= waited < 1.0
    # The timed-out request was closed: the stub saw its client leave.
    assert _wait_for(lambda: app.stats.disconnected == 1)
    assert app.stats.active == 0


def test_no_first_token_is_a_timeout_after_the_first_token_timeout(
    stub: tuple[OpenAIStub, str], transport: str
) -> None:
    app, base_url = stub
    seen, error, waited = _run(
        base_url,
        transport,
        lambda p: _collect_until_error(p, _request("stub-ttft-ms-5000")),
        first_token_timeout=0.4,
        idle_timeout=10.0,
    )
    assert seen == []
    assert isinstance(error, ProviderTimeout)
    assert error.message == "the model sent no token within 0.4 s"
    assert 0.38 <= waited < 1.0
    assert _wait_for(lambda: app.stats.disconnected == 1)


def test_a_paced_stream_longer_than_the_idle_timeout_is_fine(
    stub: tuple[OpenAIStub, str], transport: str
) -> None:
    _, base_url = stub
    started = time.monotonic()
    items = _run(
        base_url,
        transport,
        lambda p: _collect(p, _request("stub-tokens-16-rate-20")),
        idle_timeout=0.25,
        first_token_timeout=0.25,
    )
    assert "".join(i.text for i in items if isinstance(i, Delta)) == stub_text(16)
    assert time.monotonic() - started > 0.7  # four idle timeouts' worth: the deadline really moved


def test_a_slow_consumer_is_not_an_idle_upstream(stub: tuple[OpenAIStub, str], transport: str) -> None:
    _, base_url = stub

    async def slow_reader(provider: OpenAIProvider) -> list[StreamItem]:
        items = []
        async for item in provider.stream(_request("stub-tokens-2")):
            items.append(item)
            await asyncio.sleep(0.25)  # longer than the idle timeout, but it is our time, not upstream's
        return items

    items = _run(base_url, transport, slow_reader, idle_timeout=0.1, first_token_timeout=0.1)
    assert len(items) == 4
    assert isinstance(items[-1], Usage)


def test_aclose_mid_stream_closes_the_upstream_connection(
    stub: tuple[OpenAIStub, str], transport: str
) -> None:
    app, base_url = stub

    async def read_three_then_close(provider: OpenAIProvider) -> list[StreamItem]:
        stream = provider.stream(_request("stub-tokens-1000-rate-100"))
        items = [await anext(stream) for _ in range(3)]
        await stream.aclose()
        return items

    started = time.monotonic()
    items = _run(base_url, transport, read_three_then_close)
    assert items == [Delta("w0"), Delta(" w1"), Delta(" w2")]
    assert _wait_for(lambda: app.stats.disconnected == 1, timeout=2.0)
    assert app.stats.completed == 0
    assert app.stats.active == 0
    assert time.monotonic() - started < 2.0  # nowhere near the 10 s the full stream would take


def test_cancelling_the_consumer_closes_the_upstream_connection(
    stub: tuple[OpenAIStub, str], transport: str
) -> None:
    app, base_url = stub

    async def cancel_mid_stream(provider: OpenAIProvider) -> int:
        seen = 0

        async def consume() -> None:
            nonlocal seen
            async for _ in provider.stream(_request("stub-stall-after-1")):
                seen += 1

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return seen

    assert _run(base_url, transport, cancel_mid_stream) == 1
    assert _wait_for(lambda: app.stats.disconnected == 1, timeout=2.0)
    assert app.stats.active == 0


_ONE_TOKEN = (
    b"".join(
        b"data: " + json.dumps(chunk).encode() + b"\n\n"
        for chunk in (
            {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "hi"}}]},
            {
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            },
        )
    )
    + b"data: [DONE]\n\n"
)


@contextlib.contextmanager
def _closing_server(*, answer_first: bool, body: bytes = _ONE_TOKEN) -> Iterator[tuple[str, dict[str, int]]]:
    """An upstream that closes a connection as a request arrives on it, without answering: the moment a
    server closes an idle keep-alive connection. With `answer_first`, each connection's first request is
    answered (`body`, by default a one-token stream, and the connection kept open); without, none is."""
    seen = {"connections": 0, "requests": 0}
    started = threading.Event()
    box: dict[str, Any] = {}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen["connections"] += 1
        answered = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                await reader.readexactly(length)
                seen["requests"] += 1
                if not answer_first or answered:
                    return  # closed, nothing answered
                answered += 1
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                    + f"content-length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()

    async def serve() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        box["port"] = server.sockets[0].getsockname()[1]
        box["stop"] = asyncio.Event()
        box["loop"] = asyncio.get_running_loop()
        started.set()
        async with server:
            await box["stop"].wait()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    assert started.wait(5)
    try:
        yield f"http://127.0.0.1:{box['port']}/v1", seen
    finally:
        box["loop"].call_soon_threadsafe(box["stop"].set)
        thread.join(5)


def test_a_request_the_server_drops_as_it_closes_an_idle_connection_is_sent_once_more(transport: str) -> None:
    """The second stream goes out on the first one's kept-alive connection, which the server closes
    without answering; it is sent again and answered on a new connection."""
    with _closing_server(answer_first=True) as (base_url, seen):

        async def two(provider: OpenAIProvider) -> list[list[StreamItem]]:
            return [await _collect(provider, _request("gpt-test")) for _ in range(2)]

        first, second = _run(base_url, transport, two)
    assert first == second == [Delta("hi"), Finish("stop")]
    assert seen == {"connections": 2, "requests": 3}


def test_the_request_sent_again_does_not_take_another_broken_connection_of_the_pool(transport: str) -> None:
    """Two streams at once leave two kept-alive connections, both of which the server then closes as a
    request arrives (as a server closes all the connections that went idle together): the stream after
    them fails on one and is sent again on a new connection, not on the other."""
    with _closing_server(answer_first=True) as (base_url, seen):

        async def three(provider: OpenAIProvider) -> list[list[StreamItem]]:
            request = _request("gpt-test")
            pair = await asyncio.gather(_collect(provider, request), _collect(provider, request))
            return [*pair, await _collect(provider, request)]

        results = _run(base_url, transport, three)
    assert results == [[Delta("hi"), Finish("stop")]] * 3
    assert seen == {"connections": 3, "requests": 4}


def test_an_upstream_that_never_answers_is_tried_twice_then_a_provider_error(transport: str) -> None:
    with _closing_server(answer_first=False) as (base_url, seen):
        _, error, _ = _run(base_url, transport, lambda p: _collect_until_error(p, _request("gpt-test")))
    assert isinstance(error, ProviderError)
    assert error.message == "could not reach the upstream model server"
    assert seen == {"connections": 2, "requests": 2}
    _assert_safe(error)


def _chunk_with_content(raw: bytes) -> bytes:
    """One SSE event whose content is `raw`, byte for byte (not necessarily UTF-8), then [DONE]."""
    return (
        b'data: {"object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"'
        + raw
        + b'"},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
    )


def test_an_encoded_lone_surrogate_passes_through_to_be_repaired(transport: str) -> None:
    """UTF-8 bytes of a lone surrogate (which strict UTF-8 refuses) are read as json.loads reads bytes:
    the text keeps the surrogate, and the engine repairs it as it does an escaped one (SPEC §7.3)."""
    with _closing_server(answer_first=True, body=_chunk_with_content(b"a\xed\xa0\x80b")) as (base_url, _):
        items = _run(base_url, transport, lambda p: _collect(p, _request("gpt-test")))
    assert items == [Delta("a\ud800b"), Finish("stop")]


@pytest.mark.parametrize("raw", [b"\xff\xfe not UTF-8", b'unescaped " quote'])
def test_a_chunk_that_is_not_json_text_is_an_invalid_response(transport: str, raw: bytes) -> None:
    with _closing_server(answer_first=True, body=_chunk_with_content(raw)) as (base_url, _):
        seen, error, _ = _run(base_url, transport, lambda p: _collect_until_error(p, _request("gpt-test")))
    assert seen == []
    assert isinstance(error, ProviderError)
    assert error.message == "the upstream model server sent an invalid response"
    _assert_safe(error)


def test_a_hundred_concurrent_streams(stub: tuple[OpenAIStub, str], transport: str) -> None:
    app, base_url = stub

    async def many(provider: OpenAIProvider) -> list[list[StreamItem]]:
        return await asyncio.gather(
            *(_collect(provider, _request("stub-tokens-30-rate-60")) for _ in range(100))
        )

    started = time.monotonic()
    results = _run(base_url, transport, many)
    took = time.monotonic() - started
    assert all("".join(i.text for i in r if isinstance(i, Delta)) == stub_text(30) for r in results)
    assert all(r[-1] == Usage(input_tokens=PROMPT_TOKENS, output_tokens=30) for r in results)
    assert app.stats.completed == 100
    assert app.stats.max_active >= 90  # they really ran side by side ...
    assert took < 3.0  # ... each paced at 0.5 s


def test_preload_builds_a_client_the_first_loop_adopts(stub: tuple[OpenAIStub, str], transport: str) -> None:
    app, base_url = stub
    provider = OpenAIProvider(models=["m"], api_key=API_KEY, base_url=base_url, transport=transport)
    provider.preload()
    preloaded = provider._client

    async def once() -> list[StreamItem]:
        try:
            return await _collect(provider, _request("stub-tokens-2"))
        finally:
            assert provider._client is preloaded
            await provider.aclose()

    assert len(asyncio.run(once())) == 4  # two deltas, Finish, Usage
    assert app.stats.completed == 1


# --- the stub itself -----------------------------------------------------------------------------


def test_stub_behaviour_from_the_model_name() -> None:
    default = Behavior(tokens=5)
    assert default.for_model("gpt-4o") == default
    assert default.for_model("stub") == default
    assert default.for_model("stub-tokens-100-rate-50") == Behavior(tokens=100, rate=50.0)
    assert default.for_model("stub-stall-after-1") == Behavior(tokens=5, stall_after=1)
    assert default.for_model("stub-error-503-ttft-ms-2.5") == Behavior(tokens=5, error=503, ttft_ms=2.5)
    assert default.for_model("stub-crlf-1-linger-ms-10") == Behavior(tokens=5, crlf=1, linger_ms=10.0)
    for bad in ("stub-bogus-1", "stub-tokens", "stub-tokens-x", "stubby", "stub-tokens-1-"):
        with pytest.raises(ValueError):
            default.for_model(bad)


def _post(base_url: str, payload: dict[str, Any]) -> tuple[int, str, bytes]:
    response = httpx.post(f"{base_url}/chat/completions", json=payload, timeout=5)
    return response.status_code, response.headers["content-type"], response.content


def test_stub_speaks_openai_sse(stub: tuple[OpenAIStub, str]) -> None:
    _, base_url = stub
    payload = {
        "model": "stub-tokens-2",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "abcdefgh"}],
    }
    status, content_type, body = _post(base_url, payload)
    assert status == 200
    assert content_type.startswith("text/event-stream")
    assert body.endswith(b"\n\ndata: [DONE]\n\n")
    events = [data for _, data in parse_sse(body)]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(data) for data in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert [c["choices"][0]["delta"] for c in chunks[:4]] == [
        {"role": "assistant", "content": "", "refusal": None},
        {"content": "w0"},
        {"content": " w1"},
        {},
    ]
    assert chunks[3]["choices"][0]["finish_reason"] == "stop"
    assert all(c["usage"] is None for c in chunks[:4])
    assert chunks[4]["choices"] == []
    assert chunks[4]["usage"]["prompt_tokens"] == 2 + 4
    assert chunks[4]["usage"]["completion_tokens"] == 2
    assert chunks[4]["usage"]["total_tokens"] == 8

    # Without include_usage: no usage field at all and no usage chunk.
    del payload["stream_options"]
    chunks = [json.loads(data) for _, data in parse_sse(_post(base_url, payload)[2])[:-1]]
    assert len(chunks) == 4
    assert all("usage" not in c for c in chunks)


def test_stub_rejects_an_unknown_scenario(stub: tuple[OpenAIStub, str], transport: str) -> None:
    _, base_url = stub
    status, _, body = _post(base_url, {"model": "stub-bogus-1", "stream": True, "messages": []})
    assert status == 400
    assert b"unknown stub model" in body
    _, error, _ = _run(base_url, transport, lambda p: _collect_until_error(p, _request("stub-bogus-1")))
    assert isinstance(error, ProviderError)
    assert error.message == "upstream returned HTTP 400"


class _ForwardProxy:
    """An HTTP forward proxy for plain-HTTP targets: each request's absolute-form target is noted and
    rewritten to origin form, then the bytes are piped both ways."""

    def __init__(self) -> None:
        self.targets: list[str] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        method, target, version = head.split(b"\r\n", 1)[0].decode().split(" ")
        self.targets.append(f"{method} {target}")
        url = httpx.URL(target)
        up_reader, up_writer = await asyncio.open_connection(url.host, url.port)
        rest = head.split(b"\r\n", 1)[1]
        up_writer.write(f"{method} {url.raw_path.decode()} {version}\r\n".encode() + rest)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while block := await src.read(65536):
                dst.write(block)
                await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer), return_exceptions=True)


def test_the_proxy_named_by_the_environment_carries_the_request(
    stub: tuple[OpenAIStub, str], transport: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTP_PROXY is honoured, looked up once per session rather than on every request."""
    app, base_url = stub
    proxy = _ForwardProxy()
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)

    async def body() -> list[list[StreamItem]]:
        server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
        monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{port}")
        provider = OpenAIProvider(models=["m"], api_key=API_KEY, base_url=base_url, transport=transport)
        try:
            return [await _collect(provider, _request(f"stub-tokens-{n}")) for n in (2, 3)]
        finally:
            await provider.aclose()
            server.close()

    results = asyncio.run(body())
    assert proxy.targets and all(t == f"POST {base_url}/chat/completions" for t in proxy.targets)
    assert [len(items) for items in results] == [4, 5]  # deltas, Finish, Usage: the whole answer came back
    assert app.stats.completed == 2
