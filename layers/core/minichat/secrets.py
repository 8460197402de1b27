"""Secrets Manager references in the environment, resolved once per cold start.

On AWS no credential sits in a function's configuration. DATABASE_URL, REDIS_URL and RABBITMQ_URL name
the endpoint only (`postgresql://host:5432/minichat?sslmode=require`), and `<NAME>_SECRET_ARN` names the
secret that completes it:

- a JSON object with `password` and, optionally, `username` (what the template generates, and what RDS
  and Amazon MQ secrets hold); for DATABASE_URL with no URL set, an RDS-style secret with `host`, `port`
  and `dbname` as well gives the whole URL;
- a plain string: the password (a Redis AUTH token);
- a whole URL, used as it is.

OPENAI_API_KEY_SECRET_ARN names a secret holding the OpenAI key (a plain string, or JSON with `apiKey`);
an OPENAI_API_KEY set in the environment wins. Each server of MINICHAT_OPENAI_SERVERS may name its own
(`apiKeySecretArn`, same forms: `fetch_secret_value`). `Settings.from_env` passes its environment through
`resolve_secret_references`, and the settings are built once per process, so each secret is fetched once
per cold start. Without any `*_SECRET_ARN` variable (local mode, tests) nothing is fetched and boto3 is
never imported.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from minichat.errors import ConfigError

__all__ = [
    "URL_SECRETS",
    "VALUE_SECRETS",
    "fetch_secret_value",
    "resolve_secret_references",
    "url_with_credentials",
]

# (variable the settings read, variable naming the secret)
URL_SECRETS = (
    ("DATABASE_URL", "DATABASE_SECRET_ARN"),
    ("REDIS_URL", "REDIS_SECRET_ARN"),
    ("RABBITMQ_URL", "RABBITMQ_SECRET_ARN"),
)
VALUE_SECRETS = (("OPENAI_API_KEY", "OPENAI_API_KEY_SECRET_ARN"),)

Fetch = Callable[[str], str]


def resolve_secret_references(env: Mapping[str, str], *, fetch: Fetch | None = None) -> Mapping[str, str]:
    """The environment with every `*_SECRET_ARN` reference resolved into the variable it completes."""
    wanted = [(var, env.get(arn_var) or "") for var, arn_var in (*URL_SECRETS, *VALUE_SECRETS)]
    if not any(arn for _, arn in wanted):
        return env
    fetch = fetch or _secrets_manager()
    values: dict[str, str] = {}

    def secret(arn: str) -> str:
        if arn not in values:
            values[arn] = fetch(arn)
        return values[arn]

    resolved = dict(env)
    for var, arn_var in URL_SECRETS:
        arn = env.get(arn_var)
        if arn:
            resolved[var] = url_with_credentials(env.get(var) or "", secret(arn), variable=var)
    for var, arn_var in VALUE_SECRETS:
        arn = env.get(arn_var)
        if arn and not env.get(var):
            resolved[var] = _plain_value(secret(arn), key="apiKey", variable=var)
    return resolved


def fetch_secret_value(arn: str, *, key: str, variable: str, fetch: Fetch | None = None) -> str:
    """One value from Secrets Manager: a plain string, or the `key` field of a JSON secret."""
    return _plain_value((fetch or _secrets_manager())(arn), key=key, variable=variable)


def url_with_credentials(url: str, secret: str, *, variable: str = "URL") -> str:
    """`url` with the user and password from `secret` (see the module docstring for its forms)."""
    text = secret.strip()
    if "://" in text and not text.startswith("{"):
        return text
    fields = _json_object(text, variable=variable) if text.startswith("{") else {"password": text}
    if not url:
        url = _url_from_rds_secret(fields, variable=variable)
    parts = urlsplit(url)
    if not parts.scheme or not parts.hostname:
        raise ConfigError(f"{variable} must be a URL with a host to take credentials from its secret")
    user = str(fields.get("username") or fields.get("user") or parts.username or "")
    password = fields.get("password")
    if not isinstance(password, str) or not password:
        raise ConfigError(f"the secret for {variable} has no password")
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _url_from_rds_secret(fields: Mapping[str, Any], *, variable: str) -> str:
    if variable != "DATABASE_URL" or not fields.get("host"):
        raise ConfigError(f"{variable} is not set and its secret does not say where to connect")
    port = fields.get("port") or 5432
    dbname = fields.get("dbname") or "postgres"
    return f"postgresql://{fields['host']}:{port}/{quote(str(dbname), safe='')}?sslmode=require"


def _plain_value(secret: str, *, key: str, variable: str) -> str:
    text = secret.strip()
    if text.startswith("{"):
        value = _json_object(text, variable=variable).get(key)
        if not isinstance(value, str) or not value:
            raise ConfigError(f"the secret for {variable} has no {key}")
        return value
    if not text:
        raise ConfigError(f"the secret for {variable} is empty")
    return text


def _json_object(text: str, *, variable: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        raise ConfigError(f"the secret for {variable} is not valid JSON") from None
    if not isinstance(value, dict):
        raise ConfigError(f"the secret for {variable} is not a JSON object")
    return value


def _secrets_manager() -> Fetch:
    import boto3  # only the AWS path pays for it (the Lambda runtime provides boto3)

    client = boto3.client("secretsmanager")

    def fetch(arn: str) -> str:
        value = client.get_secret_value(SecretId=arn).get("SecretString")
        if not value:
            raise ConfigError(f"the secret {arn} has no SecretString")
        return str(value)

    return fetch
