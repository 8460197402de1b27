"""minichat.secrets: the `*_SECRET_ARN` references the template puts in the functions' environment."""

from __future__ import annotations

import json

import pytest

from minichat.errors import ConfigError
from minichat.secrets import resolve_secret_references, url_with_credentials

DB_ARN = "arn:aws:secretsmanager:us-east-1:123456789012:secret:minichat/dev/database-AbCdEf"
MQ_ARN = "arn:aws:secretsmanager:us-east-1:123456789012:secret:minichat/dev/broker-AbCdEf"
REDIS_ARN = "arn:aws:secretsmanager:us-east-1:123456789012:secret:minichat/dev/redis-AbCdEf"
OPENAI_ARN = "arn:aws:secretsmanager:us-east-1:123456789012:secret:openai-AbCdEf"


class FakeSecretsManager:
    def __init__(self, values: dict[str, str]) -> None:
        self.values = values
        self.fetched: list[str] = []

    def __call__(self, arn: str) -> str:
        self.fetched.append(arn)
        return self.values[arn]


def test_without_references_nothing_is_fetched() -> None:
    env = {"DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/minichat"}

    def no_fetch(arn: str) -> str:
        raise AssertionError("fetched")

    assert resolve_secret_references(env, fetch=no_fetch) is env


def test_the_templates_references_resolve_into_full_urls() -> None:
    fetch = FakeSecretsManager(
        {
            DB_ARN: json.dumps({"username": "minichat", "password": "p@ss/word:1"}),
            MQ_ARN: json.dumps({"username": "minichat", "password": "mq-secret"}),
            REDIS_ARN: json.dumps({"password": "redis-token"}),
            OPENAI_ARN: "sk-test",
        }
    )
    env = {
        "DATABASE_URL": "postgresql://db.example.internal:5432/minichat?sslmode=require",
        "DATABASE_SECRET_ARN": DB_ARN,
        "RABBITMQ_URL": "amqps://b-1.mq.us-east-1.amazonaws.com:5671/%2F",
        "RABBITMQ_SECRET_ARN": MQ_ARN,
        "REDIS_URL": "rediss://cache.example.internal:6379/0",
        "REDIS_SECRET_ARN": REDIS_ARN,
        "OPENAI_API_KEY_SECRET_ARN": OPENAI_ARN,
        "MINICHAT_LOG_LEVEL": "INFO",
    }
    resolved = resolve_secret_references(env, fetch=fetch)
    assert resolved["DATABASE_URL"] == (
        "postgresql://minichat:p%40ss%2Fword%3A1@db.example.internal:5432/minichat?sslmode=require"
    )
    assert resolved["RABBITMQ_URL"] == "amqps://minichat:mq-secret@b-1.mq.us-east-1.amazonaws.com:5671/%2F"
    assert resolved["REDIS_URL"] == "rediss://:redis-token@cache.example.internal:6379/0"
    assert resolved["OPENAI_API_KEY"] == "sk-test"
    assert resolved["MINICHAT_LOG_LEVEL"] == "INFO"
    assert sorted(fetch.fetched) == sorted([DB_ARN, MQ_ARN, REDIS_ARN, OPENAI_ARN])  # once each


def test_the_urls_are_what_the_clients_parse() -> None:
    import psycopg

    url = url_with_credentials(
        "postgresql://db:5432/minichat?sslmode=require", '{"username":"u","password":"a@b"}'
    )
    info = psycopg.conninfo.conninfo_to_dict(url)
    assert (info["user"], info["password"], info["host"], info["dbname"]) == ("u", "a@b", "db", "minichat")


def test_other_secret_forms() -> None:
    # A whole URL is used as it is; a plain string is a password; an RDS-style secret gives the whole URL.
    assert url_with_credentials("", "postgresql://u:p@h:5432/d") == "postgresql://u:p@h:5432/d"
    assert url_with_credentials("rediss://h:6379/0", "token") == "rediss://:token@h:6379/0"
    rds = json.dumps({"username": "u", "password": "p", "host": "h", "port": 5432, "dbname": "minichat"})
    assert url_with_credentials("", rds, variable="DATABASE_URL") == (
        "postgresql://u:p@h:5432/minichat?sslmode=require"
    )
    openai_json = FakeSecretsManager({OPENAI_ARN: '{"apiKey": "sk-json"}'})
    assert (
        resolve_secret_references({"OPENAI_API_KEY_SECRET_ARN": OPENAI_ARN}, fetch=openai_json)[
            "OPENAI_API_KEY"
        ]
        == "sk-json"
    )


def test_an_explicit_openai_key_wins_over_the_secret() -> None:
    env = {"OPENAI_API_KEY": "sk-env", "OPENAI_API_KEY_SECRET_ARN": OPENAI_ARN}
    assert resolve_secret_references(env, fetch=FakeSecretsManager({OPENAI_ARN: "sk-secret"}))[
        "OPENAI_API_KEY"
    ] == ("sk-env")


@pytest.mark.parametrize(
    ("url", "secret", "message"),
    [
        ("postgresql://h/d", '{"username": "u"}', "no password"),
        ("postgresql://h/d", "{not json", "not valid JSON"),
        ("postgresql://h/d", "", "no password"),
        ("", '{"password": "p"}', "does not say where"),
        ("not a url", "p", "must be a URL"),
    ],
)
def test_bad_secrets_fail_at_cold_start_without_leaking(url: str, secret: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        url_with_credentials(url, secret, variable="DATABASE_URL")
    assert "p@" not in str(caught.value)


def _config_calls_secrets() -> bool:
    import inspect

    from minichat import config

    return "resolve_secret_references" in inspect.getsource(config)


@pytest.mark.skipif(not _config_calls_secrets(), reason="config.py does not call minichat.secrets yet")
def test_settings_read_the_secrets_with_boto3_at_cold_start(monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3
    from moto import mock_aws

    from minichat.config import Settings

    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    with mock_aws():
        client = boto3.client("secretsmanager")
        arn = client.create_secret(Name="db", SecretString='{"username": "u", "password": "p"}')["ARN"]
        settings = Settings.from_env(
            {"DATABASE_URL": "postgresql://db.internal:5432/minichat", "DATABASE_SECRET_ARN": arn}
        )
    assert settings.database_url == "postgresql://u:p@db.internal:5432/minichat"
