"""The LocalStack loop for real: LocalStack in host mode (infra/localstack/host.py) and deploy.py into it.

This tier deploys and wires (secret, functions, REST API, schedules) and checks what LocalStack holds;
it executes no function inside LocalStack (its runtime-init binary cannot be had here): the functions run
on a Lambda runtime under `sam local` (test_sam_local.py). The MQ bridge runs against it for real: its
invocations reach the deployed worker and, failing, put the batch back. Why this split: the executor
protocol stand-in that execution would need is a harness of its own, while `sam local` already proves
every handler on the runtime with the template's own environment.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from aws_support import ROOT, TOOL_ENV, load_script, queue_with_one_message

pytestmark = pytest.mark.slow


_LOGS: dict[str, Path] = {}


def localstack_log(endpoint: str) -> Path:
    """The log of the LocalStack at `endpoint` (what it answered, request by request)."""
    return _LOGS[endpoint]


@pytest.fixture(scope="module")
def localstack(sam_image: str, tmp_path_factory: Any) -> Iterator[str]:
    """LocalStack on a free loopback port, its files in a temporary folder; the endpoint URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    root = tmp_path_factory.mktemp("localstack")
    log = (root / "localstack.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "infra/localstack/host.py", "--port", str(port), "--root", str(root / "fs")],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    endpoint = f"http://127.0.0.1:{port}"
    _LOGS[endpoint] = root / "localstack.log"
    started = time.monotonic()
    try:
        while True:  # the first run installs LocalStack into .venv/localstack
            try:
                if httpx.get(f"{endpoint}/_localstack/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if process.poll() is not None or time.monotonic() - started > 600:
                pytest.fail(f"LocalStack did not start:\n{(root / 'localstack.log').read_text()[-3000:]}")
            time.sleep(1)
        print(f"LocalStack up in {time.monotonic() - started:.1f} s")
        yield endpoint
    finally:
        os.killpg(process.pid, 15)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
        log.close()
        # The schedules fire and the bridge invokes: LocalStack tries to start function containers
        # (they cannot run here) and leaves them behind.
        load_script("infra/localstack/host.py").remove_containers(port)


def _deploy(aws_tools: Path, endpoint: str) -> subprocess.CompletedProcess[str]:
    started = time.monotonic()
    result = subprocess.run(
        [str(aws_tools / "python"), "infra/localstack/deploy.py", "--endpoint", endpoint, "--no-migrate"],
        cwd=ROOT,
        env={**os.environ, **TOOL_ENV},
        capture_output=True,
        text=True,
        timeout=600,
    )
    print(f"deploy.py: {time.monotonic() - started:.1f} s\n{result.stdout}{result.stderr[-3000:]}")
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def deployed(localstack: str, aws_tools: Path, sam_build: Path) -> dict[str, Any]:
    """deploy.py run once; the plan it followed."""
    _deploy(aws_tools, localstack)
    # The plan deploy.py followed, computed by the AWS tools' interpreter (SAM's translator lives there).
    script = (
        "import json, runpy; from pathlib import Path;"
        "deploy = runpy.run_path('infra/localstack/deploy.py', run_name='plan');"
        "translate = runpy.run_path('infra/deploy/sam_translate.py', run_name='plan')['translate'];"
        "print(json.dumps(deploy['plan'](translate(Path('template.yaml')))))"
    )
    result = subprocess.run(
        [str(aws_tools / "python"), "-c", script],
        cwd=ROOT,
        env={**os.environ, **TOOL_ENV},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    the_plan: dict[str, Any] = json.loads(result.stdout.splitlines()[-1])
    the_plan["routes"] = [tuple(route) for route in the_plan["routes"]]
    the_plan["schedules"] = [tuple(schedule) for schedule in the_plan["schedules"]]
    return the_plan


def _client(endpoint: str, service: str) -> Any:
    from urllib.parse import urlsplit

    from localstack_client.session import Session

    return Session(region_name="us-east-1", localstack_host=urlsplit(endpoint).netloc).client(service)


def test_deploy_creates_every_function_but_the_stream_with_the_jwt_secret(
    localstack: str, deployed: dict[str, Any]
) -> None:
    lam = _client(localstack, "lambda")
    secret = _client(localstack, "secretsmanager").describe_secret(SecretId="minichat-local/jwt")["ARN"]
    names = {f["FunctionName"] for f in lam.list_functions()["Functions"]}
    assert names == {function["name"] for function in deployed["functions"].values()}
    assert "minichat-local-stream" not in names
    for function in deployed["functions"].values():
        config = lam.get_function(FunctionName=function["name"])["Configuration"]
        assert config["State"] == "Active", config.get("StateReason")
        assert (config["Runtime"], config["Handler"]) == ("python3.12", function["handler"])
        env = config["Environment"]["Variables"]
        assert env["MINICHAT_JWT_SECRET_ARN"] == secret
        assert env["DATABASE_URL"].startswith("postgresql://")


def test_the_rest_api_routes_every_chalice_route_to_the_api_function(
    localstack: str, deployed: dict[str, Any]
) -> None:
    apigw = _client(localstack, "apigateway")
    (api,) = [
        a for a in apigw.get_rest_apis()["items"] if a["name"] == "minichat-local"
    ]  # one, after two deploys
    routes = set()
    for resource in apigw.get_resources(restApiId=api["id"], limit=500)["items"]:
        for method in resource.get("resourceMethods", {}):
            integration = apigw.get_integration(
                restApiId=api["id"], resourceId=resource["id"], httpMethod=method
            )
            assert integration["type"] == "AWS_PROXY"
            routes.add((method, resource["path"], integration["uri"].split(":function:")[1].split("/")[0]))
    # Every deployed route; the stream route stays out (no Web Adapter or response streaming there).
    assert routes == {route for route in deployed["routes"] if route[2] is not None}
    assert any(route[2] is None and route[1].endswith("/stream") for route in deployed["routes"])
    assert ("POST", "/api/auth/register", "minichat-local-api") in routes
    stages = {s["stageName"] for s in apigw.get_stages(restApiId=api["id"])["item"]}
    assert "dev" in stages


def test_the_relay_and_the_reaper_run_on_schedules(localstack: str, deployed: dict[str, Any]) -> None:
    events = _client(localstack, "events")
    lam = _client(localstack, "lambda")
    for name, expression in deployed["schedules"]:
        rule = events.describe_rule(Name=f"{name}-schedule")
        assert rule["ScheduleExpression"] == expression
        (target,) = events.list_targets_by_rule(Rule=f"{name}-schedule")["Targets"]
        assert target["Arn"] == lam.get_function(FunctionName=name)["Configuration"]["FunctionArn"]


def test_the_mq_bridge_invokes_the_deployed_worker_and_puts_the_batch_back_when_it_fails(
    localstack: str, deployed: dict[str, Any], tmp_path: Path
) -> None:
    """The bridge as `up.sh` runs it, against this LocalStack: the batch reaches Lambda's Invoke API for the
    deployed worker; LocalStack cannot execute it here, so the invoke fails, and the message goes back to
    the queue (as the event source mapping does on a function error) instead of being lost."""
    import pika

    from minichat import broker

    url = queue_with_one_message("minichat_test_bridge_localstack", b'{"probe": "localstack"}')
    log = localstack_log(localstack)
    invokes_before = log.read_text().count("lambda.Invoke =>")
    process = subprocess.Popen(
        [sys.executable, "infra/localstack/mq_bridge.py", "--endpoint", localstack],
        cwd=ROOT,
        env={**os.environ, "RABBITMQ_URL": url, **TOOL_ENV},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while log.read_text().count("lambda.Invoke =>") == invokes_before and time.monotonic() < deadline:
            assert process.poll() is None, process.communicate()[0]
            time.sleep(0.5)
    finally:
        process.terminate()
        output = process.communicate(timeout=60)[0]
    assert log.read_text().count("lambda.Invoke =>") > invokes_before, output
    connection = pika.BlockingConnection(pika.URLParameters(url))
    method, _properties, body = connection.channel().basic_get(broker.QUEUES[0], auto_ack=True)
    connection.close()
    assert method is not None and body == b'{"probe": "localstack"}', output  # back in the queue
    assert method.redelivered
