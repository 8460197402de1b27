"""The Bedrock provider against the Bedrock stand-in (event-stream framing; SigV4 checked as AWS does)."""

from __future__ import annotations

import asyncio
import json
import socket
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
    sigv4_error,
)
from minichat_local.openai_stub import ERROR_BODY_MARKER, serve_stub, stub_text

MESSAGES = [ChatMessage("system", "be brief"), ChatMessage("user", "hello there, stand-in")]
SECRETS = {"AKIDTESTBEDROCK": "test-secret-not-real"}
T = TypeVar("T")


@pytest.fixture(autouse=True)
def aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dummy credentials, which the stand-in knows: it checks every request's signature."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDTESTBEDROCK")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret-not-real")
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="module")
def stand_in() -> Iterator[tuple[BedrockStub, str]]:
    app = BedrockStub(secrets=SECRETS)
    with serve_stub(app, path="") as url:
        yield app, url


@pytest.fixture
def stub(stand_in: tuple[BedrockStub, str]) -> Iterator[tuple[BedrockStub, str]]:
    app, _ = stand_in
    app.stats = BedrockStubStats()
    app.fail_next = []
    yield stand_in
    # Every request of every test came signed, and the stand-in found the signature right.
    assert app.stats.signature_errors == []
    assert app.stats.signatures_checked == app.stats.requests


def _run(url: str, body: Callable[[BedrockProvider], Awaitable[T]], **options: Any) -> T:
    async def main() -> T:
        options.setdefault("first_token_timeout", 3)
        options.setdefault("idle_timeout", 2)
        provider = BedrockProvider(models=["m"], region="us-east-1", endpoint_url=url, **options)
        # The transport is built before the clock starts (the stream function builds it at cold start): on
        # a loaded machine importing botocore alone can take seconds, which these timeouts must not measure.
        await asyncio.to_thread(provider.transport)
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
    assert app.stats.requests == 2  # one retry of the request, never of a stream under way


@pytest.mark.parametrize(("status", "tries"), [(503, 2), (500, 2), (400, 1), (403, 1), (408, 1)])
def test_only_throttling_and_server_errors_are_retried(
    stub: tuple[BedrockStub, str], status: int, tries: int
) -> None:
    app, url = stub
    _run(url, lambda p: _until_error(p, _request(f"stub-error-{status}")))
    assert app.stats.requests == tries


@pytest.mark.parametrize("status", [429, 503])
def test_a_retry_that_succeeds_delivers_the_whole_answer(stub: tuple[BedrockStub, str], status: int) -> None:
    app, url = stub
    app.fail_next = [status]
    items = _run(url, lambda p: _collect(p, _request("stub-tokens-4")))
    assert "".join(i.text for i in items if isinstance(i, Delta)) == stub_text(4)
    assert items[-2:] == [Finish("stop"), Usage(prompt_tokens(app.stats.last_request), 4)]
    assert app.stats.requests == 2 and app.fail_next == []


def test_a_connection_closed_before_any_answer_is_retried_once() -> None:
    """A server that accepts and closes (as a pooled connection the server just dropped looks)."""
    accepted = 0

    async def body(provider: BedrockProvider) -> tuple[list[StreamItem], Exception]:
        async def close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal accepted
            accepted += 1
            await reader.read(1)
            writer.close()

        server = await asyncio.start_server(close_at_once, sock=listener)
        async with server:
            return await _until_error(provider, _request("m"))

    listener = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    seen, error = _run(url, body)
    assert seen == [] and type(error) is ProviderError and "Could not call Bedrock" in error.message
    assert accepted == 2


def test_a_wrong_secret_is_refused_as_bad_credentials_and_not_retried(
    stub: tuple[BedrockStub, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The stand-in's check can fail: a signature made with another secret is refused, as AWS would."""
    app, url = stub
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    seen, error = _run(url, lambda p: _until_error(p, _request("stub-tokens-3")))
    assert seen == [] and type(error) is ProviderError and "credentials" in error.message
    assert app.stats.signature_errors == ["InvalidSignatureException"] and app.stats.requests == 1
    _assert_safe(error)
    app.stats.signature_errors.clear()


def test_the_request_is_the_one_boto3_sends_and_both_signatures_check(stub: tuple[BedrockStub, str]) -> None:
    """boto3's own ConverseStream request for the same arguments: the same URL (a model id's `:` encoded
    as boto3 encodes it) and JSON body as ours, and the stand-in's check accepts boto3's signature as it
    accepts ours: the check is AWS's algorithm, not an echo of our signer."""
    import boto3

    app, url = stub
    model = "stub-tokens-2:0"  # a version suffix, as in anthropic.claude-v2:1
    sent: dict[str, Any] = {}

    def capture(request: Any, **_: Any) -> None:
        sent.update(url=request.url, body=request.body, headers=dict(request.headers))

    provider = BedrockProvider(models=[model], region="us-east-1", endpoint_url=url)
    client = boto3.session.Session().client("bedrock-runtime", region_name="us-east-1", endpoint_url=url)
    client.meta.events.register("before-send.bedrock-runtime.ConverseStream", capture)
    arguments = provider._converse_arguments(_request(model, temperature=0.5, max_tokens=9))
    events = list(client.converse_stream(**arguments)["stream"])
    client.close()
    assert "".join(e["contentBlockDelta"]["delta"]["text"] for e in events if "contentBlockDelta" in e) == (
        stub_text(2)
    )
    assert app.stats.signatures_checked == 1 and app.stats.last_model == model
    ours, _ = provider.transport().url(model)
    assert sent["url"] == ours == f"{url}/model/stub-tokens-2%3A0/converse-stream"
    del arguments["modelId"]
    assert json.loads(sent["body"]) == arguments
    assert sent["headers"]["Authorization"].startswith(b"AWS4-HMAC-SHA256 Credential=AKIDTESTBEDROCK/")

    items = _run(url, lambda p: _collect(p, _request(model, temperature=0.5, max_tokens=9)))
    assert "".join(i.text for i in items if isinstance(i, Delta)) == stub_text(2)
    assert app.stats.signatures_checked == 2 and app.stats.last_model == model


def test_the_signature_check_refuses_a_tampered_request() -> None:
    """The same signed request, a byte of its body or its path changed: refused."""
    provider = BedrockProvider(models=["m"], region="us-east-1", endpoint_url="http://127.0.0.1:1")
    transport = provider.transport()
    url, _ = transport.url("m:1")
    body = b'{"messages":[]}'
    headers = transport.sign(url, body, asyncio.run(transport.credentials()))
    scope = {
        "method": "POST",
        "path": "/model/m:1/converse-stream",
        "raw_path": b"/model/m%3A1/converse-stream",
        "query_string": b"",
        "headers": [(b"host", b"127.0.0.1:1")]
        + [(name.lower().encode(), value.encode()) for name, value in headers.items()],
    }
    assert sigv4_error(scope, body, SECRETS) is None
    assert sigv4_error(scope, body.replace(b"[]", b"[1]"), SECRETS) == "InvalidSignatureException"
    assert sigv4_error({**scope, "raw_path": b"/model/m:1/converse-stream"}, body, SECRETS) == (
        "InvalidSignatureException"
    )
    assert sigv4_error(scope, body, {"AKIDOTHER": "x"}) == "UnrecognizedClientException"


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
        await asyncio.sleep(0.3)  # the stream waits in its read: Bedrock sends nothing
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


def test_the_event_loop_never_waits_on_bedrock(stub: tuple[BedrockStub, str]) -> None:
    """Eight streams stalled in their reads, the loop keeps ticking every few milliseconds."""
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


def test_one_pool_reuses_its_connections(stub: tuple[BedrockStub, str]) -> None:
    app, url = stub

    async def body(provider: BedrockProvider) -> Any:
        for _ in range(3):
            await _collect(provider, _request("stub-tokens-3"))
        assert provider._http is not None and provider._http.connector is not None
        return provider._http.connector.limit

    limit = _run(url, body, max_streams=7)
    assert app.stats.completed == 3
    assert len(app.stats.clients) == 1  # one keep-alive connection carried the three streams
    assert limit == 7  # MINICHAT_BEDROCK_MAX_STREAMS bounds the pool


def test_expiring_credentials_are_refreshed_off_the_loop(stub: tuple[BedrockStub, str]) -> None:
    """A role's credentials (refreshable) about to expire: botocore's refresh runs in a thread (it calls
    the credentials endpoint), and the request is signed with the new ones."""
    import threading
    from datetime import UTC, datetime, timedelta

    from botocore.credentials import RefreshableCredentials

    app, url = stub
    refreshed_in: list[str] = []

    def metadata(key: str, minutes: int) -> dict[str, str]:
        expiry = datetime.now(UTC) + timedelta(minutes=minutes)
        return {
            "access_key": key,
            "secret_key": SECRETS.get(key, "x"),
            "token": "t",
            "expiry_time": expiry.isoformat(),
        }

    def refresh() -> dict[str, str]:
        refreshed_in.append(threading.current_thread().name)
        return metadata("AKIDTESTBEDROCK", 60)

    async def body(provider: BedrockProvider) -> list[StreamItem]:
        transport = provider.transport()
        # Expiring in 5 minutes: within botocore's mandatory refresh window (10 minutes).
        transport._credentials = RefreshableCredentials.create_from_metadata(
            metadata("AKIDEXPIRING", 5), refresh_using=refresh, method="test"
        )
        return await _collect(provider, _request("stub-tokens-2"))

    items = _run(url, body)
    assert "".join(i.text for i in items if isinstance(i, Delta)) == stub_text(2)
    assert len(refreshed_in) == 1 and refreshed_in[0] != threading.main_thread().name
    assert (app.stats.last_authorization or "").startswith("AWS4-HMAC-SHA256 Credential=AKIDTESTBEDROCK/")
