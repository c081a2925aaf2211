"""One contract, every tier kind (as glance_store tests every driver): glance, swift and http are
read whole and in ranges, and say not-found, denied, short reads, resets and dead ends the same way.

Each kind runs against its real server (a glance-api, a Swift, an HTTP origin of our own); faults
come from an Upstream in front of it.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from cachenode.config import TierConfig
from cachenode.errors import TierDenied, TierError, TierNotFound, TierShortRead, TierUnavailable
from cachenode.glance import Credentials, ImageInfo
from cachenode.tiers import Tier, build_tier
from tests.support.glance import ALICE, Glance, Image
from tests.support.swift import Swift
from tests.support.upstream import Fault, Upstream

SIZE = 3 << 20


@dataclass
class Case:
    """A tier kind with an image on its real server, and a way to put faults in front of it."""

    kind: str
    image: Image
    creds: Credentials | None
    front: Callable[[list[Fault]], Upstream]  # an Upstream before the real server
    config: Callable[[str], TierConfig]  # tier config for a server URL (the real one or a front)
    url: str  # the real server's URL for this kind
    denied: Callable[[], tuple[TierConfig, Credentials | None]]  # a way to be refused


def info(image: Image, image_id: str | None = None) -> ImageInfo:
    return ImageInfo(
        id=image_id or image.id, status="active", size=len(image.data), checksum=image.md5,
        hash_algo="sha512", hash_value=image.sha512,
    )  # fmt: skip


@pytest.fixture(params=["glance", "swift", "http"])
def case(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Case]:
    kind = request.param
    if kind == "glance":
        glance: Glance = request.getfixturevalue("glance")
        image = glance.create_image(SIZE)
        yield Case(
            kind, image, Credentials.token(ALICE),
            front=lambda faults: Upstream(target=glance.url, faults=faults),
            config=lambda url: TierConfig(name="t", kind="glance", url=url, read_timeout=2),
            url=glance.url,
            denied=lambda: (TierConfig("t", "glance", glance.url), Credentials.token("x")),
        )  # fmt: skip
    elif kind == "swift":
        swift: Swift = request.getfixturevalue("swift")
        glance_swift: Glance = request.getfixturevalue("glance_swift")
        key: Path = request.getfixturevalue("temp_url_key")
        image = glance_swift.create_image(SIZE)
        wrong = tmp_path / "wrong.key"
        wrong.write_text("not the key")
        account = swift.storage_url.removeprefix(swift.url)

        def swift_config(url: str, key_file: Path = key) -> TierConfig:
            base = url if url.endswith(account) else url + account
            return TierConfig(
                name="t", kind="swift", url=base, temp_url_key_file=key_file, read_timeout=2
            )

        yield Case(
            kind, image, None,
            front=lambda faults: Upstream(target=swift.url, faults=faults),
            config=swift_config, url=swift.url,
            denied=lambda: (swift_config(swift.url, wrong), None),
        )  # fmt: skip
    else:
        data = os.urandom(SIZE)
        image = Image(str(uuid.uuid4()), data)
        refusing = Upstream(blobs={image.id: data}, faults=[Fault("deny", times=-1)])
        with Upstream(blobs={image.id: data}) as origin, refusing as deny:

            def front(faults: list[Fault]) -> Upstream:
                return Upstream(blobs={image.id: data}, faults=faults)

            yield Case(
                kind, image, None, front=front,
                config=lambda url: TierConfig(name="t", kind="http", url=url, read_timeout=2),
                url=origin.url,
                denied=lambda: (TierConfig(name="t", kind="http", url=deny.url), None),
            )  # fmt: skip


def read(config: TierConfig, image: ImageInfo, creds: Credentials | None, start: int = 0,
         end: int | None = None, exact: bool = False) -> tuple[int, bytes]:  # fmt: skip
    """(offset, bytes) of one open() of a fresh tier, run to the end of its body."""

    async def main() -> tuple[int, bytes]:
        tier: Tier = build_tier(config)
        try:
            async with tier.open(image, creds, start, end, exact) as body:
                return body.offset, b"".join([chunk async for chunk in body.chunks()])
        finally:
            await tier.close()

    return asyncio.run(main())


@contextmanager
def fronted(case: Case, *faults: Fault) -> Iterator[TierConfig]:
    with case.front(list(faults)) as upstream:
        yield case.config(upstream.url)


def test_whole_read(case: Case) -> None:
    offset, data = read(case.config(case.url), info(case.image), case.creds)
    assert offset == 0 and data == case.image.data


def test_exact_range(case: Case) -> None:
    offset, data = read(
        case.config(case.url), info(case.image), case.creds, 1000, 70_000, exact=True
    )
    assert offset == 1000 and data == case.image.data[1000:70_000]


def test_resume_at_an_offset(case: Case) -> None:
    start = SIZE // 2 + 7
    offset, data = read(case.config(case.url), info(case.image), case.creds, start)
    assert offset in (start, 0)  # a tier that cannot start there may say so by starting at 0
    assert data == case.image.data[offset:]


def test_not_found(case: Case) -> None:
    with pytest.raises(TierNotFound):
        read(case.config(case.url), info(case.image, str(uuid.uuid4())), case.creds)


def test_denied(case: Case) -> None:
    config, creds = case.denied()
    with pytest.raises(TierDenied):
        read(config, info(case.image), creds)


@pytest.mark.parametrize("kind", ["truncate", "reset"])
def test_short_read_and_reset(case: Case, kind: str) -> None:
    at = SIZE // 3
    with fronted(case, Fault(kind, at=at)) as config:
        try:
            offset, data = read(config, info(case.image), case.creds)
        except TierShortRead:
            return  # said as a short read
        assert offset == 0 and len(data) < SIZE  # or a body visibly shorter than the image
        assert data == case.image.data[: len(data)]


def test_stall_is_a_timeout(case: Case) -> None:
    with fronted(case, Fault("stall", at=SIZE // 3, seconds=10)) as config, \
            pytest.raises(TierUnavailable) as failure:  # fmt: skip
        read(config, info(case.image), case.creds)
    assert failure.value.kind == "timeout"


def test_unreachable(case: Case) -> None:
    config = case.config("http://127.0.0.1:9")
    with pytest.raises(TierUnavailable) as failure:
        read(config, info(case.image), case.creds)
    assert failure.value.kind == "connect"
    assert isinstance(failure.value, TierError)
