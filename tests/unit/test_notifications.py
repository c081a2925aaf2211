"""Glance's notifications, read: what each message does, and the config that points at the bus."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from cachenode.config import parse_config
from cachenode.errors import ConfigError
from cachenode.glance import Credentials, ImageInfo
from cachenode.identity import ServiceIdentity
from cachenode.janitor import Warmer
from cachenode.metrics import Metrics
from cachenode.notifications import Invalidator, MalformedNotice, Notice, kombu_url, parse
from cachenode.policy import Policy, Selector, parse_policy
from tests.support.rabbit import envelope

MINIMAL = {"glance": {"url": "http://glance.example:9292"}, "cache": {"dir": "/var/lib/cachenode"}}
IMAGE = "6bbe9d3c-0000-4000-8000-000000000001"


@pytest.mark.parametrize(
    ("event", "payload", "action"),
    [
        ("image.delete", {"id": IMAGE, "status": "deleted"}, "evict"),
        ("image.update", {"id": IMAGE, "status": "deactivated"}, "forget"),
        ("image.update", {"id": IMAGE, "status": "active", "visibility": "private"}, "forget"),
        ("image.member.delete", {"image_id": IMAGE, "member_id": "projC"}, "forget"),
        ("image.member.create", {"image_id": IMAGE, "member_id": "projC"}, "forget"),
        ("image.activate", {"id": IMAGE}, "warm"),
        ("image.send", {"image_id": IMAGE}, "ignore"),
    ],
)
def test_each_event_gets_its_action(event: str, payload: dict[str, Any], action: str) -> None:
    notice = parse(envelope(event, payload))
    assert (notice.event, notice.action) == (event, action)
    assert notice.image_id == (IMAGE if action != "ignore" else None)


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b'"a string"',
        '{"oslo.version": "2.0"}',
        '{"oslo.version": "2.0", "oslo.message": "{bad"}',
        '{"oslo.version": "2.0", "oslo.message": "[1, 2]"}',
        json.dumps({"oslo.version": "2.0", "oslo.message": json.dumps({"payload": {}})}),
        envelope("image.delete", {}),
        envelope("image.member.delete", {"id": IMAGE}),  # a member event names image_id
        envelope("image.update", {"id": 42}),
    ],
)
def test_malformed_messages_are_refused(body: str | bytes) -> None:
    with pytest.raises(MalformedNotice):
        parse(body)


def test_transport_urls() -> None:
    assert kombu_url("rabbit://u:p@h:5672/") == "amqp://u:p@h:5672/"
    assert (
        kombu_url("rabbit://u:p@a:5672,u:p@b:5672/v") == "amqp://u:p@a:5672/v;amqp://u:p@b:5672/v"
    )
    for bad in ("http://h/", "rabbit:///", "kafka://h:9092"):
        with pytest.raises(ValueError):
            kombu_url(bad)


def test_config_reads_the_url_from_a_file_and_never_shows_it(tmp_path: Path) -> None:
    url = tmp_path / "transport.url"
    url.write_text("rabbit://glance:s3cr3t@bus:5672/\n")
    cfg = parse_config({**MINIMAL, "notifications": {"transport_url_file": str(url)}})
    assert cfg.notifications_url is not None
    assert cfg.notifications_url.reveal() == "rabbit://glance:s3cr3t@bus:5672/"
    assert "s3cr3t" not in repr(cfg)
    assert cfg.notifications_durable is False
    assert parse_config(MINIMAL).notifications_url is None
    durable = {"transport_url_file": str(url), "durable_exchange": True}
    assert parse_config({**MINIMAL, "notifications": durable}).notifications_durable is True


@pytest.mark.parametrize(
    ("section", "content", "message"),
    [
        ({"transport_url_file": "/nonexistent/x"}, None, "notifications.transport_url_file"),
        ({"transport_url_file": "FILE"}, "http://bus/", "notifications.transport_url_file: not a"),
        ({"transport_url_file": "FILE"}, "", "notifications.transport_url_file:"),
        ({"transport_url": "rabbit://u:p@h/"}, None, "notifications.transport_url"),
        ({"durable_exchange": "yes"}, None, "notifications.durable_exchange: expected true"),
    ],
)
def test_config_errors_name_the_key(
    tmp_path: Path, section: dict[str, str], content: str | None, message: str
) -> None:
    path = tmp_path / "url"
    if content is not None:
        path.write_text(content)
    section = {k: str(path) if v == "FILE" else v for k, v in section.items()}
    with pytest.raises(ConfigError) as exc:
        parse_config({**MINIMAL, "notifications": section})
    assert str(exc.value).startswith(message)
    assert "u:p" not in str(exc.value)


def test_warm_jitter_is_validated() -> None:
    assert parse_policy({"warm": {"jitter": "30s"}}, "p").warm_jitter == 30
    assert parse_policy({}, "p").warm_jitter == 0
    for bad in ("-1s", "2h", "soon"):
        with pytest.raises(ConfigError) as exc:
            parse_policy({"warm": {"jitter": bad}}, "p")
        assert str(exc.value).startswith("warm.jitter")


class FakeGlance:
    def __init__(self, image: ImageInfo) -> None:
        self.record = image

    async def image(self, image_id: str, creds: object) -> ImageInfo:
        return self.record


class Recorder(Warmer):
    """A Warmer whose fills are only written down."""

    warmed: list[str]

    async def warm(self, image: ImageInfo) -> str:
        self.warmed.append(image.id)
        return "filling"


def warmer(tags: tuple[str, ...], slept: list[float]) -> Recorder:
    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    image = ImageInfo(IMAGE, "active", 10, "c" * 32, None, None, tags=tags)
    policy = Policy("p", warm=Selector(tags=("golden",)), warm_jitter=20.0)
    identity = ServiceIdentity(static=Credentials.token("service"))
    w = Recorder(FakeGlance(image), None, None, identity, policy,  # type: ignore[arg-type]
                 uniform=lambda lo, hi: hi * 0.25, sleep=sleep)  # fmt: skip
    w.warmed = []
    return w


def test_an_activated_image_is_warmed_after_its_jitter_when_selected() -> None:
    async def run(tags: tuple[str, ...]) -> tuple[str, list[float], list[str]]:
        slept: list[float] = []
        w = warmer(tags, slept)
        task = w.activated(IMAGE)
        assert task is not None
        return await task, slept, w.warmed

    assert asyncio.run(run(("golden",))) == ("filling", [5.0], [IMAGE])
    # The notice names the image; Glance's record (no golden tag) decides: nothing warmed.
    assert asyncio.run(run(("other",))) == ("not selected", [5.0], [])


def test_the_invalidator_forgets_evicts_and_counts() -> None:
    forgotten: list[str] = []
    evicted: list[tuple[str, str]] = []
    stopped: list[tuple[str, str]] = []

    async def evict(image_id: str, reason: str) -> int:
        evicted.append((image_id, reason))
        return 1

    def stop_fill(image_id: str, why: str) -> bool:
        stopped.append((image_id, why))
        return True

    async def run() -> None:
        act = Invalidator(Metrics(), forgotten.append, evict, None, stop_fill)
        act(Notice("image.delete", IMAGE, "evict"))
        act(Notice("image.member.delete", "other", "forget"))
        act(Notice("image.activate", IMAGE, "warm"))  # no warmer: ignored
        act(Notice("image.send", None, "ignore"))
        await asyncio.sleep(0)
        samples = {
            tuple(s.labels.values()): s.value
            for s in act.metrics.notifications.collect()[0].samples
            if s.name.endswith("_total")
        }
        assert samples == {("image.delete", "evict"): 1, ("image.member.delete", "forget"): 1,
                           ("image.activate", "ignore"): 1, ("other", "ignore"): 1}  # fmt: skip

    asyncio.run(run())
    assert forgotten == [IMAGE, "other"]
    assert evicted == [(IMAGE, "deleted")]
    assert stopped == [(IMAGE, "deleted")]  # only a delete stops a fill in flight
