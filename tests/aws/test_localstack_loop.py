"""The LocalStack loop: the compose file against the Compose specification, the shell scripts with
shellcheck, the deploy script's and the bridge's --dry-run, the bridge's invoker on a stand-in Lambda
client, and the bridge run for real between RabbitMQ and a stand-in of Lambda's Invoke API."""

from __future__ import annotations

import base64
import http.server
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from aws_support import ROOT, load_script, queue_with_one_message, run_tool

pytestmark = pytest.mark.slow

COMPOSE = ROOT / "localstack-compose.yml"
SHELL_SCRIPTS = (
    "infra/localstack/up.sh",
    "infra/deploy/aws_tools.sh",
    "functions/stream/run.sh",
    "infra/samlocal/build_image.sh",
    "infra/samlocal/bootstrap",
    "infra/samlocal/lambda-entrypoint.sh",
)
# `docker compose config` without a Docker engine: interpolate ${VAR}, ${VAR:-default}, ${VAR:?error} as
# Compose does, then parse and validate against the Compose specification (compose-spec, strict).
CHECK_COMPOSE = r"""
import os, re, sys
from compose_spec import PyCompose

def interpolate(match):
    name, op, arg = match.group(1), match.group(2) or "", match.group(3) or ""
    value = os.environ.get(name)
    if op in (":-", "-"):
        return value if value or (op == "-" and value is not None) else arg
    if op in (":?", "?") and not value:
        sys.exit(f"required variable {name} is missing a value: {arg}")
    return value or ""

text = re.sub(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}", interpolate, open(sys.argv[1]).read())
spec = PyCompose.from_yaml(text).to_spec()
print(" ".join(sorted(spec.services)))
"""


def check_compose(aws_tools: Path, path: Path, **env: str) -> Any:
    command = ["env", *(f"{k}={v}" for k, v in env.items()), str(aws_tools / "python"), "-c", CHECK_COMPOSE]
    return run_tool([*command, str(path)], check=False)


def test_compose_file_follows_the_compose_specification(aws_tools: Path) -> None:
    result = check_compose(aws_tools, COMPOSE, LOCALSTACK_AUTH_TOKEN="ls-test-token")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["localstack", "postgres", "rabbitmq", "redis"]
    # Without the token Compose refuses to start, saying why.
    result = check_compose(aws_tools, COMPOSE, LOCALSTACK_AUTH_TOKEN="")
    assert result.returncode != 0
    assert "LOCALSTACK_AUTH_TOKEN" in result.stderr


def test_the_compose_check_catches_a_broken_file(aws_tools: Path, tmp_path: Path) -> None:
    broken = tmp_path / "broken.yml"
    broken.write_text(COMPOSE.read_text().replace("    healthcheck:", "    healthchek:", 1))
    result = check_compose(aws_tools, broken, LOCALSTACK_AUTH_TOKEN="ls-test-token")
    assert result.returncode != 0
    assert "healthchek" in result.stderr


def test_compose_services_match_what_the_code_expects() -> None:
    from minichat.config import Settings

    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    localstack = services["localstack"]
    assert localstack["environment"]["LOCALSTACK_AUTH_TOKEN"].startswith("${LOCALSTACK_AUTH_TOKEN:?")
    assert "/var/run/docker.sock:/var/run/docker.sock" in localstack["volumes"]  # Lambda runs in containers
    assert localstack["environment"]["LAMBDA_DOCKER_NETWORK"] == compose["networks"]["minichat"]["name"]
    # LocalStack's Lambda stores code in S3 and drives async invokes and event sources through SQS.
    assert {"lambda", "apigateway", "secretsmanager", "s3", "sqs"} <= set(
        localstack["environment"]["SERVICES"].split(",")
    )
    # A pinned image: the loop must not change under the user (every image here has a fixed tag).
    for service in services.values():
        tag = service["image"].rsplit(":", 1)[1]
        assert "latest" not in tag, service["image"]
    # Local mode's defaults reach the containers on their published ports.
    defaults = Settings()
    for name, url in (
        ("postgres", defaults.database_url),
        ("redis", defaults.redis_url),
        ("rabbitmq", defaults.rabbitmq_url),
    ):
        port = url.rsplit(":", 1)[1].split("/")[0]
        assert f"127.0.0.1:{port}:{port}" in services[name]["ports"], name
        assert "healthcheck" in services[name]
    # The functions in LocalStack reach the services by these names (infra/localstack/deploy.py).
    deploy = load_script("infra/localstack/deploy.py")
    for url in deploy.SERVICE_ENV.values():
        if "://" in url:
            assert url.split("@")[-1].split("//")[-1].split(":")[0] in services


@pytest.mark.parametrize("script", SHELL_SCRIPTS)
def test_shell_scripts_pass_shellcheck(aws_tools: Path, script: str) -> None:
    run_tool([str(aws_tools / "shellcheck"), "--severity=style", script])


def test_up_dry_run_prints_every_step_and_touches_nothing(aws_tools: Path) -> None:
    from minichat import broker

    api_routes = load_script("infra/deploy/api_routes.py")
    result = run_tool(["bash", "infra/localstack/up.sh", "--dry-run"], timeout=300)
    out = result.stdout
    assert "would run: docker compose -f localstack-compose.yml up -d --wait" in out
    for path, method in api_routes.chalice_routes():
        assert f"route   {method:6} {path:45} -> minichat-local-api" in out, (path, method)
    for path, method in api_routes.stream_routes():
        assert f"route   {method:6} {path:45} -> not deployed" in out
    for name in ("api", "worker", "relay", "reaper", "migrate"):
        assert f"function  minichat-local-{name} " in out, name
    assert "skip      StreamFunction" in out
    assert "schedule  minichat-local-relay rate(1 minute)" in out
    assert "schedule  minichat-local-reaper rate(1 minute)" in out
    assert "invoke    minichat-local-migrate" in out
    assert f"consume   {', '.join(broker.QUEUES)}" in out
    assert "invoke    minichat-local-worker" in out


class _StubLambda:
    """Stands in for boto3's Lambda client: records invocations, answers like Lambda."""

    def __init__(self, *, fail: bool) -> None:
        self.fail = fail
        self.calls: list[dict[str, Any]] = []

    def invoke(self, *, FunctionName: str, Payload: bytes) -> dict[str, Any]:
        self.calls.append({"function": FunctionName, "event": json.loads(Payload)})
        if self.fail:
            body = {"errorMessage": "database unavailable", "errorType": "ServiceUnavailable"}
            return {
                "StatusCode": 200,
                "FunctionError": "Unhandled",
                "Payload": io.BytesIO(json.dumps(body).encode()),
            }
        return {"StatusCode": 200, "Payload": io.BytesIO(b'{"messages": 1}')}


def test_bridge_invokes_the_worker_with_the_amazon_mq_event_and_raises_on_its_errors() -> None:
    bridge = load_script("infra/localstack/mq_bridge.py")
    event = json.loads((ROOT / "tests" / "events" / "amazon-mq-usage.json").read_text())
    ok = _StubLambda(fail=False)
    assert bridge.lambda_invoker("minichat-local-worker", ok)(event, None) == {"messages": 1}
    assert ok.calls == [{"function": "minichat-local-worker", "event": event}]
    failing = _StubLambda(fail=True)
    with pytest.raises(bridge.WorkerFunctionError, match="database unavailable"):
        bridge.lambda_invoker("minichat-local-worker", failing)(event, None)  # the consumer requeues


class _LambdaInvokeApi(http.server.BaseHTTPRequestHandler):
    """Lambda's Invoke API (POST /2015-03-31/functions/{name}/invocations), as LocalStack serves it."""

    calls: list[tuple[str, dict[str, Any]]] = []

    def do_POST(self) -> None:
        name = self.path.split("/functions/")[1].split("/")[0]
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.calls.append((name, json.loads(body)))
        reply = b'{"messages": 1}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: Any) -> None:
        pass


def test_bridge_runs_consuming_rabbitmq_and_invoking_through_the_lambda_api() -> None:
    """The bridge as `up.sh` starts it: a message published to the broker reaches the Lambda Invoke API as
    Amazon MQ's event, and is acknowledged."""
    from minichat import broker

    url = queue_with_one_message("minichat_test_bridge", b'{"probe": 1}')

    _LambdaInvokeApi.calls = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _LambdaInvokeApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    process = subprocess.Popen(
        [sys.executable, "infra/localstack/mq_bridge.py", "--endpoint", endpoint],
        cwd=ROOT,
        env={**os.environ, "RABBITMQ_URL": url, "AWS_EC2_METADATA_DISABLED": "true"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not _LambdaInvokeApi.calls and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=20)[0]
        server.shutdown()
    assert _LambdaInvokeApi.calls, f"the bridge invoked nothing:\n{output}"
    function, event = _LambdaInvokeApi.calls[0]
    assert function == "minichat-local-worker"
    assert event["eventSource"] == "aws:rmq"
    (messages,) = event["rmqMessagesByQueue"].values()
    assert [base64.b64decode(m["data"]) for m in messages] == [b'{"probe": 1}']
    with broker.connect(url) as connection:
        left = connection.channel().queue_declare(broker.QUEUES[0], passive=True).method.message_count
    assert left == 0
