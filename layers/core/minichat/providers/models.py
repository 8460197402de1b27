"""Per-model limits: the context window and the longest answer, known per model family, overridable."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["DEFAULT_MAX_OUTPUT_TOKENS", "ModelLimits", "known_limits", "limits_for"]

# A model nobody described: the context comes from MINICHAT_CONTEXT_TOKENS, the answer from this.
DEFAULT_MAX_OUTPUT_TOKENS = 4096

# Bedrock inference profiles prefix the model id with a geography: `us.`, `eu.`, `apac.`, `global.`...
_PROFILE_PREFIX = re.compile(r"^(?:us|eu|apac|us-gov|ca|jp|au|global)\.")


@dataclass(frozen=True, slots=True)
class ModelLimits:
    """How many tokens a model takes in (prompt and answer together) and writes at most."""

    context_tokens: int
    max_output_tokens: int


# (prefix of the model id, context tokens, max output tokens): the first match wins, so a longer,
# more specific prefix comes before a shorter one. Figures are the providers' published ones.
_FAMILIES: tuple[tuple[str, int, int], ...] = (
    # Amazon Bedrock
    ("anthropic.claude-3-7-sonnet", 200_000, 64_000),
    ("anthropic.claude-3-5-haiku", 200_000, 8_192),
    ("anthropic.claude-3-5-sonnet", 200_000, 8_192),
    ("anthropic.claude-3", 200_000, 4_096),
    ("anthropic.claude-opus-4", 200_000, 32_000),
    ("anthropic.claude-sonnet-4", 200_000, 64_000),
    ("anthropic.claude-haiku-4", 200_000, 64_000),
    ("anthropic.claude", 200_000, 4_096),
    ("amazon.nova-micro", 128_000, 10_000),
    ("amazon.nova-lite", 300_000, 10_000),
    ("amazon.nova-pro", 300_000, 10_000),
    ("amazon.nova-premier", 1_000_000, 32_000),
    ("amazon.titan-text", 8_192, 4_096),
    ("meta.llama3-8b", 8_192, 2_048),
    ("meta.llama3-70b", 8_192, 2_048),
    ("meta.llama3", 128_000, 2_048),
    ("meta.llama4", 128_000, 8_192),
    ("mistral.mistral-large", 128_000, 8_192),
    ("mistral.mistral-7b", 32_000, 8_192),
    ("mistral.mixtral-8x7b", 32_000, 4_096),
    ("cohere.command-r", 128_000, 4_000),
    ("deepseek.r1", 128_000, 32_768),
    # OpenAI
    ("gpt-4o", 128_000, 16_384),
    ("gpt-4.1", 1_047_576, 32_768),
    ("gpt-4-turbo", 128_000, 4_096),
    ("gpt-5", 400_000, 128_000),
    ("gpt-3.5-turbo", 16_385, 4_096),
    ("o1", 200_000, 100_000),
    ("o3", 200_000, 100_000),
    ("o4-mini", 200_000, 100_000),
)


def known_limits(model: str) -> ModelLimits | None:
    """The published limits of `model`'s family, or None for a model this table does not know."""
    name = _PROFILE_PREFIX.sub("", model)
    for prefix, context, output in _FAMILIES:
        if name.startswith(prefix):
            return ModelLimits(context, output)
    return None


def limits_for(
    model: str,
    *,
    overrides: Mapping[str, tuple[int | None, int | None]],
    default_context_tokens: int,
) -> ModelLimits:
    """`model`'s limits: configured values first, then its family's, then the defaults."""
    known = known_limits(model) or ModelLimits(default_context_tokens, DEFAULT_MAX_OUTPUT_TOKENS)
    context, output = overrides.get(model, (None, None))
    context = context or known.context_tokens
    return ModelLimits(context, min(output or known.max_output_tokens, context))
