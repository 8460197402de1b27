"""One typed Settings object, read from the environment once per cold start."""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from minichat.errors import ConfigError
from minichat.secrets import resolve_secret_references

__all__ = ["OpenAIServer", "Settings", "get_settings", "set_settings"]

_MIN_SECRET_BYTES = 32  # 256 bits


def _int(env: Mapping[str, str], name: str, default: float, *, low: int, high: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return int(default)
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
    return value


def _list(raw: str | None) -> tuple[str, ...]:
    return tuple(item.strip() for item in (raw or "").split(",") if item.strip())


@dataclass(frozen=True)
class OpenAIServer:
    """One OpenAI-compatible server of MINICHAT_OPENAI_SERVERS: its name (for logs and errors only), URL,
    key (or the Secrets Manager secret holding it) and the model ids it serves."""

    name: str
    models: tuple[str, ...]
    base_url: str | None = None
    api_key: str | None = field(default=None, repr=False)
    api_key_secret_arn: str | None = None


_SERVER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,39}$")
_SERVER_KEYS = {"name", "baseUrl", "apiKey", "apiKeySecretArn", "models"}
_LIMIT_KEYS = {"contextTokens": (256, 10_000_000), "maxOutputTokens": (1, 1_000_000)}


def _json(env: Mapping[str, str], name: str) -> Any:
    raw = env.get(name)
    if not raw or not raw.strip():
        return None
    try:
        return json.loads(raw)
    except ValueError:
        raise ConfigError(f"{name} is not valid JSON") from None


def _openai_servers(env: Mapping[str, str]) -> tuple[OpenAIServer, ...]:
    """MINICHAT_OPENAI_SERVERS: a JSON list of {name, baseUrl?, apiKey? | apiKeySecretArn?, models}."""
    var = "MINICHAT_OPENAI_SERVERS"
    raw = _json(env, var)
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError(f"{var} must be a JSON list of servers")
    servers: list[OpenAIServer] = []
    for index, entry in enumerate(raw):
        where = f"{var}[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} must be an object")
        unknown = sorted(set(entry) - _SERVER_KEYS)
        if unknown:
            raise ConfigError(f"{where} has unknown fields: {', '.join(unknown)}")
        name = entry.get("name")
        if not isinstance(name, str) or not _SERVER_NAME.match(name):
            raise ConfigError(f"{where}.name must be 1-40 characters of A-Za-z0-9._-")
        if any(s.name == name for s in servers):
            raise ConfigError(f"{var} names the server {name!r} twice")
        models = entry.get("models")
        if (
            not isinstance(models, list)
            or not models
            or not all(isinstance(m, str) and m.strip() for m in models)
        ):
            raise ConfigError(f"{where}.models must be a non-empty list of model ids")
        base_url, api_key, arn = entry.get("baseUrl"), entry.get("apiKey"), entry.get("apiKeySecretArn")
        for key, value in (("baseUrl", base_url), ("apiKey", api_key), ("apiKeySecretArn", arn)):
            if value is not None and not (isinstance(value, str) and value):
                raise ConfigError(f"{where}.{key} must be a non-empty string")
        if api_key and arn:
            raise ConfigError(f"{where} sets both apiKey and apiKeySecretArn")
        servers.append(
            OpenAIServer(
                name=name,
                models=tuple(m.strip() for m in models),
                base_url=base_url,
                api_key=api_key,
                api_key_secret_arn=arn,
            )
        )
    return tuple(servers)


def _model_limits(env: Mapping[str, str]) -> tuple[tuple[str, int | None, int | None], ...]:
    """MINICHAT_MODEL_LIMITS: {"<model id>": {"contextTokens": n, "maxOutputTokens": n}}, either optional."""
    var = "MINICHAT_MODEL_LIMITS"
    raw = _json(env, var)
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        raise ConfigError(f"{var} must be a JSON object keyed by model id")
    limits: list[tuple[str, int | None, int | None]] = []
    for model, entry in raw.items():
        if not isinstance(entry, dict) or not entry or set(entry) - set(_LIMIT_KEYS):
            raise ConfigError(f"{var}[{model!r}] must be an object with contextTokens and/or maxOutputTokens")
        values: list[int | None] = []
        for key, (low, high) in _LIMIT_KEYS.items():
            value = entry.get(key)
            if value is not None and (type(value) is not int or not low <= value <= high):
                raise ConfigError(f"{var}[{model!r}].{key} must be an integer from {low} to {high}")
            values.append(value)
        limits.append((model, values[0], values[1]))
    return tuple(limits)


@dataclass(frozen=True)
class Settings:
    """Everything MiniChat reads from its environment."""

    environment: str = "local"  # local | test | aws
    database_url: str = "postgresql://postgres@127.0.0.1:5432/minichat"
    redis_url: str = "redis://127.0.0.1:6379/0"
    rabbitmq_url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    jwt_secret_value: str | None = field(default=None, repr=False)
    jwt_secret_arn: str | None = None
    jwt_secret_file: str | None = None
    jwt_issuer: str = "minichat"
    jwt_audience: str = "minichat-api"
    access_token_ttl: int = 900
    refresh_token_ttl: int = 30 * 24 * 3600
    refresh_reuse_grace: int = 10
    openai_api_key: str | None = field(default=None, repr=False)
    openai_base_url: str | None = None
    openai_models: tuple[str, ...] = ()
    openai_servers: tuple[OpenAIServer, ...] = ()
    bedrock_models: tuple[str, ...] = ()
    bedrock_region: str | None = None
    bedrock_endpoint_url: str | None = None
    bedrock_max_streams: int = 128
    # (model id, context tokens, max output tokens), None where the known limits hold: a tuple, so that
    # Settings stays hashable.
    model_limits: tuple[tuple[str, int | None, int | None], ...] = ()
    default_model: str | None = None
    context_tokens: int = 16_000
    provider_first_token_timeout: float = 60.0
    provider_idle_timeout: float = 60.0
    stream_buffer_ttl: int = 3600
    rate_login_email: str = "10/60"  # failed logins per (email, client IP)
    rate_login_ip: str = "100/60"
    rate_generations: str = "30/60"
    rate_api: str = "600/60"
    daily_token_budget: int = 0
    max_streams_per_user: int = 8
    db_pool_min: int = 1
    db_pool_max: int = 10
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        env = resolve_secret_references(env)  # *_SECRET_ARN → credentials, once per cold start (AWS)
        environment = env.get("MINICHAT_ENV") or ("aws" if env.get("AWS_LAMBDA_FUNCTION_NAME") else "local")
        defaults = cls()
        # A Lambda environment serves one request at a time (the stream function a few streams), and
        # hundreds of them can be warm at once: a small pool that may shrink to nothing keeps RDS within
        # its connection limit. A long-running local process keeps one connection warm.
        pool_min, pool_max = (0, 2) if environment == "aws" else (defaults.db_pool_min, defaults.db_pool_max)
        return cls(
            environment=environment,
            database_url=env.get("DATABASE_URL") or defaults.database_url,
            redis_url=env.get("REDIS_URL") or defaults.redis_url,
            rabbitmq_url=env.get("RABBITMQ_URL") or defaults.rabbitmq_url,
            jwt_secret_value=env.get("MINICHAT_JWT_SECRET") or None,
            jwt_secret_arn=env.get("MINICHAT_JWT_SECRET_ARN") or None,
            jwt_secret_file=env.get("MINICHAT_JWT_SECRET_FILE") or None,
            access_token_ttl=_int(
                env, "MINICHAT_ACCESS_TOKEN_TTL", defaults.access_token_ttl, low=30, high=24 * 3600
            ),
            refresh_token_ttl=_int(
                env, "MINICHAT_REFRESH_TOKEN_TTL", defaults.refresh_token_ttl, low=60, high=365 * 86400
            ),
            openai_api_key=env.get("OPENAI_API_KEY") or None,
            openai_base_url=env.get("OPENAI_BASE_URL") or None,
            openai_models=_list(env.get("MINICHAT_OPENAI_MODELS")),
            openai_servers=_openai_servers(env),
            bedrock_models=_list(env.get("MINICHAT_BEDROCK_MODELS")),
            bedrock_region=env.get("MINICHAT_BEDROCK_REGION")
            or env.get("AWS_REGION")
            or env.get("AWS_DEFAULT_REGION")
            or None,
            bedrock_endpoint_url=env.get("MINICHAT_BEDROCK_ENDPOINT_URL") or None,
            bedrock_max_streams=_int(
                env, "MINICHAT_BEDROCK_MAX_STREAMS", defaults.bedrock_max_streams, low=1, high=1000
            ),
            model_limits=_model_limits(env),
            default_model=env.get("MINICHAT_DEFAULT_MODEL") or None,
            context_tokens=_int(
                env, "MINICHAT_CONTEXT_TOKENS", defaults.context_tokens, low=256, high=2_000_000
            ),
            provider_first_token_timeout=_int(
                env,
                "MINICHAT_PROVIDER_FIRST_TOKEN_TIMEOUT",
                defaults.provider_first_token_timeout,
                low=1,
                high=900,
            ),
            provider_idle_timeout=_int(
                env, "MINICHAT_PROVIDER_IDLE_TIMEOUT", defaults.provider_idle_timeout, low=1, high=900
            ),
            stream_buffer_ttl=_int(
                env, "MINICHAT_STREAM_BUFFER_TTL", defaults.stream_buffer_ttl, low=3600, high=7 * 86400
            ),
            rate_login_email=env.get("MINICHAT_RATE_LOGIN_EMAIL") or defaults.rate_login_email,
            rate_login_ip=env.get("MINICHAT_RATE_LOGIN_IP") or defaults.rate_login_ip,
            rate_generations=env.get("MINICHAT_RATE_GENERATIONS") or defaults.rate_generations,
            rate_api=env.get("MINICHAT_RATE_API") or defaults.rate_api,
            daily_token_budget=_int(
                env, "MINICHAT_DAILY_TOKEN_BUDGET", defaults.daily_token_budget, low=0, high=10**12
            ),
            max_streams_per_user=_int(
                env, "MINICHAT_MAX_STREAMS_PER_USER", defaults.max_streams_per_user, low=1, high=10_000
            ),
            db_pool_min=_int(env, "MINICHAT_DB_POOL_MIN", pool_min, low=0, high=100),
            db_pool_max=_int(env, "MINICHAT_DB_POOL_MAX", pool_max, low=1, high=200),
            log_level=(env.get("MINICHAT_LOG_LEVEL") or defaults.log_level).upper(),
        )

    def with_(self, **changes: object) -> Settings:
        """A copy with some fields replaced (tests, local mode)."""
        return replace(self, **changes)  # type: ignore[arg-type]

    @cached_property
    def jwt_secret(self) -> bytes:
        """The HS256 key: from the environment, Secrets Manager, or (local mode) a kept dev file."""
        if self.jwt_secret_value:
            secret = self.jwt_secret_value
        elif self.jwt_secret_arn:
            secret = _secret_from_secrets_manager(self.jwt_secret_arn)
        elif self.jwt_secret_file and self.environment in ("local", "test"):
            secret = _secret_from_dev_file(Path(self.jwt_secret_file))
        else:
            raise ConfigError("no JWT secret: set MINICHAT_JWT_SECRET or MINICHAT_JWT_SECRET_ARN")
        key = secret.encode()
        if len(key) < _MIN_SECRET_BYTES:
            raise ConfigError("the JWT secret must be at least 256 bits (32 bytes)")
        return key


def _secret_from_secrets_manager(arn: str) -> str:
    import boto3  # imported here: only the AWS path pays for it

    client = boto3.client("secretsmanager")
    value = client.get_secret_value(SecretId=arn).get("SecretString")
    if not value:
        raise ConfigError("the JWT secret in Secrets Manager has no SecretString")
    return str(value)


def _secret_from_dev_file(path: Path) -> str:
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(48)
    # O_EXCL: two processes starting at once agree on the first file written.
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as handle:
        handle.write(value + "\n")
    return value


_settings: Settings | None = None


def get_settings() -> Settings:
    """The process-wide settings, built from the environment on first use."""
    global _settings
    if _settings is None:
        _settings = Settings.from_env()
    return _settings


def set_settings(settings: Settings | None) -> None:
    """Replace the process-wide settings (local mode and tests); None re-reads the environment."""
    global _settings
    _settings = settings
