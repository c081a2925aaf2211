"""Fixtures shared by every test: the real glance-api (once per session) and sidecars."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.glance import TESTBED, Glance
from tests.support.sidecar import Sidecar


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


@pytest.fixture
def sidecar_factory(tmp_path: Path, glance: Glance) -> Iterator[type]:
    started: list[Sidecar] = []

    def make(name: str = "sidecar", glance_url: str | None = None, **config: object) -> Sidecar:
        car = Sidecar(tmp_path / name, glance_url or glance.url, **config)
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
