"""Amazon Bedrock through boto3's `bedrock-runtime` ConverseStream, with the function's IAM credentials.

boto3 is synchronous. Each stream is read in a worker thread of this provider's own pool (as many threads
as the client has connections, MINICHAT_BEDROCK_MAX_STREAMS), which hands the items over to the event
loop; the loop never waits on boto3. Closing the async generator (a cancel) shuts the stream's socket down
from the loop thread: the blocked read in the worker returns at once and the connection is closed, also
while Bedrock sends nothing. boto3 itself (about 0.15 s to import, 0.1 s more to build the client) loads
on the first stream, or in the background with `preload()`; the module is light.
"""

from __future__ import annotations

import asyncio
import binascii
import collections
import contextlib
import json
import socket
import struct
import threading
from collections.abc import AsyncGenerator, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from minichat.errors import MiniChatError, ProviderError, ProviderTimeout
from minichat.log import get_logger
from minichat.providers.base import ChatMessage, Delta, Finish, ProviderRequest, StreamItem, Usage

if TYPE_CHECKING:
    from concurrent.futures import Future

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
# Transport failures, by exception class name (botocore's and urllib3's share some names).
_TRANSPORT_MESSAGES = {
    "NoCredentialsError": "No AWS credentials were found for Bedrock.",
    "NoRegionError": "No AWS region is configured for Bedrock.",
    "EndpointConnectionError": "Could not reach Bedrock.",
    "ConnectTimeoutError": "Could not reach Bedrock.",
    "NewConnectionError": "Could not reach Bedrock.",
}
_READ_TIMEOUTS = ("ReadTimeoutError", "ReadTimeout", "TimeoutError")
# Bedrock's stop reasons that mean the answer is whole, and the one that means it was cut at maxTokens.
_STOPPED = frozenset({"end_turn", "stop_sequence"})
_LENGTH = "max_tokens"
# Most Bedrock models take a temperature from 0 to 1 (the contract allows up to 2).
_MAX_TEMPERATURE = 1.0


class _End:
    """The worker read the whole stream."""


_END = _End()


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
        self._client: Any = None
        self._client_lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        self._warming: Future[Any] | None = None

    def models(self) -> list[str]:
        """The model ids configured for Bedrock."""
        return list(self._models)

    def preload(self) -> None:
        """Import boto3 and build the client in a worker thread, off the cold start's critical path."""
        if self._client is None and self._warming is None:
            self._warming = self._pool().submit(self.client)

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            # One thread per stream being read: each blocks on its socket between events.
            self._executor = ThreadPoolExecutor(
                max_workers=self._max_streams, thread_name_prefix="minichat-bedrock"
            )
        return self._executor

    def client(self) -> Any:
        """The process's boto3 `bedrock-runtime` client, built on first use (thread-safe)."""
        with self._client_lock:
            if self._client is None:
                import boto3
                from botocore.config import Config

                self._client = boto3.session.Session().client(
                    "bedrock-runtime",
                    region_name=self._region,
                    endpoint_url=self._endpoint_url,
                    config=Config(
                        connect_timeout=self._connect_timeout,
                        # A backstop only: our own first-token and idle deadlines end a silent stream
                        # first; this frees the worker if a socket read were ever left hanging.
                        read_timeout=max(self._first_token_timeout, self._idle_timeout) + 5,
                        max_pool_connections=self._max_streams,
                        tcp_keepalive=True,
                        # botocore retries only the request, before any event arrived (never a stream
                        # half-delivered); one retry absorbs a blip without making a user wait long.
                        retries={"mode": "standard", "total_max_attempts": 2},
                        # The arguments are built here, never taken from a client; Bedrock checks them
                        # anyway (ValidationException). Skipping botocore's walk of the input shape saves
                        # a fifth of each call's CPU (about 0.35 ms), in a thread that shares the GIL.
                        parameter_validation=False,
                    ),
                )
            return self._client

    async def aclose(self) -> None:
        """Stop the worker threads (a running read ends with its stream) and close the client's pool."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        client, self._client = self._client, None
        if client is not None:
            client.close()

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
        channel = _Channel(loop)
        call = _Call()
        arguments = self._converse_arguments(request)
        self._pool().submit(self._read, arguments, channel, call)
        # Until the first token the first-token deadline holds; after it, each wait gets the idle timeout.
        # Deadlines cover only our own waits, never the consumer's time between two items.
        deadline = loop.time() + self._first_token_timeout
        started = False
        try:
            while True:
                try:
                    item = await channel.get(deadline)
                except TimeoutError:
                    if started:
                        message = f"the model sent nothing for {self._idle_timeout:g} s"
                    else:
                        message = f"the model sent no token within {self._first_token_timeout:g} s"
                    raise ProviderTimeout(message) from None
                if item is _END:
                    return
                if isinstance(item, MiniChatError):
                    raise item from None
                yield item
                if type(item) is Delta:
                    started = True
                if started:
                    deadline = loop.time() + self._idle_timeout
        finally:
            call.abort()  # a no-op once the worker is done; else the socket is shut down now

    def _read(self, arguments: dict[str, Any], channel: _Channel, call: _Call) -> None:
        """The worker: call ConverseStream and hand each item to the loop, until the end or an abort."""
        event_stream: Any = None
        clean = False
        try:
            client = self.client()
            if call.aborted:
                return
            event_stream = client.converse_stream(**arguments)["stream"]
            if not call.attach(event_stream):
                return
            put = channel.put
            ended = False
            for event_type, body in _events(event_stream):
                if event_type == "contentBlockDelta":
                    text = body["delta"].get("text")
                    if text:
                        put(Delta(text))
                elif event_type == "messageStop":
                    reason = body.get("stopReason")
                    if reason == _LENGTH:
                        put(Finish("length"))
                    elif reason in _STOPPED:
                        put(Finish("stop"))
                elif event_type == "metadata":
                    usage = body.get("usage") or {}
                    # The last event: the answer is whole. The body's end is still read (the connection
                    # then goes back to the pool, where an abort must no longer touch it).
                    call.finish()
                    put(Usage(int(usage["inputTokens"]), int(usage["outputTokens"])))
                    put(_END)
                    ended = True
            call.finish()
            clean = True
            if not ended:
                put(_END)
        except Exception as exc:
            if call.aborted:
                return  # the consumer left; what the read raised after the shutdown means nothing
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody left to tell
                channel.put(_as_provider_error(exc, connected=event_stream is not None))
        finally:
            call.finish()
            if event_stream is not None and not clean:
                event_stream.close()  # cut mid-body: the connection is dropped, not reused


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
    """A safe error for what the worker caught: the AWS error code picks the message, never its text."""
    response = getattr(exc, "response", None)
    if isinstance(exc, _StreamException):
        code, status = exc.code, None
    elif isinstance(response, dict) and "Error" in response:
        code = str(response["Error"].get("Code") or "")
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    else:
        names = [cls.__name__ for cls in type(exc).__mro__]
        log.warning("bedrock transport error", error=names[0], connected=connected)
        if any(name in _READ_TIMEOUTS for name in names):
            return ProviderTimeout("Bedrock stopped answering (read timed out).")
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


def _events(event_stream: Any) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event type, payload) of each event of a ConverseStream body.

    botocore's EventStream parses each event against the service model (about 35 µs of CPU an event) and
    reads it through urllib3's chunked reader (about as much again, and a socket read or two more per
    event), in a thread that shares the GIL with the event loop. Here the body is read from the
    http.client response under botocore's urllib3 one (read1: what has arrived, chunked framing undone),
    the event-stream framing is checked (both CRCs) and the JSON payload loaded as it is: a third of the
    CPU and of the context switches per event. Without those attributes (another botocore or urllib3),
    botocore's own parsing serves.
    """
    raw: Any = getattr(event_stream, "_raw_stream", None)
    read1 = getattr(getattr(raw, "_fp", None), "read1", None)
    if read1 is None or not hasattr(raw, "release_conn"):
        for event in event_stream:
            yield from event.items()
        return
    decoder = EventStreamDecoder()
    loads = json.loads
    while block := read1(65536):
        for headers, payload in decoder.feed(block):
            if headers.get(":message-type") != "event":
                raise _StreamException(
                    str(headers.get(":exception-type") or headers.get(":error-code") or "")
                )
            yield str(headers.get(":event-type")), loads(payload)
    if decoder.pending:
        raise _CorruptStream("the body ended inside a message")
    raw.release_conn()  # read to its end: the connection goes back to the pool for the next stream


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


class _Call:
    """One stream's shared state between the loop (abort) and its worker (attach, finish)."""

    __slots__ = ("_lock", "_stream", "aborted", "finished")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stream: Any = None
        self.aborted = False
        self.finished = False

    def attach(self, event_stream: Any) -> bool:
        """The worker has the response; False if the consumer already left (the worker closes it)."""
        with self._lock:
            self._stream = event_stream
            return not self.aborted

    def finish(self) -> None:
        """The body is read to its end: its connection goes back to the pool and is not ours to cut."""
        with self._lock:
            self.finished = True

    def abort(self) -> None:
        """From the loop: the consumer left. Shut the socket down so the worker's blocked read returns
        and the server sees the connection close now; the worker closes the response."""
        with self._lock:
            if self.aborted:
                return
            self.aborted = True
            if self._stream is None or self.finished:
                return
            # botocore's EventStream wraps urllib3's response, which holds the connection. Closing the
            # response here would wait for the worker's read (the buffered reader's lock); shutdown()
            # does not, and interrupts that read.
            raw = getattr(self._stream, "_raw_stream", None)
            sock = getattr(getattr(raw, "_connection", None), "sock", None)
            if sock is not None:
                with contextlib.suppress(OSError):  # already closed by the peer
                    sock.shutdown(socket.SHUT_RDWR)


class _Channel:
    """Items from a worker thread to the loop. The worker wakes the loop only when it waits: a burst
    of events costs one wake-up, not one each."""

    __slots__ = ("_items", "_lock", "_loop", "_waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: collections.deque[object] = collections.deque()
        self._lock = threading.Lock()
        self._waiter: asyncio.Future[None] | None = None

    def put(self, item: object) -> None:
        """From the worker thread."""
        with self._lock:
            self._items.append(item)
            waiter, self._waiter = self._waiter, None
        if waiter is not None:
            self._loop.call_soon_threadsafe(_wake, waiter)

    async def get(self, deadline: float) -> object:
        """The next item; TimeoutError if none came by `deadline` (loop time)."""
        with self._lock:
            if self._items:
                return self._items.popleft()
            waiter = self._waiter = self._loop.create_future()
        timer = self._loop.call_at(deadline, _expire, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None
        return self._items.popleft()


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())
