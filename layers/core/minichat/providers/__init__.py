"""Model providers and the registry that maps a model id to the provider serving it."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

from minichat.config import OpenAIServer, Settings
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
from minichat.providers.models import DEFAULT_MAX_OUTPUT_TOKENS, ModelLimits, limits_for

__all__ = [
    "ChatMessage",
    "Delta",
    "Finish",
    "FinishReason",
    "ModelLimits",
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
    """Model id → provider, plus the default model and each model's limits; built once per cold start."""

    def __init__(
        self,
        providers: Iterable[Provider],
        *,
        default_model: str | None = None,
        limit_overrides: Mapping[str, tuple[int | None, int | None]] | None = None,
        default_context_tokens: int = 16_000,
    ) -> None:
        self._by_model: dict[str, Provider] = {}
        for provider in providers:
            for model in provider.models():
                other = self._by_model.get(model)
                if other is not None:
                    raise ConfigError(
                        f"model {model!r} is served by two providers: {_label(other)} and {_label(provider)}"
                    )
                self._by_model[model] = provider
        if not self._by_model:
            raise ConfigError("no provider serves any model")
        if default_model is None:
            default_model = next(iter(self._by_model))
        elif default_model not in self._by_model:
            raise ConfigError(f"the default model {default_model!r} is not served by any provider")
        self.default_model = default_model
        overrides = limit_overrides or {}
        stray = sorted(set(overrides) - set(self._by_model))
        if stray:
            raise ConfigError(f"MINICHAT_MODEL_LIMITS names models no provider serves: {', '.join(stray)}")
        self._default_limits = ModelLimits(default_context_tokens, DEFAULT_MAX_OUTPUT_TOKENS)
        self._limits = {
            model: limits_for(model, overrides=overrides, default_context_tokens=default_context_tokens)
            for model in self._by_model
        }

    @classmethod
    def from_settings(cls, settings: Settings, *, preload: bool = False) -> ProviderRegistry:
        """The OpenAI-compatible servers, then Bedrock, then the mock models (always).

        The provider modules are light; their clients (the `openai` package, about half a second to
        import; boto3 and the Bedrock client, about a quarter) load on the first stream, or now with
        `preload`: right for the function that streams, at cold start, wrong for one that only lists or
        checks models.
        """
        overrides = {model: (context, output) for model, context, output in settings.model_limits}
        limit = functools.partial(
            limits_for, overrides=overrides, default_context_tokens=settings.context_tokens
        )
        providers: list[Provider] = []
        servers: list[tuple[str, OpenAIServer]] = []
        if (settings.openai_api_key or settings.openai_base_url) and settings.openai_models:
            single = OpenAIServer(
                name="openai",
                models=settings.openai_models,
                base_url=settings.openai_base_url,
                api_key=settings.openai_api_key,
            )
            servers.append(("openai (OPENAI_* settings)", single))
        servers += [(f"openai server {s.name!r}", s) for s in settings.openai_servers]
        if servers:
            from minichat.providers.openai import OpenAIProvider

            for label, server in servers:
                openai_provider = OpenAIProvider(
                    models=server.models,
                    api_key=server.api_key,
                    api_key_secret_arn=server.api_key_secret_arn,
                    base_url=server.base_url,
                    first_token_timeout=settings.provider_first_token_timeout,
                    idle_timeout=settings.provider_idle_timeout,
                    label=label,
                )
                if preload:
                    openai_provider.preload()
                providers.append(openai_provider)
        if settings.bedrock_models:
            from minichat.providers.bedrock import BedrockProvider

            if not settings.bedrock_region:
                raise ConfigError("Bedrock models are configured but no region: set MINICHAT_BEDROCK_REGION")
            bedrock_provider = BedrockProvider(
                models=settings.bedrock_models,
                region=settings.bedrock_region,
                endpoint_url=settings.bedrock_endpoint_url,
                max_streams=settings.bedrock_max_streams,
                first_token_timeout=settings.provider_first_token_timeout,
                idle_timeout=settings.provider_idle_timeout,
                max_output_tokens={m: limit(m).max_output_tokens for m in settings.bedrock_models},
            )
            if preload:
                bedrock_provider.preload()
            providers.append(bedrock_provider)
        providers.append(MockProvider())
        default = settings.default_model
        if default is None:
            default = next((m for p in providers for m in p.models()), "mock-echo")
        return cls(
            providers,
            default_model=default,
            limit_overrides=overrides,
            default_context_tokens=settings.context_tokens,
        )

    def resolve(self, model: str) -> Provider:
        """The provider serving `model`; UnknownModel if none does."""
        try:
            return self._by_model[model]
        except KeyError:
            raise UnknownModel(f"Unknown model {model[:100]!r}.") from None

    def limits(self, model: str) -> ModelLimits:
        """`model`'s context window and longest answer (the defaults for a model no longer served)."""
        return self._limits.get(model, self._default_limits)

    def prompt_tokens(self, model: str, *, max_tokens: int | None) -> int:
        """How many tokens the prompt of `model` may take: its context, less the room kept for the answer
        (the requested maxTokens, else the model's longest answer), never less than half the context."""
        limits = self.limits(model)
        answer = min(max_tokens or limits.max_output_tokens, limits.max_output_tokens)
        return max(limits.context_tokens - answer, limits.context_tokens // 2)

    def list_models(self) -> list[dict[str, Any]]:
        """Every model as {id, provider, contextTokens, maxOutputTokens}, in registration order."""
        return [
            {
                "id": model,
                "provider": provider.name,
                "contextTokens": self._limits[model].context_tokens,
                "maxOutputTokens": self._limits[model].max_output_tokens,
            }
            for model, provider in self._by_model.items()
        ]

    async def aclose(self) -> None:
        """Close providers that hold connections."""
        for provider in {id(p): p for p in self._by_model.values()}.values():
            await provider.aclose()


def _label(provider: Provider) -> str:
    return str(getattr(provider, "label", provider.name))
