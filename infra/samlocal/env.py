"""`sam local --env-vars` from the template: each function gets exactly the variables it declares.

    .venv/aws-tools/bin/python infra/deploy/sam_translate.py > /tmp/t.json
    python3 infra/samlocal/env.py /tmp/t.json > infra/samlocal/env.json

Values are this machine's services as a container sees them (host.docker.internal, relayed by
forward.py); credentials sit in the URLs, so every `*_SECRET_ARN` stays empty, and any other variable is
empty too, so the function's own default applies. The sam-local tests build their file the same way.
"""

from __future__ import annotations

import json
import sys
from typing import Any

__all__ = ["function_env", "service_values"]

HOST = "host.docker.internal"


def service_values(
    *,
    pg: int = 5432,
    redis: int = 6379,
    amqp: int = 5672,
    db: str = "minichat",
    redis_db: str = "0",
    vhost: str = "%2F",
) -> dict[str, str]:
    """What the service variables stand for on this machine, seen from a container."""
    return {
        "DATABASE_URL": f"postgresql://postgres@{HOST}:{pg}/{db}",
        "REDIS_URL": f"redis://{HOST}:{redis}/{redis_db}",
        "RABBITMQ_URL": f"amqp://guest:guest@{HOST}:{amqp}/{vhost}",
        "MINICHAT_LOG_LEVEL": "INFO",
    }


def function_env(translated: dict[str, Any], values: dict[str, str]) -> dict[str, dict[str, str]]:
    """Function → {variable: value} for every variable its translated resource declares."""
    env: dict[str, dict[str, str]] = {}
    for name, resource in translated["Resources"].items():
        if resource["Type"] == "AWS::Lambda::Function":
            declared = resource["Properties"].get("Environment", {}).get("Variables", {})
            env[name] = {key: values.get(key, "") for key in declared}
    return env


if __name__ == "__main__":
    with open(sys.argv[1]) as handle:
        template = json.load(handle)
    print(json.dumps(function_env(template, service_values()), indent=2))
