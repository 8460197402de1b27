"""Local mode's stand-in for the Amazon MQ event source mapping: RabbitMQ → batches → the worker handler.

Like the event source mapping, it gathers up to `batch_size` messages (100) or waits `batch_window`
(500 ms) after the first one, builds exactly Amazon MQ's event (`eventSource: "aws:rmq"`, messages grouped
by `queue::vhost`, `basicProperties`, base64 `data`), calls the same handler Lambda calls, acknowledges
the batch when the handler returns and rejects it back to the queue (requeue) when it raises. A batch that
keeps failing reaches the queue's delivery limit and is dead-lettered by the broker (see minichat.broker).
`python -m minichat_local.consumer` runs it in the foreground.
"""

from __future__ import annotations

import base64
import signal
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pika
import pika.exceptions
from pika.adapters.blocking_connection import BlockingChannel
from pika.spec import Basic, BasicProperties

from minichat import broker
from minichat.config import get_settings
from minichat.log import get_logger, setup_logging

__all__ = [
    "LOCAL_EVENT_SOURCE_ARN",
    "Consumer",
    "ConsumerStats",
    "Delivery",
    "build_mq_event",
    "java_date",
    "main",
]

log = get_logger("minichat.consumer")

Handler = Callable[[dict[str, Any], Any], Any]

LOCAL_EVENT_SOURCE_ARN = (
    "arn:aws:mq:local:000000000000:broker:minichat-local:b-00000000-0000-0000-0000-000000000000"
)
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


@dataclass(frozen=True, slots=True, kw_only=True)
class Delivery:
    """One message received from RabbitMQ, not yet acknowledged."""

    queue: str
    delivery_tag: int
    redelivered: bool
    properties: BasicProperties
    body: bytes


@dataclass
class ConsumerStats:
    """Counters, readable from any thread."""

    batches: int = 0
    messages: int = 0
    failures: int = 0
    connections: int = 0


# ---------------------------------------------------------------------------------------------------------
# The event shape (pure).


def java_date(seconds: int | None) -> str | None:
    """An AMQP timestamp the way the event source mapping renders it: `Jan 1, 1970, 12:33:41 AM` (UTC)."""
    if seconds is None:
        return None
    moment = datetime.fromtimestamp(seconds, UTC)
    hour = moment.hour % 12 or 12
    half = "AM" if moment.hour < 12 else "PM"
    month = _MONTHS[moment.month - 1]
    return f"{month} {moment.day}, {moment.year}, {hour}:{moment.minute:02d}:{moment.second:02d} {half}"


def _header_value(value: Any) -> Any:
    # The event source mapping passes string headers as their bytes: {"bytes": [118, 97, ...]}.
    if isinstance(value, str):
        return {"bytes": list(value.encode("utf-8"))}
    if isinstance(value, bytes | bytearray):
        return {"bytes": list(value)}
    if isinstance(value, Mapping):
        return {str(key): _header_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_header_value(item) for item in value]
    if isinstance(value, datetime):
        return java_date(int(value.timestamp()))
    if value is None or isinstance(value, bool | int | float):
        return value
    return str(value)  # Decimal and other AMQP field types


def _basic_properties(properties: BasicProperties, body_size: int) -> dict[str, Any]:
    return {
        "contentType": properties.content_type,
        "contentEncoding": properties.content_encoding,
        "headers": _header_value(properties.headers) if properties.headers is not None else None,
        "deliveryMode": properties.delivery_mode,
        "priority": properties.priority,
        "correlationId": properties.correlation_id,
        "replyTo": properties.reply_to,
        "expiration": properties.expiration,
        "messageId": properties.message_id,
        "timestamp": java_date(properties.timestamp),
        "type": properties.type,
        "userId": properties.user_id,
        "appId": properties.app_id,
        "clusterId": properties.cluster_id,
        "bodySize": body_size,
    }


def build_mq_event(
    deliveries: Sequence[Delivery], *, vhost: str, event_source_arn: str = LOCAL_EVENT_SOURCE_ARN
) -> dict[str, Any]:
    """Amazon MQ's RabbitMQ event for these deliveries, grouped by `queue::vhost` in arrival order."""
    by_queue: dict[str, list[dict[str, Any]]] = {}
    for delivery in deliveries:
        by_queue.setdefault(f"{delivery.queue}::{vhost}", []).append(
            {
                "basicProperties": _basic_properties(delivery.properties, len(delivery.body)),
                "redelivered": delivery.redelivered,
                "data": base64.b64encode(delivery.body).decode("ascii"),
            }
        )
    return {"eventSource": "aws:rmq", "eventSourceArn": event_source_arn, "rmqMessagesByQueue": by_queue}


class _LocalContext:
    """The parts of a Lambda context a handler may read."""

    function_name = "minichat-worker-local"
    memory_limit_in_mb = 512

    def __init__(self, timeout: float) -> None:
        self.aws_request_id = str(uuid.uuid4())
        self._deadline = time.monotonic() + timeout

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


# ---------------------------------------------------------------------------------------------------------
# The consumer.


class Consumer:
    """Feeds the worker handler with Amazon MQ-shaped batches from a background thread; reconnects."""

    def __init__(
        self,
        handler: Handler | None = None,
        *,
        url: str | None = None,
        queues: Sequence[str] = broker.QUEUES,
        batch_size: int = 100,
        batch_window: float = 0.5,
        retry_delay: float = 0.5,
        max_retry_delay: float = 30.0,
        reconnect_delay: float = 0.5,
        max_reconnect_delay: float = 5.0,
        event_source_arn: str = LOCAL_EVENT_SOURCE_ARN,
    ) -> None:
        if not 1 <= batch_size <= 10_000:
            raise ValueError("batch_size must be between 1 and 10000 (the event source mapping's range)")
        self._handler = handler
        self._url = url
        self._queues = tuple(queues)
        self._batch_size = batch_size
        self._batch_window = batch_window
        self._retry_delay = retry_delay
        self._max_retry_delay = max_retry_delay
        self._reconnect_delay = reconnect_delay
        self._max_reconnect_delay = max_reconnect_delay
        self._arn = event_source_arn
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._thread: threading.Thread | None = None
        self._buffer: list[Delivery] = []
        self._consumer_queues: dict[str, str] = {}
        self._failures_in_row = 0
        self.stats = ConsumerStats()

    # -- lifecycle ------------------------------------------------------------------------------------

    def start(self) -> None:
        """Run in a background (daemon) thread."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self.run, name="minichat-consumer", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the batch in hand, close the connection (unacknowledged messages go back to the queue)."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        self._thread = None

    def request_stop(self) -> None:
        """Ask the loop to end (safe from a signal handler)."""
        self._stop.set()

    def wait_connected(self, timeout: float) -> bool:
        """Block until the consumer is subscribed to its queues; False on timeout."""
        return self._connected.wait(timeout)

    def run(self) -> None:
        """Consume until stopped, reconnecting with backoff whenever the broker goes away."""
        handler = self._handler or _worker_handler()
        delay = self._reconnect_delay
        while not self._stop.is_set():
            try:
                self._consume(handler)
                delay = self._reconnect_delay
            except (broker.BrokerUnavailable, pika.exceptions.AMQPError, OSError) as exc:
                log.warning("consumer disconnected", error=type(exc).__name__, retry_in=delay)
            except broker.TopologyMismatch as exc:
                log.error("consumer cannot declare its queues", reason=str(exc), retry_in=delay)
            finally:
                self._connected.clear()
                self._buffer.clear()  # unacknowledged: the broker requeues them with the connection
            if self._stop.wait(delay):
                break
            delay = min(delay * 2, self._max_reconnect_delay)

    # -- one connection's life ------------------------------------------------------------------------

    def _consume(self, handler: Handler) -> None:
        connection = broker.connect(self._url, name="minichat-consumer")
        try:
            channel = connection.channel()
            broker.declare_topology(channel)
            # Twice a batch: the next batch is already on its way while the handler runs.
            channel.basic_qos(prefetch_count=2 * self._batch_size)
            self._consumer_queues = {
                channel.basic_consume(queue, on_message_callback=self._on_message): queue
                for queue in self._queues
            }
            vhost = broker.connection_parameters(self._url).virtual_host
            self.stats.connections += 1
            self._connected.set()
            log.info("consumer connected", queues=list(self._queues), vhost=vhost)
            while not self._stop.is_set():
                self._gather(connection)
                if self._buffer:
                    self._deliver(connection, channel, handler, vhost)
        finally:
            if connection.is_open:
                try:
                    connection.close()
                except (pika.exceptions.AMQPError, OSError):
                    log.info("consumer connection already gone")

    def _on_message(
        self, _channel: BlockingChannel, method: Basic.Deliver, properties: BasicProperties, body: bytes
    ) -> None:
        queue = self._consumer_queues.get(method.consumer_tag or "", method.routing_key or "")
        self._buffer.append(
            Delivery(
                queue=queue,
                delivery_tag=method.delivery_tag or 0,
                redelivered=bool(method.redelivered),
                properties=properties,
                body=body,
            )
        )

    def _gather(self, connection: pika.BlockingConnection) -> None:
        """Fill the buffer until a batch is full or the window since its first message has passed."""
        if not self._buffer:
            connection.process_data_events(time_limit=0.1)  # idle: wake up often to notice stop()
            if not self._buffer:
                return
        deadline = time.monotonic() + self._batch_window
        while len(self._buffer) < self._batch_size and not self._stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            connection.process_data_events(time_limit=min(remaining, 0.1))

    def _deliver(
        self, connection: pika.BlockingConnection, channel: BlockingChannel, handler: Handler, vhost: str
    ) -> None:
        batch = self._buffer[: self._batch_size]
        del self._buffer[: len(batch)]
        # Delivery tags grow in arrival order on the channel and every earlier message was settled, so
        # settling "up to the last tag" settles exactly this batch.
        last_tag = batch[-1].delivery_tag
        event = build_mq_event(batch, vhost=vhost, event_source_arn=self._arn)
        try:
            handler(event, _LocalContext(timeout=60.0))
        except Exception as exc:  # any failure: the batch was not written, so it must not be acknowledged
            self._failures_in_row += 1
            self.stats.failures += 1
            delay = min(self._retry_delay * 2 ** (self._failures_in_row - 1), self._max_retry_delay)
            log.error(
                "worker batch rejected",
                messages=len(batch),
                error=type(exc).__name__,
                reason=str(exc),
                retry_in=delay,
            )
            # Wait before requeueing, so a database outage costs a few deliveries, not thousands; the
            # connection keeps answering heartbeats meanwhile.
            self._sleep(connection, delay)
            channel.basic_nack(delivery_tag=last_tag, multiple=True, requeue=True)
            return
        channel.basic_ack(delivery_tag=last_tag, multiple=True)
        self._failures_in_row = 0
        self.stats.batches += 1
        self.stats.messages += len(batch)

    def _sleep(self, connection: pika.BlockingConnection, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            connection.sleep(min(remaining, 0.1))


def _worker_handler() -> Handler:
    from minichat_local.functions import load_function

    handler: Handler = load_function("worker", "handler").handler
    return handler


def main() -> None:
    """`python -m minichat_local.consumer`: consume in the foreground until SIGTERM or Ctrl-C."""
    settings = get_settings()
    setup_logging(settings.log_level)
    consumer = Consumer()
    signal.signal(signal.SIGTERM, lambda _signum, _frame: consumer.request_stop())
    try:
        consumer.run()
    except KeyboardInterrupt:
        consumer.request_stop()


if __name__ == "__main__":
    main()
