"""Glance's locations API: what an answer must be, what is kept and for how long, what the swift
tier reads with it (the real API is exercised in tests/integration/test_locations_api.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from cachenode.config import TierConfig
from cachenode.errors import GlanceRefused, GlanceUnavailable
from cachenode.glance import LOCATIONS_BODY_LIMIT, Credentials, ImageInfo, parse_locations
from cachenode.locations import Locator
from cachenode.metrics import Metrics
from cachenode.tiers.swift import SwiftTier

ID = "8c9c8a8e-3f3a-4b1e-9d55-1b2a3c4d5e6f"
ACCOUNT = "http://swift.example:8080/v1/AUTH_glance"
SWIFT = f"swift+config://ref1/glance_8c/{ID}"


def test_an_answer_is_a_list_of_locations_with_urls() -> None:
    body = json.dumps([{"url": SWIFT, "metadata": {"store": "swift1"}},
                       {"url": "file:///x", "metadata": {}}, {"url": SWIFT}]).encode()  # fmt: skip
    assert parse_locations(body) == (SWIFT, "file:///x")
    assert parse_locations(b"[]") == ()


@pytest.mark.parametrize(
    "body",
    [b"", b"<html>maintenance</html>", b'{"url": "x"}', b'[{"metadata": {}}]', b'[{"url": 7}]',
     b'[{"url": ""}]', b'["swift://x/y/z"]', b"\xff\xfe",
     b"[" + b" " * LOCATIONS_BODY_LIMIT + b"]"],
)  # fmt: skip
def test_anything_else_is_no_answer_and_never_quoted(body: bytes) -> None:
    with pytest.raises(ValueError) as exc:
        parse_locations(body)
    assert "swift://" not in str(exc.value) and "maintenance" not in str(exc.value)


class Glance:
    """Answers ``locations`` as scripted, and counts the calls (the locator's only use of it)."""

    def __init__(self, *answers: tuple[str, ...] | Exception) -> None:
        self.answers = list(answers)
        self.calls: list[tuple[str, Credentials]] = []

    async def locations(self, image_id: str, creds: Credentials) -> tuple[str, ...]:
        self.calls.append((image_id, creds))
        await asyncio.sleep(0)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


class Identity:
    async def credentials(self) -> Credentials:
        return Credentials.token("svc")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def locator(glance: Glance, clock: Clock | None = None) -> tuple[Locator, Metrics]:
    metrics = Metrics()
    return Locator(glance, Identity(), metrics, clock or Clock()), metrics  # type: ignore[arg-type]


def count(metrics: Metrics, outcome: str) -> float:
    return metrics.locations_lookups.labels(outcome)._value.get()


def test_an_answer_is_kept_until_forgotten_and_asked_once_by_a_herd() -> None:
    glance = Glance((SWIFT,), (SWIFT, "file:///y"))
    loc, metrics = locator(glance)

    async def herd() -> list[tuple[str, ...]]:
        return await asyncio.gather(*(loc.locations(ID) for _ in range(20)))

    assert asyncio.run(herd()) == [(SWIFT,)] * 20
    assert asyncio.run(loc.locations(ID)) == (SWIFT,)
    assert [c[0] for c in glance.calls] == [ID]  # one call, with the sidecar's identity
    assert glance.calls[0][1] == Credentials.token("svc")
    loc.forget(ID)  # the image changed (a notification), or its object was not there
    assert asyncio.run(loc.locations(ID)) == (SWIFT, "file:///y")
    assert len(glance.calls) == 2 and count(metrics, "answered") == 2


def test_a_refusal_is_kept_for_minutes_a_failure_for_seconds() -> None:
    clock = Clock()
    refused = GlanceRefused(404, {}, b"")
    glance = Glance(refused, GlanceUnavailable("down"), (SWIFT,))
    loc, metrics = locator(glance, clock)
    assert asyncio.run(loc.locations(ID)) == ()
    clock.now += Locator.REFUSED_TTL - 1
    assert asyncio.run(loc.locations(ID)) == ()
    assert len(glance.calls) == 1  # not asked again within REFUSED_TTL
    clock.now += 2
    assert asyncio.run(loc.locations(ID)) == ()  # Glance is down: no answer ...
    clock.now += Locator.FAILED_TTL - 1
    assert asyncio.run(loc.locations(ID)) == ()  # ... and the next ranges do not wait for it
    assert len(glance.calls) == 2
    clock.now += 2
    assert asyncio.run(loc.locations(ID)) == (SWIFT,)
    assert len(glance.calls) == 3
    assert (count(metrics, "refused"), count(metrics, "failed")) == (1, 1)


def test_the_kept_answers_are_bounded() -> None:
    glance = Glance(*[(SWIFT,)] * 5)
    loc, _ = locator(glance)
    loc.MAX_IMAGES = 3
    ids = [f"{ID[:-1]}{i}" for i in range(5)]
    for image_id in ids:
        asyncio.run(loc.locations(image_id))
    assert list(loc._known) == ids[2:]


def swift_tier(tmp_path: Path, locations: str) -> SwiftTier:
    key = tmp_path / "k"
    key.write_text("secret")
    config = TierConfig("s", "swift", ACCOUNT, temp_url_key_file=key, locations=locations)
    return SwiftTier(config, locator(Glance((SWIFT,)))[0])


def image(*locations: str) -> ImageInfo:
    return ImageInfo(id=ID, status="active", size=1, checksum=None, hash_algo=None,
                     hash_value=None, locations=locations)  # fmt: skip


def test_the_tier_asks_only_with_locations_api_and_only_when_the_record_is_silent(
    tmp_path: Path,
) -> None:
    api = swift_tier(tmp_path, "api")
    url, _ = asyncio.run(api.locate(image(), None))
    assert url.startswith(f"{ACCOUNT}/glance_8c/{ID}?temp_url_sig=")
    shown = image(f"swift+config://ref1/shown/{ID}")  # the record's own answer comes first
    assert asyncio.run(api.locate(shown, None))[0].startswith(f"{ACCOUNT}/shown/{ID}?")
    off = swift_tier(tmp_path, "record")
    assert off.locator is None
    assert asyncio.run(off.locate(image(), None))[0].startswith(f"{ACCOUNT}/glance/{ID}?")
