"""RabbitMQ: connections (AMQP or AMQPS for Amazon MQ) and the one place the topology is declared.

Topology (idempotent; every publisher and consumer declares it on connect):

    usage_event, audit_event        quorum queues, durable, x-delivery-limit, dead-lettered to
    minichat.dlx (direct exchange)  → usage_event.dlq, audit_event.dlq (quorum, durable)

Quorum queues because `x-delivery-limit` exists only for them: a batch that keeps failing (a bug, a
database down for long) is moved aside after DELIVERY_LIMIT deliveries instead of looping forever, and
Amazon MQ (RabbitMQ >= 3.13) recommends them for durability and poison messages. Dead-lettering is
at-least-once so a message on its way to the dead-letter queue cannot be lost; `replay_dead_letters`
puts it back once the cause is fixed.
"""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pika.adapters.utils.connection_workflow import AMQPConnectorException

from minichat.config import get_settings
from minichat.errors import ServiceUnavailable
from minichat.event_schema import QUEUES

__all__ = [
    "DEAD_LETTER_EXCHANGE",
    "DELIVERY_LIMIT",
    "QUEUES",
    "BrokerUnavailable",
    "TopologyMismatch",
    "connect",
    "connection_parameters",
    "dead_letter_queue",
    "declare_topology",
    "queue_arguments",
    "replay_dead_letters",
]

DEAD_LETTER_EXCHANGE = "minichat.dlx"
# Deliveries before a message is dead-lettered. High enough that the local consumer's backoff (0.5 s
# doubling to 30 s) rides out several minutes of database outage; low enough that a poison batch stops.
DELIVERY_LIMIT = 20

# Defaults for what the URL does not set (`?heartbeat=...` etc. in RABBITMQ_URL win).
_DEFAULTS: dict[str, Any] = {
    "heartbeat": 30,
    # A broker under a resource alarm blocks publishers; fail after this instead of hanging forever.
    "blocked_connection_timeout": 30.0,
    "socket_timeout": 5.0,
    "stack_timeout": 10.0,
    "connection_attempts": 1,  # callers own their retry loop and backoff
    # TCP_USER_TIMEOUT (ms) drops a connection whose sent data stays unacknowledged (a peer gone
    # silent, e.g. after a NAT timeout) long before two missed heartbeats would.
    "tcp_options": {"TCP_KEEPIDLE": 30, "TCP_KEEPINTVL": 10, "TCP_KEEPCNT": 3, "TCP_USER_TIMEOUT": 20_000},
}


class BrokerUnavailable(ServiceUnavailable):
    """RabbitMQ cannot be reached or refused an operation; events stay in the outbox."""

    default_message = "The message broker is unavailable; retry shortly."


class TopologyMismatch(RuntimeError):
    """A queue exists with other arguments than ours (RabbitMQ refuses to redeclare it)."""


def connection_parameters(
    url: str | None = None, *, name: str = "minichat", defaults: dict[str, Any] | None = None
) -> pika.URLParameters:
    """Parameters for RABBITMQ_URL: amqps:// verifies the server certificate and host name (Amazon MQ).

    `defaults` replace some of ours (the publisher's short timeouts); what the URL sets always wins.
    """
    url = url or get_settings().rabbitmq_url
    params = pika.URLParameters(url)
    given = parse_qs(urlsplit(url).query)
    for key, value in {**_DEFAULTS, **(defaults or {})}.items():
        if key not in given:
            setattr(params, key, value)
    if params.ssl_options is not None and params.ssl_options.server_hostname is None:
        # pika's amqps default is a verifying context without SNI/host name, which the TLS handshake
        # refuses; Amazon MQ (port 5671, TLS only) needs both.
        context = params.ssl_options.context
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        params.ssl_options = pika.SSLOptions(context, server_hostname=params.host)
    params.client_properties = {"connection_name": name}
    return params


def connect(
    url: str | None = None, *, name: str = "minichat", defaults: dict[str, Any] | None = None
) -> pika.BlockingConnection:
    """A new blocking connection; BrokerUnavailable when the broker cannot be reached."""
    try:
        return pika.BlockingConnection(connection_parameters(url, name=name, defaults=defaults))
    # AMQPConnectorException: a handshake that timed out (a peer that accepts and never answers) is not
    # an AMQPError; it escaped as an unexpected error, and nobody backed off.
    except (pika.exceptions.AMQPError, AMQPConnectorException, OSError) as exc:
        raise BrokerUnavailable() from exc


def dead_letter_queue(queue: str) -> str:
    """The dead-letter queue of a work queue."""
    return f"{queue}.dlq"


def queue_arguments(queue: str) -> dict[str, Any]:
    """The declared arguments of a work queue (the same on every declaration, or RabbitMQ refuses it)."""
    return {
        "x-queue-type": "quorum",
        "x-delivery-limit": DELIVERY_LIMIT,
        "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
        "x-dead-letter-routing-key": queue,
        # at-least-once dead-lettering requires reject-publish; no max-length is set, so it never rejects.
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def declare_topology(channel: BlockingChannel) -> None:
    """Declare the exchange and queues (idempotent); TopologyMismatch when a queue differs."""
    try:
        channel.exchange_declare(DEAD_LETTER_EXCHANGE, exchange_type="direct", durable=True)
        for queue in QUEUES:
            dlq = dead_letter_queue(queue)
            channel.queue_declare(dlq, durable=True, arguments={"x-queue-type": "quorum"})
            channel.queue_bind(dlq, DEAD_LETTER_EXCHANGE, routing_key=queue)
            channel.queue_declare(queue, durable=True, arguments=queue_arguments(queue))
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 406:  # PRECONDITION_FAILED: declared before with other arguments
            raise TopologyMismatch(
                f"a MiniChat queue exists with other arguments ({exc.reply_text}); delete it or migrate it"
            ) from exc
        raise


def replay_dead_letters(queue: str, *, limit: int = 10_000, url: str | None = None) -> int:
    """Move up to `limit` messages from the queue's dead-letter queue back to it; returns how many."""
    connection = connect(url, name="minichat-replay")
    moved = 0
    try:
        channel = connection.channel()
        declare_topology(channel)
        channel.confirm_delivery()
        while moved < limit:
            method, properties, body = channel.basic_get(dead_letter_queue(queue), auto_ack=False)
            if method is None:
                break
            # Acknowledged only once the broker confirmed the copy: a crash here duplicates (the worker
            # deduplicates), it never loses.
            channel.basic_publish("", queue, body, properties, mandatory=True)
            channel.basic_ack(method.delivery_tag)
            moved += 1
    except pika.exceptions.AMQPError as exc:
        raise BrokerUnavailable() from exc
    finally:
        if connection.is_open:
            connection.close()
    return moved


def main() -> None:
    """`python -m minichat.broker`: declare the topology on RABBITMQ_URL (a deploy step; it is idempotent)."""
    connection = connect(name="minichat-deploy")
    try:
        declare_topology(connection.channel())
    finally:
        connection.close()
    print("declared:", ", ".join(q for queue in QUEUES for q in (queue, dead_letter_queue(queue))))


if __name__ == "__main__":
    main()
