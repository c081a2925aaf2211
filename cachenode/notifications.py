"""Glance's notifications: drop what Glance has just taken away, warm what it has just published.

Glance (``[oslo_messaging_notifications] driver = messagingv2``) publishes every image event on
the topic exchange ``glance`` with routing key ``notifications.info``, each body the oslo v2
envelope ``{"oslo.version": "2.0", "oslo.message": "<json>"}``. The listener binds a queue of its
own to that exchange and acts on:

    image.delete                   evict the image from L1, stop a fill of it in flight (nothing
                                   committed, readers cut), forget its authorizations
    image.update, image.member.*   forget its authorizations (the next caller is asked of Glance)
    image.activate                 warm it, when the warm policy selects it (``Warmer.activated``)

Decisions:

- The payload never grants anything: it can only drop a remembered decision, evict, or name an
  image to look up. Anyone who can publish on the bus could forge it; the worst a forgery does is
  cost a probe or a download. Warming reads the image from Glance with the service credentials
  and asks the policy about Glance's record, not the payload's.
- A delete also stops the image's fill in flight (``Fills.stop``): it would commit bytes nobody
  may ask for again, holding disk until something noticed; its readers are cut, as Glance would
  refuse them now (a retry is asked of Glance first: 404). Only a delete means the bytes must
  go: a deactivation (an ``image.update``) keeps the entry, as it may be reactivated, and keeps
  its fill, whose readers were authorized before it, like a hit being streamed at that moment;
  the next caller is asked of Glance.
- Every ``image.update`` forgets, not only a deactivation or a visibility change: the payload is
  the image after the change, so a visibility change cannot be told from a rename without
  remembering the previous state; an update is rare and costs one probe per remembered caller.
- kombu, not oslo.messaging: one pure-Python library (with ``amqp``) instead of oslo's tree of
  dependencies (oslo.config, oslo.utils, eventlet-era executors) for one consumer of one queue.
  kombu blocks, so it runs in a thread of its own; each notice goes to the event loop with
  ``call_soon_threadsafe``, and nothing of the data plane ever waits on the bus.
- The exchange is declared as Glance declares it (RabbitMQ refuses a second declaration that
  differs): not durable, unless ``notifications.durable_exchange`` says Glance's
  ``[oslo_messaging_rabbit] amqp_durable_queues`` is on. A mismatch shows as a listener that never
  connects (its log says ``PRECONDITION_FAILED``), never as a download lost.
- The queue is named afresh for every connection (``cachenode.<host>.<random>``), not durable and
  auto-deleted, with ``x-expires`` as well: a host that dies leaves nothing behind on the broker,
  and a restarted sidecar never competes with its former self for messages. Messages are not
  acknowledged one by one (``no_ack``): a notice lost is bounded by ``authz.ttl`` anyway.
- A bus that is down, restarted or unreachable costs no download: the listener reconnects with
  exponential backoff (0.5 s to 30 s), ``cachenode_notifications_connected`` says where it stands,
  and authorizations are still remembered for at most ``authz.ttl``: notifications only shorten
  that window, they never lengthen it. Every (re)connection drops every remembered decision
  (``on_connected``): what Glance changed while the listener was away was never heard.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import kombu
import kombu.exceptions

from cachenode.metrics import NOTIFICATIONS, Metrics

log = logging.getLogger(__name__)

EXCHANGE = "glance"
ROUTING_KEY = "notifications.info"
MEMBER_EVENTS = ("image.member.create", "image.member.update", "image.member.delete")
QUEUE_EXPIRES_MS = 10 * 60 * 1000


class MalformedNotice(ValueError):
    """A message on the bus that is not an oslo v2 notification about an image."""


@dataclass(frozen=True)
class Notice:
    event: str
    image_id: str | None
    action: str  # "evict" | "forget" | "warm" | "ignore"


def action_for(event: str) -> str:
    if event == "image.delete":
        return "evict"
    if event == "image.update" or event in MEMBER_EVENTS:
        return "forget"
    if event == "image.activate":
        return "warm"
    return "ignore"


def parse(body: bytes | str) -> Notice:
    """The notice in one message body; raises MalformedNotice (bad JSON, not an oslo v2
    envelope, an image event without an image id)."""
    try:
        outer = json.loads(body)
        message = json.loads(outer["oslo.message"]) if isinstance(outer, dict) else None
    except (ValueError, KeyError, TypeError) as exc:
        raise MalformedNotice(f"not an oslo v2 envelope: {exc}") from None
    if not isinstance(message, dict) or not isinstance(message.get("event_type"), str):
        raise MalformedNotice("no event_type")
    event = message["event_type"]
    action = action_for(event)
    payload = message.get("payload")
    key = "image_id" if event in MEMBER_EVENTS else "id"
    image_id = payload.get(key) if isinstance(payload, dict) else None
    if action != "ignore" and not (isinstance(image_id, str) and image_id):
        raise MalformedNotice(f"{event} without payload.{key}")
    return Notice(event, image_id if isinstance(image_id, str) else None, action)


def kombu_url(transport_url: str) -> str:
    """oslo's ``rabbit://u:p@h1:5672,u:p@h2:5672/vhost`` as kombu's ``amqp://...;amqp://...``."""
    parts = urlsplit(transport_url)
    if parts.scheme not in ("rabbit", "amqp"):
        raise ValueError(f"not a rabbit:// URL: scheme {parts.scheme!r}")
    hosts = [h for h in parts.netloc.split(",") if h]
    if not hosts or not all(h.rpartition("@")[2] for h in hosts):
        raise ValueError("no host")
    path = parts.path or "/"
    return ";".join(f"amqp://{host}{path}" for host in hosts)


class Listener:
    """Consumes Glance's notifications in a thread; hands each notice to ``on_notice`` on
    ``loop``. ``start``/``stop`` from the loop's thread."""

    def __init__(
        self,
        transport_url: str,
        on_notice: Callable[[Notice], None],
        metrics: Metrics,
        loop: asyncio.AbstractEventLoop,
        on_connected: Callable[[], None] = lambda: None,
        durable: bool = False,
        backoff: tuple[float, float] = (0.5, 30.0),
    ) -> None:
        self.url = kombu_url(transport_url)
        self.on_notice = on_notice
        self.on_connected = on_connected
        self.durable = durable
        self.metrics = metrics
        self.loop = loop
        self.backoff = backoff
        self.connected = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        probe = kombu.Connection(self.url)
        self._errors: tuple[type[BaseException], ...] = (
            OSError, kombu.exceptions.OperationalError, *probe.connection_errors,
            *probe.channel_errors,
        )  # fmt: skip

    def state(self) -> str:
        return "connected" if self.connected else "disconnected"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="notifications", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        delay = self.backoff[0]
        while not self._stop.is_set():
            try:
                self._consume()
                delay = self.backoff[0]
            except self._errors as exc:
                if self.connected:
                    log.warning("notifications: lost the bus (%s); reconnecting", exc)
                else:
                    log.warning("notifications: cannot listen on the bus (%s); retry in %.1fs",
                                exc, delay)  # fmt: skip
            except Exception:  # a bug of ours or kombu's must not end listening for good
                log.exception("notifications: listener failed; retry in %.1fs", delay)
            self._set_connected(False)
            if self._stop.wait(delay):
                break
            delay = min(delay * 2, self.backoff[1])

    def _consume(self) -> None:
        name = f"cachenode.{socket.gethostname()}.{secrets.token_hex(4)}"
        exchange = kombu.Exchange(EXCHANGE, type="topic", durable=self.durable)
        queue = kombu.Queue(
            name, exchange, routing_key=ROUTING_KEY, durable=False, auto_delete=True,
            queue_arguments={"x-expires": QUEUE_EXPIRES_MS},
        )  # fmt: skip
        with kombu.Connection(self.url, connect_timeout=5, heartbeat=10) as conn:
            conn.ensure_connection(max_retries=0)  # our backoff, not kombu's sleeps
            with conn.Consumer(queue, on_message=self._message, no_ack=True, accept=[]):
                self._set_connected(True)
                self.loop.call_soon_threadsafe(self.on_connected)
                log.info("notifications: listening on exchange %s (queue %s)", EXCHANGE, name)
                while not self._stop.is_set():
                    try:
                        conn.drain_events(timeout=1)
                    except TimeoutError:
                        conn.heartbeat_check()

    def _set_connected(self, connected: bool) -> None:
        self.connected = connected
        self.metrics.notifications_connected.set(1 if connected else 0)

    def _message(self, message: Any) -> None:
        try:
            notice = parse(message.body)
        except MalformedNotice as exc:
            log.warning("notifications: ignored a message: %s", exc)
            self.metrics.notifications.labels("malformed", "ignore").inc()
            return
        self.loop.call_soon_threadsafe(self.on_notice, notice)


class Invalidator:
    """What a notice does, on the event loop: evicts, forgets, or hands over to warm."""

    def __init__(
        self,
        metrics: Metrics,
        forget: Callable[[str], None],
        evict: Callable[[str, str], Any],
        warm: Callable[[str], object] | None,
        stop_fill: Callable[[str, str], bool] = lambda image_id, why: False,
    ) -> None:
        self.metrics = metrics
        self.forget = forget
        self.evict = evict
        self.warm = warm
        self.stop_fill = stop_fill
        self._tasks: set[asyncio.Task[Any]] = set()

    def __call__(self, notice: Notice) -> None:
        action = notice.action
        if action == "warm" and self.warm is None:
            action = "ignore"
        event = notice.event if notice.event in NOTIFICATIONS else "other"
        self.metrics.notifications.labels(event, action).inc()
        if notice.image_id is None or action == "ignore":
            return
        if action == "warm" and self.warm is not None:
            self.warm(notice.image_id)
            return
        self.forget(notice.image_id)
        if action == "evict":
            log.info("notifications: %s deleted in Glance: evicting it", notice.image_id)
            if self.stop_fill(notice.image_id, "deleted"):
                log.info("notifications: stopping the fill of %s", notice.image_id)
            task = asyncio.ensure_future(self.evict(notice.image_id, "deleted"))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
