"""The Bedrock provider: the real boto3 client against the Bedrock stand-in (event-stream framing)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest

from minichat.errors import ProviderError, ProviderTimeout
from minichat.providers import ChatMessage, Delta, Finish, ProviderRequest, StreamItem, Usage
from minichat.providers.bedrock import BedrockProvider, EventStreamDecoder
from minichat_local.bedrock_stub import (
    ERROR_TYPES,
    BedrockStub,
    BedrockStubStats,
    encode_message,
    prompt_tokens,
)
from minichat_local.openai_stub import ERROR_BODY_MARKER, serve_stub, stub_text

MESSAGES = [ChatMessage("system", "be brief"), ChatMessage("user", "hello there, stand-in")]
T = TypeVar("T")


@pytest.fixture(autouse=True)
def aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dummy credentials: the stand-in records the signature, it does not check it."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDTESTBEDROCK")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret-not-real")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="module")
def stand_in() -> Iterator[tuple[BedrockStub, str]]:
    app = BedrockStub()
    with serve_stub(app, path="") as url:
        yield app, url


@pytest.fixture
def stub(stand_in: tuple[BedrockStub, str]) -> tuple[BedrockStub, str]:
    app, _ = stand_in
    app.stats = BedrockStubStats()
    return stand_in


def _run(url: str, body: Callable[[BedrockProvider], Awaitable[T]], **options: Any) -> T:
    async def main() -> T:
        options.setdefault("first_token_timeout", 3)
        options.setdefault("idle_timeout", 2)
        provider = BedrockProvider(models=["m"], region="us-east-1", endpoint_url=url, **options)
        # The client is built before the clock starts (the stream function builds it at cold start): on a
        # loaded machine importing boto3 alone can take seconds, which these timeouts must not measure.
        await asyncio.to_thread(provider.client)
        try:
            return await body(provider)
        finally:
            await provider.aclose()

    return asyncio.run(main())


def _request(model: str, **options: Any) -> ProviderRequest:
    return ProviderRequest(model=model, messages=MESSAGES, **options)


async def _collect(provider: BedrockProvider, request: ProviderRequest) -> list[StreamItem]:
    return [item async for item in provider.stream(request)]


async def _until_error(
    provider: BedrockProvider, request: ProviderRequest
) -> tuple[list[StreamItem], Exception]:
    seen: list[StreamItem] = []
    try:
        async for item in provider.stream(request):
            seen.append(item)
    except (ProviderError, ProviderTimeout) as exc:
        return seen, exc
    raise AssertionError(f"no error; got {seen}")


def _assert_safe(error: Exception) -> None:
    """The message is ours: no AWS text, no stand-in body, nothing chained."""
    for text in (str(error), repr(error)):
        assert ERROR_BODY_MARKER not in text and "scripted" not in text
    assert error.__cause__ is None and error.__suppress_context__


def test_the_stand_ins_framing_is_what_botocore_parses_and_so_does_ours() -> None:
    from botocore.eventstream import EventStreamBuffer

    frames = [
        encode_message({":event-type": "messageStart", ":message-type": "event"}, b'{"role":"assistant"}'),
        encode_message({":event-type": "contentBlockDelta", ":message-type": "event"}, '{"t":"é"}'.encode()),
        encode_message({":exception-type": "throttlingException", ":message-type": "exception"}, b"{}"),
    ]
    body = b"".join(frames)
    reference = EventStreamBuffer()
    reference.add_data(body)
    expected = [(m.headers, m.payload) for m in reference]
    assert len(expected) == 3
    for cut in range(0, len(body), 7):  # every way the body may arrive in two pieces
        decoder = EventStreamDecoder()
        assert decoder.feed(body[:cut]) + decoder.feed(body[cut:]) == expected
        assert decoder.pending == 0
    decoder = EventStreamDecoder()
    assert decoder.feed(body[:20]) == [] and decoder.pending == 20


@pytest.mark.parametrize("flip", [3, 9, 30, -2])
def test_a_corrupt_frame_is_refused(flip: int) -> None:
    frame = bytearray(encode_message({":event-type": "metadata", ":message-type": "event"}, b"{}"))
    frame[flip] ^= 0x40
    with pytest.raises(Exception, match=r"CRC|length"):
        EventStreamDecoder().feed(bytes(frame))


def test_streams_the_text_then_finish_then_the_exact_usage(stub: tuple[BedrockStub, str]) -> None:
    app, url = stub
    items = _run(url, lambda p: _collect(p, _request("stub-tokens-50", temperature=0.2)))
    deltas = [item for item in items if isinstance(item, Delta)]
    assert "".join(d.text for d in deltas) == stub_text(50) and len(deltas) == 50
    sent = app.stats.last_request
    assert items[-2:] == [Finish("stop"), Usage(input_tokens=prompt_tokens(sent), output_tokens=50)]
    assert sent["system"] == [{"text": "be brief"}]
    assert sent["messages"] == [{"role": "user", "content": [{"text": "hello there, stand-in"}]}]
    assert sent["inferenceConfig"] == {"temperature": 0.2}
    assert (app.stats.last_authorization or "").startswith("AWS4-HMAC-SHA256 Credential=AKIDTESTBEDROCK/")


def test_max_tokens_stop_reason_is_finish_length_and_the_limit_is_clamped(
    stub: tuple[BedrockStub, str],
) -> None:
    app, url = stub
    items = _run(url, lambda p: _collect(p, _request("stub-tokens-20", max_tokens=7)))
    assert "".join(i.text for i in items if isinstance(i, Delta)) == stub_text(7)
    assert items[-2:] == [Finish("length"), Usage(prompt_tokens(app.stats.last_request), 7)]
    # More than the model can write would be a ValidationException: the model's most goes out instead.
    _run(
        url,
        lambda p: _collect(p, _request("stub-tokens-5", max_tokens=30_000)),
        max_output_tokens={"stub-tokens-5": 4096},
    )
    assert app.stats.last_request["inferenceConfig"] == {"maxTokens": 4096}


@pytest.mark.parametrize(
    ("status", "words"),
    [
        (429, "throttling"),
        (503, "unavailable"),
        (408, "too long"),
        (400, "invalid"),
        (403, "enable model access"),
        (404, "region"),
        (500, "internal error"),
        (424, "failed"),
    ],
)
def test_bedrock_errors_become_safe_provider_errors(
    stub: tuple[BedrockStub, str], status: int, words: str
) -> None:
    _, url = stub
    seen, error = _run(url, lambda p: _until_error(p, _request(f"stub-error-{status}")))
    assert seen == [] and type(error) is ProviderError, (ERROR_TYPES[status], error)
    assert words in error.message, error.message
    _assert_safe(error)


def test_throttling_is_retried_once_then_reported(stub: tuple[BedrockStub, str]) -> None:
    app, url = stub
    _run(url, lambda p: _until_error(p, _request("stub-error-429")))
    assert app.stats.requests == 2  # botocore's one retry of the request, never of a stream under way


def test_an_in_stream_exception_after_some_text(stub: tuple[BedrockStub, str]) -> None:
    _, url = stub
    seen, error = _run(url, lambda p: _until_error(p, _request("stub-fail-after-3")))
    assert seen == [Delta("w0"), Delta(" w1"), Delta(" w2")]
    assert type(error) is ProviderError and "streaming its answer" in error.message
    _assert_safe(error)


def test_a_connection_cut_mid_stream(stub: tuple[BedrockStub, str]) -> None:
    _, url = stub
    seen, error = _run(url, lambda p: _until_error(p, _request("stub-drop-after-2")))
    assert seen == [Delta("w0"), Delta(" w1")]
    assert type(error) is ProviderError
    _assert_safe(error)


def test_an_unreachable_endpoint(stub: tuple[BedrockStub, str]) -> None:
    seen, error = _run("http://127.0.0.1:9", lambda p: _until_error(p, _request("m")), connect_timeout=2)
    assert seen == [] and type(error) is ProviderError and "reach Bedrock" in error.message


@pytest.mark.parametrize(
    ("model", "before", "timeout"),
    [("stub-stall-after-0", [], 3), ("stub-stall-after-2", [Delta("w0"), Delta(" w1")], 2)],
)
def test_silence_past_the_first_token_and_idle_timeouts(
    stub: tuple[BedrockStub, str], model: str, before: list[StreamItem], timeout: float
) -> None:
    app, url = stub
    began = time.monotonic()
    seen, error = _run(url, lambda p: _until_error(p, _request(model)))
    took = time.monotonic() - began
    assert seen == before and type(error) is ProviderTimeout
    assert timeout - 0.05 < took < timeout + 1.5, took
    deadline = time.monotonic() + 2
    while app.stats.disconnected < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert app.stats.disconnected == 1  # the request was closed, not left open


def test_closing_the_stream_while_bedrock_is_silent_closes_the_connection(
    stub: tuple[BedrockStub, str],
) -> None:
    """What a cancel does: the consumer task is cancelled while it waits; the stand-in sees the close."""
    app, url = stub

    async def body(provider: BedrockProvider) -> tuple[float, float]:
        stream = provider.stream(_request("stub-stall-after-1"))

        async def consume() -> None:
            async for _ in stream:
                pass

        task = asyncio.create_task(consume())
        while app.stats.active < 1:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.3)  # the worker is blocked in its read: Bedrock sends nothing
        began = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await stream.aclose()
        returned = time.monotonic() - began
        while not app.stats.disconnects_after(began) and time.monotonic() - began < 2:
            await asyncio.sleep(0.001)
        closed = app.stats.disconnects_after(began)
        assert closed, "the stand-in never saw the connection close"
        return returned, closed[0]

    returned, closed = _run(url, body)
    print(f"cancel returned in {returned * 1000:.1f} ms; stand-in saw the close after {closed * 1000:.1f} ms")
    assert returned < 0.05 and closed < 0.25
    assert app.stats.disconnected == 1


def test_the_event_loop_never_waits_on_boto3(stub: tuple[BedrockStub, str]) -> None:
    """Eight streams stalled in their socket reads, the loop keeps ticking every few milliseconds."""
    _, url = stub

    async def body(provider: BedrockProvider) -> float:
        streams = [provider.stream(_request("stub-stall-after-1")) for _ in range(8)]
        firsts = await asyncio.gather(*(s.__anext__() for s in streams))
        assert firsts == [Delta("w0")] * 8
        waits = [asyncio.ensure_future(s.__anext__()) for s in streams]
        worst, last = 0.0, time.perf_counter()
        for _ in range(100):
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            worst, last = max(worst, now - last), now
        for wait in waits:
            wait.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
        for s in streams:
            await s.aclose()
        return worst

    worst = _run(url, body)
    print(f"worst loop tick with 8 stalled Bedrock reads: {worst * 1000:.1f} ms (sleep 5 ms)")
    assert worst < 0.25  # a read on the loop would stall it for the whole silence (seconds)


def test_one_client_reuses_its_connections(stub: tuple[BedrockStub, str]) -> None:
    app, url = stub

    async def body(provider: BedrockProvider) -> Any:
        for _ in range(3):
            await _collect(provider, _request("stub-tokens-3"))
            # The answer is whole at `metadata`; the worker then reads the body's last bytes and gives the
            # connection back: a stream started at once may find it still out and open another.
            await asyncio.sleep(0.1)
        return provider.client()

    client = _run(url, body)
    assert app.stats.completed == 3
    assert len(app.stats.clients) == 1  # one keep-alive connection carried the three streams
    assert client.meta.config.max_pool_connections == 128
    assert client.meta.config.read_timeout == 3 + 5
