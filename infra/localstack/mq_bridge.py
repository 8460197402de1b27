"""The MQ trigger LocalStack lacks: consume RabbitMQ, invoke the worker function with Amazon MQ's event.

    .venv/bin/python infra/localstack/mq_bridge.py [--function minichat-local-worker] [--dry-run]

Local mode's consumer (minichat_local.consumer) already behaves like the event source mapping: batches
of up to 100 messages or 500 ms, Amazon MQ's event (`aws:rmq`, `queue::vhost`, base64 data), acknowledge
when the handler returns, requeue when it raises. Here its handler is a Lambda invocation in LocalStack:
a function error raises, so the batch goes back to the queue and is retried, as on AWS.
RABBITMQ_URL (default amqp://guest:guest@127.0.0.1:5672/%2F, the compose file's broker) says where.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Any

DEFAULT_FUNCTION = "minichat-local-worker"
EVENT_SOURCE_ARN = "arn:aws:mq:us-east-1:000000000000:broker:minichat-localstack:b-localstack"


class WorkerFunctionError(RuntimeError):
    """The worker function raised: the batch is requeued."""


def lambda_client(endpoint: str) -> Any:
    """The Lambda client for LocalStack at `endpoint` (localstack-client sets the endpoint and test keys)."""
    from urllib.parse import urlsplit

    from localstack_client.session import Session

    session = Session(
        region_name=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        localstack_host=urlsplit(endpoint).netloc,
    )
    return session.client("lambda")


def lambda_invoker(function: str, client: Any) -> Any:
    """A handler for the consumer that invokes `function` and raises on a function error."""

    def invoke(event: dict[str, Any], context: Any) -> Any:
        response = client.invoke(FunctionName=function, Payload=json.dumps(event).encode())
        payload = response["Payload"].read().decode()
        if "FunctionError" in response:
            raise WorkerFunctionError(payload[:500])
        return json.loads(payload) if payload else None

    return invoke


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--function", default=DEFAULT_FUNCTION)
    parser.add_argument("--endpoint", default=os.environ.get("LOCALSTACK_ENDPOINT", "http://localhost:4566"))
    parser.add_argument("--dry-run", action="store_true", help="say what would be consumed and invoked")
    args = parser.parse_args()

    from minichat import broker
    from minichat.config import get_settings
    from minichat.log import setup_logging
    from minichat_local.consumer import Consumer

    settings = get_settings()
    if args.dry_run:
        host = broker.connection_parameters(settings.rabbitmq_url).host
        print(f"consume   {', '.join(broker.QUEUES)} at {host}")
        print(
            f"invoke    {args.function} at {args.endpoint} with Amazon MQ's event (batch 100, window 0.5 s)"
        )
        return 0
    setup_logging(settings.log_level)
    consumer = Consumer(
        lambda_invoker(args.function, lambda_client(args.endpoint)), event_source_arn=EVENT_SOURCE_ARN
    )
    signal.signal(signal.SIGTERM, lambda _signum, _frame: consumer.request_stop())
    try:
        consumer.run()
    except KeyboardInterrupt:
        consumer.request_stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
