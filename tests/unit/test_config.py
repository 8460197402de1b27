"""Settings: the JWT secret from the environment, Secrets Manager (moto) or a kept dev file."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import boto3
import pytest
from moto import mock_aws

from minichat.config import Settings
from minichat.errors import ConfigError

STRONG = "s" * 40


def test_defaults_match_the_contract() -> None:
    s = Settings.from_env({})
    assert s.database_url == "postgresql://postgres@127.0.0.1:5432/minichat"
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert s.rabbitmq_url == "amqp://guest:guest@127.0.0.1:5672/%2F"
    assert s.access_token_ttl == 900 and s.refresh_token_ttl == 30 * 86400
    assert s.environment == "local"


def test_lambda_environment_is_detected() -> None:
    assert Settings.from_env({"AWS_LAMBDA_FUNCTION_NAME": "api"}).environment == "aws"


def test_lambda_environments_keep_a_small_pool_that_can_shrink_to_nothing() -> None:
    on_lambda = Settings.from_env({"AWS_LAMBDA_FUNCTION_NAME": "minichat-dev-api"})
    assert (on_lambda.db_pool_min, on_lambda.db_pool_max) == (0, 2)
    tuned = Settings.from_env({"AWS_LAMBDA_FUNCTION_NAME": "f", "MINICHAT_DB_POOL_MAX": "4"})
    assert tuned.db_pool_max == 4
    local = Settings.from_env({})
    assert (local.db_pool_min, local.db_pool_max) == (1, 10)


def test_secret_from_environment_must_be_256_bits() -> None:
    assert Settings.from_env({"MINICHAT_JWT_SECRET": STRONG}).jwt_secret == STRONG.encode()
    with pytest.raises(ConfigError, match="256 bits"):
        _ = Settings.from_env({"MINICHAT_JWT_SECRET": "short"}).jwt_secret


def test_no_secret_outside_local_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no JWT secret"):
        _ = Settings.from_env({"MINICHAT_ENV": "aws"}).jwt_secret
    env = {"MINICHAT_ENV": "aws", "MINICHAT_JWT_SECRET_FILE": str(tmp_path / "s")}
    with pytest.raises(ConfigError):  # a dev file is never used in AWS
        _ = Settings.from_env(env).jwt_secret


def test_dev_secret_is_generated_once_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "jwt-secret"
    first = Settings.from_env({"MINICHAT_JWT_SECRET_FILE": str(path)}).jwt_secret
    second = Settings.from_env({"MINICHAT_JWT_SECRET_FILE": str(path)}).jwt_secret
    assert first == second and len(first) >= 32
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


@mock_aws
def test_secret_from_secrets_manager_is_read_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    client = boto3.client("secretsmanager", region_name="eu-west-1")
    arn = client.create_secret(Name="minichat/jwt", SecretString=STRONG)["ARN"]
    settings = Settings.from_env({"MINICHAT_JWT_SECRET_ARN": arn, "MINICHAT_ENV": "aws"})
    assert settings.jwt_secret == STRONG.encode()
    client.put_secret_value(SecretId=arn, SecretString="t" * 40)
    assert settings.jwt_secret == STRONG.encode()  # cached for the life of the cold start
    assert Settings.from_env({"MINICHAT_JWT_SECRET_ARN": arn}).jwt_secret == b"t" * 40


@pytest.mark.parametrize(
    ("name", "value"), [("MINICHAT_ACCESS_TOKEN_TTL", "abc"), ("MINICHAT_DB_POOL_MAX", "0")]
)
def test_bad_numbers_are_config_errors(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        Settings.from_env({name: value})


def test_repr_hides_secrets() -> None:
    s = Settings.from_env({"MINICHAT_JWT_SECRET": STRONG, "OPENAI_API_KEY": "sk-secret"})
    assert STRONG not in repr(s) and "sk-secret" not in repr(s)
