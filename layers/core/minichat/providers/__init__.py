"""Model providers and the registry that maps a model id to the provider serving it."""

from __future__ import annotations

from collections.abc import Iterable

from minichat.config import Settings
from minichat.errors import ConfigError, UnknownModel
from minichat.providers.base import (
    ChatMessage,
    Delta,
    Finish,
    FinishReason,
    Provider,
    ProviderRequest,
    StreamItem,
    Usage,
    build_prompt,
    estimate_prompt_tokens,
    estimate_tokens,
)
from minichat.providers.mock import MockProvider

__all__ = [
    "ChatMessage",
    "Delta",
    "Finish",
    "FinishReason",
    "Provider",
    "ProviderRegistry",
    "ProviderRequest",
    "StreamItem",
    "Usage",
    "build_prompt",
    "estimate_prompt_tokens",
    "estimate_tokens",
]


class ProviderRegistry:
    """Model id → provider, plus the default model; built once per cold start."""

    def __init__(self, providers: Iterable[Provider], *, default_model: str | None = None) -> None:
        self._by_model: dict[str, Provider] = {}
        for provider in providers:
            for model in provider.models():
                if model in self._by_model:
                    raise ConfigError(f"model {model!r} is served by two providers")
                self._by_model[model] = provider
        if not self._by_model:
            raise ConfigError("no provider serves any model")
        if default_model is None:
            default_model = next(iter(self._by_model))
        elif default_model not in self._by_model:
            raise ConfigError(f"the default model {default_model!r} is not served by any provider")
        self.default_model = default_model

    @classmethod
    def from_settings(cls, settings: Settings, *, preload: bool = False) -> ProviderRegistry:
        """The mock models always; the OpenAI models when an API key or a base URL is configured."""
        providers: list[Provider] = []
        default = settings.default_model
        if (settings.openai_api_key or settings.openai_base_url) and settings.openai_models:
            # The module is light; the `openai` package (about half a second to import) loads on the first
            # stream, or now with `preload`: right for the function that streams, at cold start, wrong for
            # one that only lists or checks models.
            from minichat.providers.openai import OpenAIProvider

            openai_provider = OpenAIProvider(
                models=settings.openai_models,
                api_key=settings.openai_api_key,
                base_url=settings.openai_base_url,
                first_token_timeout=settings.provider_first_token_timeout,
                idle_timeout=settings.provider_idle_timeout,
            )
            if preload:
                openai_provider.preload()
            providers.append(openai_provider)
            default = default or settings.openai_models[0]
        providers.append(MockProvider())
        return cls(providers, default_model=default or "mock-echo")

    def resolve(self, model: str) -> Provider:
        """The provider serving `model`; UnknownModel if none does."""
        try:
            return self._by_model[model]
        except KeyError:
            raise UnknownModel(f"Unknown model {model[:100]!r}.") from None

    def list_models(self) -> list[dict[str, str]]:
        """Every model as {id, provider}, in registration order (OpenAI first when configured)."""
        return [{"id": model, "provider": provider.name} for model, provider in self._by_model.items()]

    async def aclose(self) -> None:
        """Close providers that hold connections."""
        for provider in {id(p): p for p in self._by_model.values()}.values():
            await provider.aclose()
