"""A private RabbitMQ from tests/testbed/start-rabbitmq.sh, and a way to publish on it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import kombu

from tests.support.glance import TESTBED


class Rabbit:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.port = 0
        self.transport_url = ""

    def start(self) -> Rabbit:
        """Start it; again after ``stop`` is a restarted bus on the same port (nothing kept)."""
        command = [str(TESTBED / "start-rabbitmq.sh"), str(self.base)]
        if self.port:
            command.append(str(self.port))
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        for line in (self.base / "env.sh").read_text().splitlines():
            for word in line.removeprefix("export ").split():
                key, _, value = word.partition("=")
                if key == "TRANSPORT_URL":
                    self.transport_url = value
                if key == "RABBITMQ_NODE_PORT":
                    self.port = int(value)
        return self

    def stop(self) -> None:
        subprocess.run([str(TESTBED / "stop-rabbitmq.sh"), str(self.base)], check=False,
                       stdout=subprocess.DEVNULL)  # fmt: skip

    def url_file(self, directory: Path) -> Path:
        path = directory / "transport.url"
        path.write_text(self.transport_url + "\n")
        return path

    def publish(self, body: str | bytes) -> None:
        """One raw message on Glance's exchange and routing key, as glance-api would send it."""
        url = self.transport_url.replace("rabbit://", "amqp://", 1)
        with kombu.Connection(url) as conn:
            exchange = kombu.Exchange("glance", type="topic", durable=False)
            producer = conn.Producer()
            producer.publish(body, exchange=exchange, routing_key="notifications.info",
                             declare=[exchange], content_type="application/json",
                             content_encoding="utf-8")  # fmt: skip


def envelope(event_type: str, payload: dict[str, Any]) -> str:
    """An oslo v2 envelope around one notification."""
    message = {"event_type": event_type, "payload": payload, "priority": "INFO",
               "publisher_id": "image.test", "message_id": "m", "timestamp": "t"}  # fmt: skip
    return json.dumps({"oslo.version": "2.0", "oslo.message": json.dumps(message)})
