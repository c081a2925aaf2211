"""The Authorizer's memory, on an injectable clock: what is reused, how long, and what never."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from multidict import CIMultiDict

from cachenode.authz import Authorizer, Decision, Verdict
from cachenode.errors import GlanceRefused, GlanceUnavailable, ProbeUndecided
from cachenode.glance import Credentials
from cachenode.metrics import Metrics

ALICE = Credentials.token("alice")
BOB = Credentials.token("bob")
IMAGE = "11111111-2222-3333-4444-555555555555"
OTHER = "66666666-7777-8888-9999-000000000000"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Glance:
    """Answers the probe as told, and counts how often it was asked."""

    def __init__(self) -> None:
        self.answer: Callable[[], Verdict] = lambda: Verdict.GRANTED
        self.asked = 0

    async def probe(self, image_id: str, creds: Credentials) -> Verdict:
        self.asked += 1
        return self.answer()


def raises(exc: Exception) -> Callable[[], Verdict]:
    def answer() -> Verdict:
        raise exc

    return answer


REFUSED = GlanceRefused(404, {}, b"no such image")
DOWN = GlanceUnavailable("connection refused")
UNDECIDED = ProbeUndecided("glance answered the probe 400")
FAILING = ProbeUndecided("glance answered the probe 502", failing=True)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def glance() -> Glance:
    return Glance()


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


def authorizer(glance: Glance, metrics: Metrics, clock: Clock, **kw: float) -> Authorizer:
    return Authorizer(glance, metrics, clock=clock, **{"ttl": 60.0, **kw})  # type: ignore[arg-type]


def decide(authz: Authorizer, creds: Credentials = ALICE, image: str = IMAGE) -> Decision:
    return asyncio.run(authz.authorize(image, creds))


def count(metrics: Metrics, outcome: str) -> float:
    value = metrics.registry.get_sample_value("cachenode_authz_total", {"outcome": outcome})
    return value or 0.0


def test_a_grant_is_reused_for_ttl_then_asked_again(
    glance: Glance, metrics: Metrics, clock: Clock
) -> None:
    authz = authorizer(glance, metrics, clock)
    assert decide(authz) == Decision(has_data=True)
    clock.now += 59.9
    assert decide(authz) == Decision(has_data=True)
    assert glance.asked == 1 and count(metrics, "cached") == 1
    clock.now += 0.1  # the TTL is over: Glance is asked again
    assert decide(authz) == Decision(has_data=True)
    assert glance.asked == 2 and count(metrics, "allowed") == 2


def test_grants_are_per_credentials_and_image(
    glance: Glance, metrics: Metrics, clock: Clock
) -> None:
    authz = authorizer(glance, metrics, clock)
    decide(authz)
    decide(authz, BOB)
    decide(authz, ALICE, OTHER)
    assert glance.asked == 3 and count(metrics, "cached") == 0


def test_ttl_zero_remembers_nothing(glance: Glance, metrics: Metrics, clock: Clock) -> None:
    authz = authorizer(glance, metrics, clock, ttl=0.0)
    decide(authz)
    decide(authz)
    assert glance.asked == 2


def test_a_grant_without_data_is_not_remembered(
    glance: Glance, metrics: Metrics, clock: Clock
) -> None:
    # The image may get data any moment: its next download must find out.
    glance.answer = lambda: Verdict.GRANTED_NO_DATA
    authz = authorizer(glance, metrics, clock)
    assert decide(authz) == Decision(has_data=False)
    assert decide(authz) == Decision(has_data=False)
    assert glance.asked == 2


def test_refusals_are_never_remembered(glance: Glance, metrics: Metrics, clock: Clock) -> None:
    authz = authorizer(glance, metrics, clock)
    glance.answer = raises(REFUSED)
    for _ in range(2):
        with pytest.raises(GlanceRefused):
            decide(authz)
    glance.answer = lambda: Verdict.GRANTED  # shared a second later: allowed at once
    assert decide(authz).has_data
    assert glance.asked == 3 and count(metrics, "denied") == 2


def test_a_refusal_drops_the_grant_it_follows(
    glance: Glance, metrics: Metrics, clock: Clock
) -> None:
    authz = authorizer(glance, metrics, clock, ttl=10.0, stale_if_error=300.0)
    decide(authz)
    clock.now += 11
    glance.answer = raises(REFUSED)
    with pytest.raises(GlanceRefused):
        decide(authz)
    glance.answer = raises(DOWN)  # the grant is gone: no stale decision to fall back on
    with pytest.raises(GlanceUnavailable):
        decide(authz)
    assert count(metrics, "stale") == 0


def test_undecided_is_never_remembered_nor_answered_stale(
    glance: Glance, metrics: Metrics, clock: Clock
) -> None:
    authz = authorizer(glance, metrics, clock, ttl=10.0, stale_if_error=300.0)
    glance.answer = raises(UNDECIDED)
    with pytest.raises(ProbeUndecided):
        decide(authz)
    glance.answer = lambda: Verdict.GRANTED
    decide(authz)
    clock.now += 11
    # A proxy's own answer about this very request (a 400 for its headers) is no outage: the
    # remembered grant is not used, stale or otherwise.
    glance.answer = raises(UNDECIDED)
    with pytest.raises(ProbeUndecided):
        decide(authz)
    assert glance.asked == 3
    assert count(metrics, "undecided") == 2 and count(metrics, "stale") == 0


def test_stale_if_error_window(glance: Glance, metrics: Metrics, clock: Clock) -> None:
    authz = authorizer(glance, metrics, clock, ttl=10.0, stale_if_error=100.0)
    decide(authz)
    for failure, error in ((DOWN, GlanceUnavailable), (FAILING, ProbeUndecided)):
        glance.answer = raises(failure)
        clock.now = 1000.0 + 10.0  # fresh no more: Glance is asked, and fails
        assert decide(authz) == Decision(has_data=True, stale=True)
        clock.now = 1000.0 + 109.9
        assert decide(authz) == Decision(has_data=True, stale=True)
        clock.now = 1000.0 + 110.0  # ttl + stale_if_error is over
        with pytest.raises(error):
            decide(authz)
        with pytest.raises(error):
            decide(authz, BOB)  # never granted: no stale decision
    assert count(metrics, "stale") == 4
    assert count(metrics, "error") == 2 and count(metrics, "undecided") == 2


def test_without_stale_if_error_an_outage_is_an_error(
    glance: Glance, metrics: Metrics, clock: Clock
) -> None:
    authz = authorizer(glance, metrics, clock, ttl=10.0)
    decide(authz)
    clock.now += 10
    glance.answer = raises(DOWN)
    with pytest.raises(GlanceUnavailable):
        decide(authz)
    assert count(metrics, "error") == 1 and count(metrics, "stale") == 0


def test_forget_drops_every_decision_about_an_image(
    glance: Glance, metrics: Metrics, clock: Clock
) -> None:
    authz = authorizer(glance, metrics, clock)
    for creds, image in ((ALICE, IMAGE), (BOB, IMAGE), (ALICE, OTHER)):
        decide(authz, creds, image)
    authz.forget(IMAGE)
    for creds, image in ((ALICE, IMAGE), (BOB, IMAGE), (ALICE, OTHER)):
        decide(authz, creds, image)
    assert glance.asked == 3 + 2  # only the other image's grant was left
    authz.forget_all()  # the notification listener reconnected: nothing is known any more
    decide(authz, ALICE, OTHER)
    assert glance.asked == 3 + 2 + 1


def test_the_memory_is_bounded_oldest_first(glance: Glance, metrics: Metrics, clock: Clock) -> None:
    authz = authorizer(glance, metrics, clock, max_entries=3)
    tokens = [Credentials.token(f"t{i}") for i in range(5)]
    for creds in tokens:
        decide(authz, creds)
    assert glance.asked == 5
    for creds in tokens[2:]:  # the three most recent are remembered
        decide(authz, creds)
    assert glance.asked == 5
    for creds in tokens[:2]:  # the two oldest were dropped
        decide(authz, creds)
    assert glance.asked == 7


def test_repeated_credential_headers_are_other_credentials(
    glance: Glance, metrics: Metrics, clock: Clock
) -> None:
    authz = authorizer(glance, metrics, clock)
    twice = Credentials.from_headers(CIMultiDict([("X-Auth-Token", "alice")] * 2))
    assert twice.header_map().getall("X-Auth-Token") == ["alice", "alice"]  # sent as they came
    decide(authz, ALICE)
    decide(authz, twice)  # not ALICE's grant: Glance judges the two headers together
    assert glance.asked == 2
