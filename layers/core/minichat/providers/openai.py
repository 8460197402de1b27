"""OpenAI (or any OpenAI-compatible server), streamed: the official `openai` client's endpoint, headers
and HTTP transport, the body read with the project's SSE decoder."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

from minichat.errors import ProviderError, ProviderTimeout
from minichat.providers.base import Delta, Finish, ProviderRequest, StreamItem, Usage, load_json
from minichat.secrets import fetch_secret_value
from minichat.sse import Decoder

if TYPE_CHECKING:
    from openai import AsyncOpenAI

__all__ = ["OpenAIProvider"]

Transport = Literal["aiohttp", "httpx"]

# The client refuses to start without a key; OpenAI-compatible servers on a private network often
# need none, so a placeholder goes out instead.
_NO_KEY = "no-key"
# How long the body may take to end after [DONE] before the connection is dropped instead of reused.
_DRAIN_SECONDS = 1.0
# OpenAI's finish_reason values that the contract names; the others (content_filter, tool_calls) stay null.
_FINISH = {"stop": Finish("stop"), "length": Finish("length")}
# How long an idle upstream connection is kept for the next stream (as the Bedrock provider keeps its own).
_KEEPALIVE_S = 30.0
# The request body, compact; ASCII, so that any text (a lone surrogate too) has a wire form.
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode


class OpenAIProvider:
    """Streams chat completions; every upstream failure becomes ProviderError / ProviderTimeout."""

    name = "openai"

    def __init__(
        self,
        *,
        models: Sequence[str],
        api_key: str | None = None,
        api_key_secret_arn: str | None = None,
        base_url: str | None = None,
        first_token_timeout: float = 30.0,
        idle_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        transport: Transport = "aiohttp",
        max_tokens_param: str = "max_tokens",
        label: str = "openai",
    ) -> None:
        self.label = label  # which server, in configuration errors (several may be configured)
        self._models = list(models)
        self._api_key = api_key
        # Fetched when the client is built (the stream function's cold start, with preload): a function
        # that only lists models never reads the key, nor needs the permission to.
        self._api_key_secret_arn = api_key_secret_arn
        self._base_url = base_url
        self._first_token_timeout = first_token_timeout
        self._idle_timeout = idle_timeout
        self._connect_timeout = connect_timeout
        self._transport = transport
        # Newer OpenAI models take only `max_completion_tokens`; most compatible servers know only
        # `max_tokens`, hence the default.
        self._max_tokens_param = max_tokens_param
        self._client: AsyncOpenAI | None = None
        self._http: Any = None  # the client's httpx2.AsyncClient
        self._fresh_http: Any = None  # one that keeps no connection, for a request sent again
        self._url = ""
        self._headers: dict[str, str] = {}
        self._timeout: Any = None
        self._session: Any = None  # the aiohttp transport's session (aiohttp.ClientSession)
        self._fresh_session: Any = None  # ... and one that keeps no connection, for a request sent again
        self._session_loop: asyncio.AbstractEventLoop | None = None
        self._proxy: tuple[Any, Any] = (None, None)  # the session's (proxy URL, its BasicAuth) or Nones
        self._client_loop: asyncio.AbstractEventLoop | None = None

    def models(self) -> list[str]:
        """The model ids configured for this provider."""
        return list(self._models)

    def preload(self) -> None:
        """Import the `openai` package and build the client now (≈0.5 s), not on the first stream."""
        self._make_client().chat.completions  # noqa: B018  (the resource modules load on first access)

    def _get_client(self) -> AsyncOpenAI:
        # An aiohttp session belongs to the loop that first uses it, so a client is tied to one loop and
        # remade if the loop changed (as between asyncio.run calls in tests). Built on first use, the
        # `openai` import stays off the cold start of functions that never stream.
        loop = asyncio.get_running_loop()
        client = self._client
        if client is None or self._client_loop not in (None, loop):
            client = self._make_client()
        self._client_loop = loop
        return client

    def _make_client(self) -> AsyncOpenAI:
        import httpx2
        import openai

        if self._api_key is None and self._api_key_secret_arn:
            self._api_key = fetch_secret_value(
                self._api_key_secret_arn, key="apiKey", variable=f"the API key of {self.label}"
            )

        http_client = (
            openai.DefaultAioHttpClient()
            if self._transport == "aiohttp"
            else openai.DefaultAsyncHttpxClient(
                # The client's own limits, with idle connections kept as the aiohttp transport keeps them.
                limits=httpx2.Limits(
                    max_connections=1000, max_keepalive_connections=100, keepalive_expiry=_KEEPALIVE_S
                )
            )
        )
        api_key = self._api_key or _NO_KEY
        self._client = openai.AsyncOpenAI(
            api_key=api_key,
            base_url=self._base_url,
            # A retried stream would send the tokens already delivered a second time.
            max_retries=0,
            # No read timeout in the transport: the first-token and idle deadlines in stream() cover every
            # wait, and a transport read timer would be re-armed on every network read.
            timeout=openai.Timeout(None, connect=self._connect_timeout),
            http_client=http_client,
        )
        # What stream() sends with each request, worked out once: the client's endpoint and headers.
        self._http = http_client
        self._url = f"{self._client.base_url}chat/completions"
        headers = {k: v for k, v in self._client.default_headers.items() if isinstance(v, str)}
        self._headers = {**headers, "Authorization": f"Bearer {api_key}"}
        self._timeout = httpx2.Timeout(None, connect=self._connect_timeout)
        self._fresh_http = None  # made again on first need, on the loop that uses the client
        self._client_loop = None
        return self._client

    async def aclose(self) -> None:
        """Close the HTTP client (its connection pool)."""
        client, self._client, self._client_loop = self._client, None, None
        sessions = (self._session, self._fresh_session)
        self._session = self._fresh_session = None
        fresh_http, self._fresh_http = self._fresh_http, None
        if client is not None:
            await client.close()
        if fresh_http is not None:
            with contextlib.suppress(RuntimeError):  # made on a loop that is gone
                await fresh_http.aclose()
        for session in sessions:
            if session is not None and not session.closed:
                with contextlib.suppress(RuntimeError):  # made on a loop that is gone
                    await session.close()

    @contextlib.asynccontextmanager
    async def _open(self, payload: bytes) -> AsyncIterator[AsyncIterator[bytes]]:
        """POST the request; the response body's blocks as they arrive. Raises _UpstreamStatus for an
        HTTP error (its body is never read), the transport's exceptions for the rest.

        The request goes out with the client's endpoint and headers but not through create(), whose
        per-request machinery (options models, the body's walk against TypedDicts, retries, header
        merging) cost a third of a stream's whole setup for a body that is already in wire form (profiled
        with bench/bench_stream.py). With the aiohttp transport it goes straight to an aiohttp session:
        the openai client's aiohttp transport, under httpx2's client and response, added CPU to every
        request and to every block read.
        """
        if self._transport == "aiohttp":
            import aiohttp

            session = self._aiohttp_session()
            proxy, proxy_auth = self._proxy
            post = functools.partial(
                aiohttp.ClientSession.post,
                url=self._url,
                data=payload,
                headers=self._headers,
                proxy=proxy,
                proxy_auth=proxy_auth,
            )
            try:
                reply = await post(session)
            except aiohttp.ClientConnectionError as exc:
                if isinstance(exc, asyncio.TimeoutError):
                    raise
                reply = await post(self._aiohttp_session(fresh=True))  # see _aiohttp_session
            async with reply:
                if reply.status >= 400:
                    raise _UpstreamStatus(reply.status)
                yield reply.content.iter_any()
            return
        import httpx2

        http = self._http
        request = http.build_request(
            "POST", self._url, content=payload, headers=self._headers, timeout=self._timeout
        )
        try:
            response = await http.send(request, stream=True)
        except (httpx2.NetworkError, httpx2.RemoteProtocolError):
            # Once more, on a new connection, as the aiohttp transport does (see _aiohttp_session).
            if self._fresh_http is None:
                import openai

                self._fresh_http = openai.DefaultAsyncHttpxClient(
                    limits=httpx2.Limits(max_connections=1000, max_keepalive_connections=0)
                )
            response = await self._fresh_http.send(request, stream=True)
        try:
            if response.status_code >= 400:
                raise _UpstreamStatus(response.status_code)
            blocks = response.aiter_bytes()
            try:
                yield blocks
            finally:
                await blocks.aclose()
        finally:
            await response.aclose()

    def _aiohttp_session(self, *, fresh: bool = False) -> Any:
        """This loop's aiohttp session (made on its first stream), as the openai client's transport makes
        it (its TLS context, at most 1,000 connections, proxies from the environment).

        Idle connections are kept _KEEPALIVE_S: a stream that starts within that time of the last one
        skips the connection's setup (a TLS handshake to a remote server), as every stream of a warm
        Lambda container that follows another soon does. Many servers close idle connections sooner
        (uvicorn and Node after 5 s). aiohttp drops such a connection once the event loop has read the
        close; a request that went out on it before (in a burst, the loop runs the requests first) fails
        before any response, and _open sends it once more through the `fresh` session, on a new
        connection that is closed after its one request: the pool's other idle connections, closed by
        the server after the same idle time, are likely broken too. That request never reached the model
        (the openai client retries these as well)."""
        import aiohttp
        import httpx2

        loop = asyncio.get_running_loop()
        if self._session_loop is not loop:  # sessions of another loop (gone, or not ours to use)
            self._session = self._fresh_session = None
            self._session_loop = loop
        session = self._fresh_session if fresh else self._session
        if session is None or session.closed:
            ssl = httpx2.create_ssl_context(trust_env=True)
            connector = (
                aiohttp.TCPConnector(limit=1000, force_close=True, ssl=ssl)
                if fresh
                else aiohttp.TCPConnector(limit=1000, keepalive_timeout=_KEEPALIVE_S, ssl=ssl)
            )
            # No read timeout (the watchdog's deadlines cover every wait), as in the client.
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout)
            # The proxy from the environment, looked up once: with trust_env, aiohttp looks it up, and
            # reads ~/.netrc, in two thread-pool hops on every request.
            session = aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False)
            if fresh:
                self._fresh_session = session
            else:
                self._session = session
                self._proxy = _env_proxy(self._url)
        return session

    async def stream(self, request: ProviderRequest) -> AsyncGenerator[StreamItem, None]:
        """Deltas as the model writes them, the Finish reason, then the provider's exact Usage."""
        import aiohttp  # the HTTP clients (loaded with the openai client): for their exception classes
        import httpx2

        self._get_client()
        loop = asyncio.get_running_loop()
        loads = load_json
        body: dict[str, Any] = {
            "model": request.model,
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.max_tokens is not None:
            body[self._max_tokens_param] = request.max_tokens

        # Until the first token the first-token deadline holds (the role-only opening chunk does not
        # count); after it, each wait gets the idle timeout. Deadlines cover only our own waits, never
        # the consumer's time between two items.
        deadline = loop.time() + self._first_token_timeout
        watchdog = _Watchdog(loop)
        started = connected = finished = False
        try:
            watchdog.wait_until(deadline)
            async with self._open(_ENCODE(body).encode()) as blocks:
                watchdog.done()
                connected = True
                next_block = blocks.__anext__
                decoder = Decoder()
                feed = decoder.feed
                usage: Usage | None = None
                while not finished:
                    watchdog.wait_until(deadline)
                    try:
                        block = await next_block()
                    except StopAsyncIteration:
                        break  # a body that ends without [DONE] ends the answer too, as in the SDK
                    finally:
                        watchdog.done()
                    for _, payload in feed(block):
                        if payload == b"[DONE]":
                            finished = True
                            break
                        chunk = loads(payload)
                        choices = chunk.get("choices")
                        if choices:
                            choice = choices[0]
                            text = (choice.get("delta") or {}).get("content")
                            if text and isinstance(text, str):
                                started = True
                                yield Delta(text)
                            reason = choice.get("finish_reason")
                            if reason and reason in _FINISH:
                                yield _FINISH[reason]
                        # Usage comes in its own chunk (OpenAI), on the last content chunk or, running
                        # totals, on every chunk (some compatible servers): the last one counts.
                        reported = chunk.get("usage")
                        if reported:
                            usage = Usage(
                                input_tokens=int(reported["prompt_tokens"]),
                                output_tokens=int(reported["completion_tokens"]),
                            )
                        elif chunk.get("error"):
                            raise _UpstreamReportedError
                    if started:
                        deadline = loop.time() + self._idle_timeout
                if usage is not None:
                    yield usage
                if finished:
                    # Reading the body to its end lets the connection go back to the pool; a server
                    # that keeps it open after [DONE] only costs the connection.
                    watchdog.wait_until(loop.time() + _DRAIN_SECONDS)
                    async for _ in blocks:
                        pass
                    watchdog.done()
        except asyncio.CancelledError:
            if not watchdog.expired or watchdog.uncancel():
                raise  # the consumer's own cancel: it stays a cancel
            if finished:
                return  # everything arrived; only the drain after [DONE] ran out of time
            if started:
                raise ProviderTimeout(f"the model sent nothing for {self._idle_timeout:g} s") from None
            raise ProviderTimeout(f"the model sent no token within {self._first_token_timeout:g} s") from None
        # Messages are built here, never from the upstream's: its body can quote the request or a part of
        # the API key ("Incorrect API key provided: sk-...").
        except _UpstreamStatus as exc:
            raise ProviderError(f"upstream returned HTTP {exc.status}") from None
        except (httpx2.TimeoutException, aiohttp.ServerTimeoutError) as exc:
            if not connected and _really_timed_out(exc):
                raise ProviderTimeout("the upstream request timed out") from None
            raise ProviderError("could not reach the upstream model server") from None
        except (httpx2.TransportError, aiohttp.ClientError, OSError):
            if not connected:
                raise ProviderError("could not reach the upstream model server") from None
            raise ProviderError("the connection to the upstream model server broke mid-stream") from None
        except _UpstreamReportedError:
            raise ProviderError("the upstream model server reported an error mid-stream") from None
        except (httpx2.HTTPError, ValueError, LookupError, TypeError, AttributeError):
            # A chunk that is not JSON, or JSON that is not a chat.completion.chunk.
            raise ProviderError("the upstream model server sent an invalid response") from None
        finally:
            watchdog.close()


def _env_proxy(url: str) -> tuple[Any, Any]:
    """The proxy the environment names for `url` (HTTPS_PROXY, NO_PROXY, ...; its credentials from
    ~/.netrc when the proxy URL has none), as aiohttp's trust_env finds it; (None, None) for none."""
    from aiohttp.helpers import get_env_proxy_for_url
    from yarl import URL

    try:
        return get_env_proxy_for_url(URL(url))
    except LookupError:
        return None, None


class _UpstreamStatus(Exception):
    """The upstream answered with an HTTP error status (its body is never read)."""

    def __init__(self, status: int) -> None:
        self.status = status


class _UpstreamReportedError(Exception):
    """An {"error": ...} object in the stream (its content is never shown)."""


def _really_timed_out(error: BaseException) -> bool:
    # openai's aiohttp adapter maps every aiohttp connection error, a refused connection included, to a
    # connect *timeout*; the original error, kept in the chain, tells the two apart.
    cause = error.__cause__ or error.__context__
    for _ in range(8):
        if cause is None:
            break
        if isinstance(cause, OSError) and not isinstance(cause, TimeoutError):
            return False
        cause = cause.__cause__ or cause.__context__
    return True


class _Watchdog:
    """Cancels the task waiting on the upstream once a deadline passes; re-armed cheaply on every chunk.

    asyncio.timeout() around each wait costs a context and a timer per read (about 4 µs, as much as
    parsing an unpaced chunk); here a read costs a few attribute writes, and the one timer is moved
    only when it fires before the current deadline.
    """

    __slots__ = ("_armed_for", "_handle", "_loop", "_owner", "_task", "deadline", "expired")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._handle: asyncio.TimerHandle | None = None
        self._armed_for = 0.0
        self._task: asyncio.Task[Any] | None = None  # set only while the task waits on the upstream
        # The task reading the stream (one task reads a stream), looked up on its first wait only.
        self._owner: asyncio.Task[Any] | None = None
        self.deadline = 0.0
        self.expired = False

    def wait_until(self, deadline: float) -> None:
        """Guard the wait that follows (until done()) with `deadline`, in loop time."""
        self.deadline = deadline
        if self._owner is None:
            self._owner = asyncio.current_task()
        self._task = self._owner
        if self._handle is None or self._armed_for > deadline:
            self._arm(deadline)

    def done(self) -> None:
        """The wait is over; the time until the next wait_until() is the consumer's, never timed."""
        self._task = None

    def uncancel(self) -> int:
        """Withdraw the cancel this watchdog requested; the cancels still pending (0: only ours)."""
        task = asyncio.current_task()
        return task.uncancel() if task is not None else 0

    def close(self) -> None:
        """Stop the timer."""
        self._task = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _arm(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._armed_for = when
        self._handle = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._handle = None
        task = self._task
        if task is None:
            return  # nobody is waiting: the next wait_until() arms a new timer
        if self._loop.time() < self.deadline:
            self._arm(self.deadline)  # the deadline moved on since the timer was set
            return
        self.expired = True
        task.cancel()
