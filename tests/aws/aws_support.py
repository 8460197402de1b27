"""Shared by the AWS checks (tests/aws): paths, the tools' environment, running a tool, loading a script."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from minichat_local.functions import load_path

ROOT = Path(__file__).resolve().parents[2]
# Environment for every tool run: no telemetry, no AWS account, no call out.
TOOL_ENV = {
    "SAM_CLI_TELEMETRY": "0",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def load_script(relative: str) -> ModuleType:
    """A helper script of the repository (infra/...), loaded by path: they are not a package."""
    return load_path(ROOT / relative)


FUNCTIONS: tuple[str, ...] = load_script("infra/deploy/sam_build.py").FUNCTIONS


def run_tool(
    args: list[str], *, timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a tool from the repository root, its output kept for the test's report."""
    env = {**os.environ, **TOOL_ENV}
    result = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    print(f"$ {' '.join(args)}\n{result.stdout}{result.stderr}")
    if check and result.returncode != 0:
        pytest.fail(f"{args[0]} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def scheduled_event(rule: str) -> dict[str, Any]:
    """What an EventBridge schedule sends."""
    return {
        "version": "0",
        "id": str(uuid.uuid4()),
        "detail-type": "Scheduled Event",
        "source": "aws.events",
        "account": "123456789012",
        "time": "2025-01-15T10:00:00Z",
        "region": "us-east-1",
        "resources": [f"arn:aws:events:us-east-1:123456789012:rule/{rule}"],
        "detail": {},
    }


def queue_with_one_message(vhost: str, body: bytes) -> str:
    """A vhost of its own, MiniChat's queues declared and emptied, then `body` published to the usage
    queue (what the MQ bridge consumes); returns the broker URL."""
    from minichat import broker

    url = f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    for args in (["add_vhost", vhost], ["set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"]):
        subprocess.run(["rabbitmqctl", *args], capture_output=True, timeout=60, check=False)
    with broker.connect(url) as connection:
        channel = connection.channel()
        broker.declare_topology(channel)
        for queue in broker.QUEUES:
            channel.queue_purge(queue)
        channel.basic_publish("", broker.QUEUES[0], body)
    return url
