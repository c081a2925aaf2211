"""Fixtures shared by every test: the real glance-api (once per session) and sidecars."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.glance import TESTBED, Glance
from tests.support.keystone import KeystoneBed
from tests.support.rabbit import Rabbit
from tests.support.sidecar import Sidecar
from tests.support.swift import Swift
from tests.support.systemd import Sockets

# glance_store writes an image uploaded without a length (chunked) as segments of this many MiB
# plus a manifest; an image of known length below 5 GiB is one object.
SWIFT_SEGMENTS = {"GLANCE_SWIFT_CHUNK_MB": "2"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in item.nodeid.split("/"):
            item.add_marker(pytest.mark.glance)


@pytest.fixture(scope="session")
def glance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Glance]:
    """A real glance-api with its image cache on (fakeauth+caching), shared by the session."""
    subprocess.run([str(TESTBED / "install.sh")], check=True)
    bed = Glance(tmp_path_factory.mktemp("glance")).start()
    yield bed
    bed.stop()


@pytest.fixture(scope="session")
def swift(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swift]:
    """A real one-node Swift (tempauth, tempurl, memcached), shared by the session."""
    subprocess.run([str(TESTBED / "install.sh")], check=True)
    bed = Swift(tmp_path_factory.mktemp("swift")).start()
    yield bed
    bed.stop()


@pytest.fixture(scope="session")
def glance_swift(tmp_path_factory: pytest.TempPathFactory, swift: Swift) -> Iterator[Glance]:
    """A real glance-api that stores images in ``swift``, with its image cache on."""
    bed = Glance(tmp_path_factory.mktemp("glance-swift"), env=SWIFT_SEGMENTS).start(swift.base)
    yield bed
    bed.stop()


@pytest.fixture(scope="session")
def glance_swift_hidden(tmp_path_factory: pytest.TempPathFactory, swift: Swift) -> Iterator[Glance]:
    """A glance-api on ``swift`` as clouds run one: locations hidden from users
    (show_image_direct_url and show_multiple_locations False), and images spread over
    containers ``glance_<first 3 characters of the id>`` (swift_store_multiple_containers_seed)."""
    env = {"GLANCE_SHOW_LOCATIONS": "False", "GLANCE_SWIFT_CONTAINERS_SEED": "3"}
    bed = Glance(tmp_path_factory.mktemp("glance-swift-hidden"), env=env).start(swift.base)
    yield bed
    bed.stop()


@pytest.fixture(scope="session")
def temp_url_key(tmp_path_factory: pytest.TempPathFactory, swift: Swift) -> Path:
    """A file with the glance account's TempURL key, the key set on the account."""
    path = tmp_path_factory.mktemp("keys") / "tempurl.key"
    key = os.urandom(16).hex()
    path.write_text(key + "\n")
    swift.set_temp_url_key(key)
    return path


@pytest.fixture(scope="session")
def rabbit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rabbit]:
    """A private RabbitMQ (Debian's rabbitmq-server), the bus Glance's notifications go on."""
    bed = Rabbit(tmp_path_factory.mktemp("rabbit")).start()
    yield bed
    bed.stop()


@pytest.fixture(scope="session")
def glance_notifying(tmp_path_factory: pytest.TempPathFactory, rabbit: Rabbit) -> Iterator[Glance]:
    """A real glance-api that publishes its notifications (messagingv2) on ``rabbit``."""
    subprocess.run([str(TESTBED / "install.sh")], check=True)
    env = {"GLANCE_TRANSPORT_URL": rabbit.transport_url}
    bed = Glance(tmp_path_factory.mktemp("glance-notifying"), env=env).start()
    yield bed
    bed.stop()


@pytest.fixture(scope="session")
def keystone_bed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeystoneBed]:
    """A real Keystone (60 s tokens) and a glance-api that checks tokens with keystonemiddleware."""
    subprocess.run([str(TESTBED / "install.sh")], check=True)
    bed = KeystoneBed(tmp_path_factory.mktemp("keystone")).start()
    yield bed
    bed.stop()


@pytest.fixture
def sidecar_factory(tmp_path: Path, glance: Glance) -> Iterator[type]:
    started: list[Sidecar] = []

    def make(
        name: str = "sidecar",
        glance_url: str | None = None,
        sockets: Sockets | None = None,
        from_catalog: bool = False,  # no glance.url: service_auth finds it in Keystone's catalog
        **config: object,
    ) -> Sidecar:
        url = None if from_catalog else glance_url or glance.url
        car = Sidecar(tmp_path / name, url, sockets, **config)
        started.append(car)
        return car

    yield make  # type: ignore[misc]
    for car in started:
        car.stop()


@pytest.fixture
def sidecar(sidecar_factory) -> Sidecar:  # type: ignore[no-untyped-def]
    """A sidecar in front of the real Glance, with Glance itself as its one tier."""
    return sidecar_factory().start()


@pytest.fixture(scope="session")
def testbed_bin() -> Path:
    return (
        Path(os.environ.get("CACHENODE_TESTBED", Path.home() / ".cache/cachenode-testbed"))
        / "venv/bin"
    )
