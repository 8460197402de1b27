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

import itertools
import ssl
from collections.abc import Callable, Sequence
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
    "Publisher",
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


class Publisher:
    """One connection that publishes with publisher confirms, a batch at a time: the batch's messages go
    out together and their confirms are awaited together, one round trip per batch.

    (BlockingChannel.basic_publish waits for each message's confirm in turn: a round trip per message,
    and RabbitMQ writes each to its quorum queues' log alone. For 1,500 events that cost the publisher
    0.23 s and RabbitMQ 0.52 s of CPU, against 0.05 s and 0.06 s in batches: bench_stream's 500-stream
    round publishes that many.)

    pika's SelectConnection, driven from the calling thread: its I/O loop runs only inside these
    methods, so one thread at a time may call them. Every wait has a deadline; a publisher that failed
    is closed and a new one is made.
    """

    def __init__(self, parameters: pika.ConnectionParameters, *, timeout: float) -> None:
        self._parameters = parameters
        self._timeout = timeout  # for the connection, for a batch's confirms
        self._connection: pika.SelectConnection | None = None
        self._channel: Any = None
        self._ready = False
        self._error: BaseException | None = None  # why the connection or channel is unusable
        self._until: Callable[[], bool] | None = None  # what the running I/O loop waits for
        self._next_tag = 1  # the channel's delivery tag of the next message published
        self._unconfirmed: dict[int, int] = {}  # delivery tag → index in the batch
        self._batch_index: dict[str | None, int] = {}  # message id → index in the batch
        self._taken: list[bool] = []
        self._returned: set[int] = set()

    @property
    def is_open(self) -> bool:
        return self._ready and self._error is None

    @property
    def error(self) -> BaseException | None:
        """Why the publisher failed (None while it works)."""
        return self._error

    def open(self) -> None:
        """Connect and open a channel in confirm mode; BrokerUnavailable when that fails."""
        self._connection = pika.SelectConnection(
            self._parameters,
            on_open_callback=self._on_connection_open,
            on_open_error_callback=self._on_failure,
            on_close_callback=self._on_failure,
        )
        try:
            # The connection's own timeouts (socket, stack) end a failed attempt first.
            opened = self._run(lambda: self._ready or self._error is not None, self._timeout)
        except (pika.exceptions.AMQPError, OSError) as exc:
            self._error = exc
            opened = False
        if not opened or self._error is not None:
            error = self._error
            self.close()
            raise BrokerUnavailable() from error

    def publish(self, messages: Sequence[tuple[str, bytes, pika.BasicProperties]]) -> int:
        """Publish (queue, body, properties) messages, each with its own message_id; how many of them, from
        the first, the broker took (confirmed, not returned as unroutable). Fewer than all: the message after
        those was refused, or the connection failed or the confirms did not come in time; the publisher is
        then closed, and what follows the first failure counts as not taken (it is published again)."""
        if not self.is_open:
            raise BrokerUnavailable()
        self._taken = [False] * len(messages)
        self._returned.clear()
        self._batch_index = {}
        try:
            for index, (queue, body, properties) in enumerate(messages):
                self._channel.basic_publish("", queue, body, properties, mandatory=True)
                self._unconfirmed[self._next_tag] = index
                self._next_tag += 1
                self._batch_index[properties.message_id] = index
            self._run(lambda: not self._unconfirmed or self._error is not None, self._timeout)
        except (pika.exceptions.AMQPError, OSError) as exc:
            self._error = exc
        if self._unconfirmed and self._error is None:
            self._error = TimeoutError(f"no confirm within {self._timeout:g} s")
        taken = 0
        while taken < len(messages) and self._taken[taken]:
            taken += 1
        if taken < len(messages):
            if self._error is None:
                refusal = "returned it, unroutable" if taken in self._returned else "nacked it"
                self._error = pika.exceptions.AMQPError(
                    f"message {taken + 1} of {len(messages)}: the broker {refusal}"
                )
            self.close()
        return taken

    def check(self) -> bool:
        """Handle what arrived meanwhile (heartbeats, the broker closing the connection); True if usable."""
        if self.is_open:
            try:
                self._run(lambda: True, 0.0)
            except (pika.exceptions.AMQPError, OSError) as exc:
                self._error = exc
        return self.is_open

    def close(self) -> None:
        """Close the connection: a broker that does not answer within a second is left to the socket's own
        timeouts."""
        connection, self._connection = self._connection, None
        self._ready = False
        self._unconfirmed.clear()
        if connection is None:
            return
        if connection.is_closed:
            connection.ioloop.close()
            return
        if not connection.is_closing:
            try:
                connection.close()
            except (pika.exceptions.AMQPError, OSError):
                return
        self._connection = connection
        try:
            self._run(lambda: connection.is_closed, 1.0)
        finally:
            self._connection = None
            if connection.is_closed:
                connection.ioloop.close()  # its poller's descriptors

    # --- the I/O loop and its callbacks -----------------------------------------------------------------

    def _run(self, until: Callable[[], bool], timeout: float) -> bool:
        """Run the I/O loop until `until()` holds or `timeout` seconds passed (0: one pass over what is
        ready); whether it holds."""
        connection = self._connection
        if connection is None:
            return until()
        if until() and timeout > 0:
            return True
        ioloop = connection.ioloop
        self._until = until
        timer = ioloop.call_later(timeout, ioloop.stop)
        try:
            ioloop.start()
        finally:
            ioloop.remove_timeout(timer)
            self._until = None
        return until()

    def _wake(self) -> None:
        if self._until is not None and self._until() and self._connection is not None:
            self._connection.ioloop.stop()

    def _on_connection_open(self, connection: Any) -> None:
        connection.channel(on_open_callback=self._on_channel_open)

    def _on_channel_open(self, channel: Any) -> None:
        self._channel = channel
        channel.add_on_close_callback(self._on_failure)
        channel.add_on_return_callback(self._on_return)
        channel.confirm_delivery(ack_nack_callback=self._on_confirm, callback=self._on_confirm_mode)

    def _on_confirm_mode(self, _frame: Any) -> None:
        self._ready = True
        self._wake()

    def _on_failure(self, _source: Any, error: BaseException | str | None = None) -> None:
        self._error = error if isinstance(error, BaseException) else pika.exceptions.AMQPError(str(error))
        self._ready = False
        self._wake()

    def _on_return(self, _channel: Any, _method: Any, properties: pika.BasicProperties, _body: bytes) -> None:
        # Sent before the message's ack: it reached no queue.
        index = self._batch_index.get(properties.message_id)
        if index is not None:
            self._returned.add(index)

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        taken = isinstance(method, pika.spec.Basic.Ack)
        last = method.delivery_tag
        # `multiple`: every message up to this tag (the dict holds the tags in ascending order).
        tags = (
            list(itertools.takewhile(lambda t: t <= last, self._unconfirmed)) if method.multiple else [last]
        )
        for tag in tags:
            index = self._unconfirmed.pop(tag, None)
            if index is not None:
                self._taken[index] = taken and index not in self._returned
        self._wake()


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
