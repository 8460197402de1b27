"""OpenAI (or any OpenAI-compatible server) through the official `openai` client, streamed."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from typing import TYPE_CHECKING, Any, Literal

from minichat.errors import ProviderError, ProviderTimeout
from minichat.providers.base import Delta, ProviderRequest, StreamItem, Usage

if TYPE_CHECKING:
    from openai import AsyncOpenAI

__all__ = ["OpenAIProvider"]

Transport = Literal["aiohttp", "httpx"]

# The client refuses to start without a key; OpenAI-compatible servers on a private network often
# need none, so a placeholder goes out instead.
_NO_KEY = "no-key"


class OpenAIProvider:
    """Streams chat completions; every upstream failure becomes ProviderError / ProviderTimeout."""

    name = "openai"

    def __init__(
        self,
        *,
        models: Sequence[str],
        api_key: str | None = None,
        base_url: str | None = None,
        first_token_timeout: float = 30.0,
        idle_timeout: float = 30.0,
        connect_timeout: float = 10.0,
        transport: Transport = "aiohttp",
        max_tokens_param: str = "max_tokens",
    ) -> None:
        self._models = list(models)
        self._api_key = api_key
        self._base_url = base_url
        self._first_token_timeout = first_token_timeout
        self._idle_timeout = idle_timeout
        self._connect_timeout = connect_timeout
        self._transport = transport
        # Newer OpenAI models take only `max_completion_tokens`; most compatible servers know only
        # `max_tokens`, hence the default.
        self._max_tokens_param = max_tokens_param
        self._client: AsyncOpenAI | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None

    def models(self) -> list[str]:
        """The model ids configured for this provider."""
        return list(self._models)

    def _get_client(self) -> AsyncOpenAI:
        # An aiohttp session belongs to the loop that created it, so the client is made on first use
        # inside the running loop (and remade if the loop changed, as between asyncio.run calls in tests).
        # Importing `openai` here also keeps it off the cold start of functions that never stream.
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            import openai

            http_client = (
                openai.DefaultAioHttpClient() if self._transport == "aiohttp" else openai.DefaultAsyncHttpxClient()
            )
            self._client = openai.AsyncOpenAI(
                api_key=self._api_key or _NO_KEY,
                base_url=self._base_url,
                # A retried stream would send the tokens already delivered a second time.
                max_retries=0,
                # No read timeout in the transport: the first-token and idle deadlines below cover every
                # wait, and a transport read timer would be re-armed on every network read.
                timeout=openai.Timeout(None, connect=self._connect_timeout),
                http_client=http_client,
            )
            self._client_loop = loop
        return self._client

    async def aclose(self) -> None:
        """Close the HTTP client (its connection pool)."""
        client, self._client, self._client_loop = self._client, None, None
        if client is not None:
            await client.close()

    async def stream(self, request: ProviderRequest) -> AsyncGenerator[StreamItem, None]:
        """Deltas as the model writes them, then the provider's exact Usage."""
        import openai  # already loaded by _get_client; here for the exception classes

        client = self._get_client()
        loop = asyncio.get_running_loop()
        params: dict[str, Any] = {
            "model": request.model,
            "messages": [{"role": m.role, "content": m.content} for m in request.messages],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.temperature is not None:
            params["temperature"] = request.temperature
        if request.max_tokens is not None:
            params[self._max_tokens_param] = request.max_tokens

        # Until the first token the first-token deadline holds (the role-only opening chunk does not
        # count); after it, each wait gets the idle timeout. Deadlines cover only our own waits, never
        # the consumer's time between two items.
        deadline = loop.time() + self._first_token_timeout
        started = False
        upstream = None
        try:
            async with asyncio.timeout_at(deadline):
                upstream = await client.chat.completions.create(**params)
            next_chunk = upstream.__anext__
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        chunk = await next_chunk()
                except StopAsyncIteration:
                    break
                choices = chunk.choices
                if choices:
                    text = choices[0].delta.content
                    if text:
                        started = True
                        yield Delta(text)
                usage = chunk.usage
                if usage is not None:
                    yield Usage(input_tokens=usage.prompt_tokens, output_tokens=usage.completion_tokens)
                if started:
                    deadline = loop.time() + self._idle_timeout
        # Messages are built here, never from the upstream error: its body can quote the request or a
        # part of the API key ("Incorrect API key provided: sk-...").
        except TimeoutError:
            if started:
                raise ProviderTimeout(f"the model sent nothing for {self._idle_timeout:g} s") from None
            raise ProviderTimeout(f"the model sent no token within {self._first_token_timeout:g} s") from None
        except openai.APITimeoutError:
            raise ProviderTimeout("the upstream request timed out") from None
        except openai.APIStatusError as exc:
            raise ProviderError(f"upstream returned HTTP {exc.status_code}") from None
        except openai.APIConnectionError:
            raise ProviderError("could not reach the upstream model server") from None
        except openai.APIError:
            raise ProviderError("the upstream model server reported an error mid-stream") from None
        except (openai.OpenAIError, ValueError):
            # ValueError: a chunk that is not JSON or not a chat.completion.chunk.
            raise ProviderError("the upstream model server sent an invalid response") from None
        finally:
            if upstream is not None:
                await upstream.close()
