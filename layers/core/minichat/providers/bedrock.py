"""Amazon Bedrock's ConverseStream, called from the event loop, with the function's IAM credentials.

No thread per stream and no boto3 call: the request is built here as boto3 would build it (REST-JSON,
`POST {endpoint}/model/{modelId}/converse-stream`, the Converse arguments as the JSON body), signed with
botocore's SigV4Auth (signing name `bedrock`) and sent with aiohttp, the OpenAI path's HTTP client; the
event loop reads the body and decodes its event-stream framing here (CRCs checked). Per relayed token
that is about a third of the CPU of a worker thread blocked on boto3's socket, and a stream's set-up a
quarter of botocore's per-call machinery (bench/bench_bedrock.py). botocore still finds the credentials
(its usual chain; frozen per request, refreshed as botocore refreshes them) and the endpoint; it and
aiohttp load in a background thread with `preload()` (the stream function's cold start) or on the first
stream: this module itself is light, and a function that only lists models never imports botocore.

As botocore's standard retry mode with two attempts did, the request is sent once more (after a jittered
pause) when it fails before any event: throttling, a 5xx, a connection error. A stream under way is never
retried. Closing the async generator (a cancel) closes the connection at once, also while Bedrock sends
nothing; a stream read to its end gives its connection back to the pool (MINICHAT_BEDROCK_MAX_STREAMS
connections at most: more streams wait for one, within their first-token deadline).
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import json
import random
import struct
import threading
from collections.abc import AsyncGenerator, Mapping, Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from minichat.errors import MiniChatError, ProviderError, ProviderTimeout
from minichat.log import get_logger
from minichat.providers.base import ChatMessage, Delta, Finish, ProviderRequest, StreamItem, Usage, load_json

if TYPE_CHECKING:
    import aiohttp

__all__ = ["BedrockProvider", "EventStreamDecoder", "converse_messages"]

log = get_logger("minichat.providers.bedrock")

# Error codes Bedrock answers with (HTTP `x-amzn-ErrorType`, or an in-stream exception event, whose
# name starts in lower case) → the message a user sees. The AWS text is never shown: it can name the
# account, the role or the model ARN.
_ERROR_MESSAGES = {
    "ThrottlingException": "Bedrock is throttling requests to this model; try again shortly.",
    "ServiceQuotaExceededException": "The Bedrock quota for this model is used up; try again later.",
    "ServiceUnavailableException": "Bedrock is unavailable right now; try again shortly.",
    "InternalServerException": "Bedrock had an internal error; try again shortly.",
    "ModelTimeoutException": "The model took too long to answer; try again.",
    "ModelNotReadyException": "The model is not ready yet; try again shortly.",
    "ModelErrorException": "The model failed while answering.",
    "ModelStreamErrorException": "The model failed while streaming its answer.",
    "ValidationException": "Bedrock refused the request as invalid for this model.",
    "AccessDeniedException": (
        "Access to this Bedrock model is denied: enable model access in the Bedrock console and allow "
        "the stream function to invoke it."
    ),
    "ResourceNotFoundException": "Bedrock does not offer this model in the configured region.",
    "UnrecognizedClientException": "Bedrock refused the function's AWS credentials.",
    "ExpiredTokenException": "Bedrock refused the function's AWS credentials.",
    "InvalidSignatureException": "Bedrock refused the function's AWS credentials.",
}
# Failures before or outside an answer, by exception class name (aiohttp's, botocore's, ours).
_TRANSPORT_MESSAGES = {
    "NoCredentialsError": "No AWS credentials were found for Bedrock.",
    "NoRegionError": "No AWS region is configured for Bedrock.",
    "ClientConnectorError": "Could not reach Bedrock.",
    "ConnectionTimeoutError": "Could not reach Bedrock.",
}
# Bedrock's stop reasons that mean the answer is whole, and the one that means it was cut at maxTokens.
_STOPPED = frozenset({"end_turn", "stop_sequence"})
_LENGTH = "max_tokens"
# Most Bedrock models take a temperature from 0 to 1 (the contract allows up to 2).
_MAX_TEMPERATURE = 1.0


# Failures of the request before any event that are worth one more try (botocore's standard retry mode):
# throttling (a pause of up to a second first), and transient errors (up to 50 ms).
_THROTTLING_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottledException",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "TransactionInProgressException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "LimitExceededException",
        "RequestThrottled",
        "SlowDown",
        "PriorRequestNotComplete",
        "EC2ThrottledException",
    }
)
_THROTTLING_STATUSES = frozenset({429})
_TRANSIENT_CODES = frozenset({"RequestTimeout", "RequestTimeoutException", "PriorRequestNotComplete"})
_TRANSIENT_STATUSES = frozenset({500, 502, 503, 504})
_THROTTLING_PAUSE = 1.0
_TRANSIENT_PAUSE = 0.05
_SIGNING_NAME = "bedrock"  # bedrock-runtime signs as `bedrock`
_MAX_ERROR_BODY = 64 * 1024
# How long the body may take to end after `metadata` before the connection is dropped instead of reused.
_DRAIN_SECONDS = 1.0
# Idle pooled connections are kept this long (AWS endpoints keep them about a minute).
_KEEPALIVE_SECONDS = 30.0


class NoCredentialsError(Exception):
    """botocore's credential chain found nothing."""


class _HttpError(Exception):
    """Bedrock answered the request with an error: its code (never its text) and HTTP status."""

    def __init__(self, code: str, status: int) -> None:
        super().__init__(code)
        self.code = code
        self.status = status

    @property
    def pause(self) -> float | None:
        """How long to wait before the retry, None if this error is not retried."""
        if self.code in _THROTTLING_CODES or self.status in _THROTTLING_STATUSES:
            return random.random() * _THROTTLING_PAUSE
        if self.code in _TRANSIENT_CODES or self.status in _TRANSIENT_STATUSES:
            return random.random() * _TRANSIENT_PAUSE
        return None


class _Transport:
    """What botocore gives a stream, resolved once per process in a thread (it reads files and the
    environment, and may call a credentials endpoint): the endpoint, the credentials, the signer."""

    def __init__(self, region: str, endpoint_url: str | None) -> None:
        import aiohttp  # noqa: F401  (loaded here, off the event loop and the cold start)
        import botocore.session
        import yarl
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest

        session = botocore.session.Session()
        if endpoint_url is None:
            # botocore's own resolution (partition, FIPS and dual-stack settings, AWS_ENDPOINT_URL_*): a
            # client built once for its endpoint, never called.
            client = session.create_client("bedrock-runtime", region_name=region)
            endpoint_url = str(client.meta.endpoint_url)
            client.close()
        self.endpoint = endpoint_url.rstrip("/")
        self.region = region
        self._session = session
        self._credentials: Any = session.get_credentials()
        self._sigv4 = SigV4Auth
        self._aws_request = AWSRequest
        self._url = yarl.URL

    def url(self, model: str) -> tuple[str, Any]:
        """The operation's URL as signed (the model id percent-encoded, `:` included) and as sent."""
        url = f"{self.endpoint}/model/{quote(model, safe='')}/converse-stream"
        return url, self._url(url, encoded=True)  # encoded: yarl would otherwise turn %3A back into ':'

    async def credentials(self) -> Any:
        """Frozen credentials for one request. Refreshable ones (a role's) are refreshed as botocore does,
        in a thread when due (a call to the credentials endpoint); nothing found is asked again."""
        credentials = self._credentials
        if credentials is None:
            credentials = self._credentials = await asyncio.to_thread(self._session.get_credentials)
            if credentials is None:
                raise NoCredentialsError()
        refresh_needed = getattr(credentials, "refresh_needed", None)
        if refresh_needed is not None and refresh_needed():
            return await asyncio.to_thread(credentials.get_frozen_credentials)
        return credentials.get_frozen_credentials()

    def sign(self, url: str, body: bytes, credentials: Any) -> dict[str, str]:
        """The request's headers, SigV4-signed as boto3 signs ConverseStream."""
        request = self._aws_request(
            method="POST", url=url, data=body, headers={"Content-Type": "application/json"}
        )
        self._sigv4(credentials, _SIGNING_NAME, self.region).add_auth(request)
        return dict(request.headers.items())


class BedrockProvider:
    """Streams Converse answers; every failure becomes ProviderError / ProviderTimeout."""

    name = "bedrock"
    label = "bedrock (MINICHAT_BEDROCK_MODELS)"

    def __init__(
        self,
        *,
        models: Sequence[str],
        region: str,
        endpoint_url: str | None = None,
        max_streams: int = 128,
        first_token_timeout: float = 60.0,
        idle_timeout: float = 60.0,
        connect_timeout: float = 10.0,
        max_output_tokens: Mapping[str, int] | None = None,
    ) -> None:
        self._models = list(models)
        self._region = region
        self._endpoint_url = endpoint_url
        self._max_streams = max_streams
        self._first_token_timeout = first_token_timeout
        self._idle_timeout = idle_timeout
        self._connect_timeout = connect_timeout
        self._max_output_tokens = dict(max_output_tokens or {})
        self._lock = threading.Lock()
        self._warming: Future[_Transport] | None = None
        self._transport: _Transport | None = None
        self._http: aiohttp.ClientSession | None = None
        self._http_loop: asyncio.AbstractEventLoop | None = None

    def models(self) -> list[str]:
        """The model ids configured for Bedrock."""
        return list(self._models)

    def preload(self) -> None:
        """Load botocore and aiohttp and resolve the endpoint and credentials in a background thread, off
        the cold start's critical path."""
        self._warm()

    def _warm(self) -> Future[_Transport]:
        with self._lock:
            if self._warming is None:
                future: Future[_Transport] = Future()

                def build() -> None:
                    try:
                        future.set_result(_Transport(self._region, self._endpoint_url))
                    except BaseException as exc:  # handed to every stream that waits for it
                        future.set_exception(exc)

                threading.Thread(target=build, name="minichat-bedrock-preload", daemon=True).start()
                self._warming = future
            return self._warming

    def transport(self) -> _Transport:
        """The process's transport, built on first use (blocks: for threads and tests)."""
        return self._warm().result()

    async def _ready(self) -> tuple[_Transport, aiohttp.ClientSession]:
        transport = self._transport
        if transport is None:
            transport = self._transport = await asyncio.wrap_future(self._warm())
        # An aiohttp session belongs to the loop that made it: one per loop (a process has one; tests run
        # several in turn).
        loop = asyncio.get_running_loop()
        http = self._http
        if http is None or self._http_loop is not loop:
            import aiohttp

            http = self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=self._max_streams, limit_per_host=0, keepalive_timeout=_KEEPALIVE_SECONDS
                ),
                # No read timeout in the transport: the first-token and idle deadlines in stream() cover
                # every wait, and a transport read timer would be re-armed on every network read.
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout),
            )
            self._http_loop = loop
        return transport, http

    async def aclose(self) -> None:
        """Close the connection pool (on the loop that made it)."""
        http, self._http = self._http, None
        if http is not None and self._http_loop is asyncio.get_running_loop():
            await http.close()

    def _converse_arguments(self, request: ProviderRequest) -> dict[str, Any]:
        system, messages = converse_messages(request.messages)
        arguments: dict[str, Any] = {"modelId": request.model, "messages": messages}
        if system:
            arguments["system"] = system
        inference: dict[str, Any] = {}
        if request.temperature is not None:
            inference["temperature"] = min(float(request.temperature), _MAX_TEMPERATURE)
        limit = self._max_output_tokens.get(request.model)
        if request.max_tokens is not None:
            # More than the model can write is a ValidationException: ask for its most instead.
            inference["maxTokens"] = min(request.max_tokens, limit) if limit else request.max_tokens
        if inference:
            arguments["inferenceConfig"] = inference
        return arguments

    async def stream(self, request: ProviderRequest) -> AsyncGenerator[StreamItem, None]:
        """Deltas as the model writes them, a Finish from messageStop, then the metadata's exact Usage."""
        loop = asyncio.get_running_loop()
        arguments = self._converse_arguments(request)
        del arguments["modelId"]  # it travels in the path
        body = json.dumps(arguments, separators=(",", ":")).encode()
        # Until the first token the first-token deadline holds (the request, its retry and the wait for a
        # pooled connection included); after it, each wait gets the idle timeout. Deadlines cover only
        # our own waits, never the consumer's time between two items.
        deadline = loop.time() + self._first_token_timeout
        started = ended = whole = False
        response: aiohttp.ClientResponse | None = None
        try:
            timer = asyncio.timeout_at(deadline)
            try:
                async with timer:
                    response = await self._open(request.model, body)
            except TimeoutError:
                if timer.expired():
                    raise ProviderTimeout(self._silence(started)) from None
                raise
            content = response.content
            decoder = EventStreamDecoder()
            loads = load_json
            while True:
                timer = asyncio.timeout_at(deadline)
                try:
                    async with timer:
                        block = await content.readany()
                except TimeoutError:
                    if not timer.expired():
                        raise
                    if ended:
                        break  # the answer is whole; the connection is dropped, not reused
                    raise ProviderTimeout(self._silence(started)) from None
                if not block:
                    if decoder.pending:
                        raise _CorruptStream("the body ended inside a message")
                    whole = True
                    break
                for headers, payload in decoder.feed(block):
                    if headers.get(":message-type") != "event":
                        raise _StreamException(
                            str(headers.get(":exception-type") or headers.get(":error-code") or "")
                        )
                    event_type = headers.get(":event-type")
                    if event_type == "contentBlockDelta":
                        text = loads(payload)["delta"].get("text")
                        if text:
                            started = True
                            yield Delta(text)
                    elif event_type == "messageStop":
                        reason = loads(payload).get("stopReason")
                        if reason == _LENGTH:
                            yield Finish("length")
                        elif reason in _STOPPED:
                            yield Finish("stop")
                    elif event_type == "metadata" and not ended:
                        usage = loads(payload).get("usage") or {}
                        ended = True
                        yield Usage(int(usage["inputTokens"]), int(usage["outputTokens"]))
                if ended:
                    # The last event: the answer is whole. The body's end is still read (normally there
                    # already), so the connection can go back to the pool.
                    deadline = loop.time() + _DRAIN_SECONDS
                elif started:
                    deadline = loop.time() + self._idle_timeout
        except MiniChatError:
            raise
        except Exception as exc:
            raise _as_provider_error(exc, connected=response is not None) from None
        finally:
            if response is not None:
                if whole:
                    response.release()  # read to its end: the connection serves the next stream
                else:
                    response.close()  # cut mid-body (a cancel, an error): the connection is closed now

    def _silence(self, started: bool) -> str:
        if started:
            return f"the model sent nothing for {self._idle_timeout:g} s"
        return f"the model sent no token within {self._first_token_timeout:g} s"

    async def _open(self, model: str, body: bytes) -> aiohttp.ClientResponse:
        """The signed request, sent once more after a failure before any event; the 200 response."""
        import aiohttp

        transport, http = await self._ready()
        url, target = transport.url(model)
        for attempt in (1, 2):
            headers = transport.sign(url, body, await transport.credentials())
            try:
                response = await http.post(target, data=body, headers=headers)
            except aiohttp.ClientConnectionError as exc:
                # Refused, reset, a keep-alive connection the server had just closed: nothing was read.
                if attempt == 2:
                    raise
                log.info("bedrock request retried", error=type(exc).__name__)
                pause = random.random() * _TRANSIENT_PAUSE
            else:
                if response.status == 200:
                    return response
                error = await _http_error(response)
                pause_or_none = error.pause
                if attempt == 2 or pause_or_none is None:
                    raise error
                log.info("bedrock request retried", code=error.code[:80], status=error.status)
                pause = pause_or_none
            await asyncio.sleep(pause)
        raise AssertionError("unreachable")


async def _http_error(response: aiohttp.ClientResponse) -> _HttpError:
    """The error code of a non-200 answer, as botocore's REST-JSON parser finds it: the
    `x-amzn-ErrorType` header, else the JSON body's `__type` (or `code`). Its message is not kept."""
    raw = b""
    with contextlib.suppress(Exception):  # a body cut short: the status and the header still tell
        while len(raw) < _MAX_ERROR_BODY and (block := await response.content.read(_MAX_ERROR_BODY)):
            raw += block
    if response.content.at_eof():
        response.release()  # read to its end: the connection serves the retry or the next stream
    else:
        response.close()
    code = response.headers.get("x-amzn-ErrorType", "").split(":")[0].strip()
    if not code and raw:
        try:
            document = json.loads(raw)
        except ValueError:
            document = None
        if isinstance(document, dict):
            code = str(document.get("__type") or document.get("code") or "").rsplit("#", 1)[-1]
    return _HttpError(code, response.status)


def converse_messages(messages: Sequence[ChatMessage]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(system, messages) in Converse form. Converse wants the turns to alternate, starting with a user
    turn, and no empty text: consecutive turns of one role are joined (a failed answer leaves two user
    messages in a row), empty ones dropped, and a leading assistant turn (left by trimming) dropped."""
    system = [{"text": m.content} for m in messages if m.role == "system" and m.content]
    turns: list[dict[str, Any]] = []
    for message in messages:
        if message.role == "system" or not message.content.strip():
            continue
        if not turns and message.role != "user":
            continue
        if turns and turns[-1]["role"] == message.role:
            turns[-1]["content"][0]["text"] += "\n\n" + message.content
        else:
            turns.append({"role": message.role, "content": [{"text": message.content}]})
    return system, turns


def _as_provider_error(exc: Exception, *, connected: bool) -> MiniChatError:
    """A safe error for what the stream caught: the AWS error code picks the message, never its text."""
    if isinstance(exc, _StreamException):
        code, status = exc.code, None
    elif isinstance(exc, _HttpError):
        code, status = exc.code, exc.status
    else:
        names = [cls.__name__ for cls in type(exc).__mro__]
        log.warning("bedrock transport error", error=names[0], connected=connected)
        for name in names:
            if name in _TRANSPORT_MESSAGES:
                return ProviderError(_TRANSPORT_MESSAGES[name])
        if isinstance(exc, _CorruptStream | ValueError | LookupError | TypeError):
            return ProviderError("Bedrock sent a response that could not be read.")
        if connected:
            return ProviderError("The connection to Bedrock broke mid-stream.")
        return ProviderError("Could not call Bedrock.")
    code = code[:1].upper() + code[1:]  # in-stream exceptions are named `throttlingException`
    log.warning("bedrock error", code=code[:80], status=status)
    return ProviderError(
        _ERROR_MESSAGES.get(code) or f"Bedrock returned an error (HTTP {status or 'unknown'})."
    )


# --- the event stream ---------------------------------------------------------------------------------

_PRELUDE = struct.Struct("!III")
_MAX_MESSAGE = 24 * 1024 * 1024  # an event-stream message is at most 16 MiB of payload plus headers
# Header value types (0 true, 1 false: no bytes) and the size of the fixed-size ones.
_FIXED_HEADER_SIZES = {0: 0, 1: 0, 2: 1, 3: 2, 4: 4, 5: 8, 8: 8, 9: 16}
_BYTES, _STRING = 6, 7


class _StreamException(Exception):
    """An exception message in the stream (`:message-type` exception or error); its text is not kept."""

    def __init__(self, code: str) -> None:
        super().__init__(code)
        self.code = code


class _CorruptStream(Exception):
    """Bytes that are not an event stream (a length out of bounds, a CRC mismatch)."""


class EventStreamDecoder:
    """AWS event-stream framing (application/vnd.amazon.eventstream): bytes in, (headers, payload) out."""

    __slots__ = ("_buffer",)

    def __init__(self) -> None:
        self._buffer = b""

    @property
    def pending(self) -> int:
        """Bytes received that do not make a whole message yet."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[tuple[dict[str, Any], bytes]]:
        """The whole messages `data` completes, CRCs checked; _CorruptStream when the framing is broken."""
        buffer = self._buffer + data if self._buffer else data
        view = memoryview(buffer)
        messages = []
        start, size = 0, len(buffer)
        while size - start >= 16:
            total, headers_length, prelude_crc = _PRELUDE.unpack_from(buffer, start)
            if binascii.crc32(view[start : start + 8]) != prelude_crc:
                raise _CorruptStream("prelude CRC mismatch")
            if not 16 + headers_length <= total <= _MAX_MESSAGE:
                raise _CorruptStream("message length out of bounds")
            end = start + total
            if end > size:
                break
            if binascii.crc32(view[start : end - 4]) != int.from_bytes(buffer[end - 4 : end], "big"):
                raise _CorruptStream("message CRC mismatch")
            payload_start = start + 12 + headers_length
            messages.append((_headers(buffer, start + 12, payload_start), buffer[payload_start : end - 4]))
            start = end
        self._buffer = buffer[start:]
        return messages


def _headers(data: bytes, position: int, end: int) -> dict[str, Any]:
    headers: dict[str, Any] = {}
    while position < end:
        name_length = data[position]
        name = data[position + 1 : position + 1 + name_length].decode()
        position += 1 + name_length
        kind = data[position]
        position += 1
        if kind in (_BYTES, _STRING):
            length = int.from_bytes(data[position : position + 2], "big")
            value = data[position + 2 : position + 2 + length]
            headers[name] = value.decode() if kind == _STRING else value
            position += 2 + length
        elif kind in _FIXED_HEADER_SIZES:
            position += _FIXED_HEADER_SIZES[kind]  # types Bedrock does not send in the headers read here
        else:
            raise _CorruptStream("unknown header type")
    if position != end:
        raise _CorruptStream("headers overrun their length")
    return headers
