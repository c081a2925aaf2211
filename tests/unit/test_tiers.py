"""Tier health: a tier that keeps failing is skipped for a cool-down, never left with nothing."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

from cachenode.config import TierConfig
from cachenode.errors import TierUnavailable
from cachenode.glance import Credentials, ImageInfo
from cachenode.metrics import Metrics
from cachenode.tiers import Body, TierSet


@dataclass
class Named:
    """A tier as TierSet sees it: a name and a config. Never opened here."""

    config: TierConfig

    @property
    def name(self) -> str:
        return self.config.name

    def open(
        self, image: ImageInfo, creds: Credentials | None, start: int = 0, end: int | None = None
    ) -> AbstractAsyncContextManager[Body]:
        raise NotImplementedError

    async def close(self) -> None:
        return None


def tier(name: str) -> Named:
    return Named(
        TierConfig(
            name=name, kind="http", url=f"http://{name}", failures_before_cooldown=2, cooldown=30
        )
    )


def test_cooldown_after_consecutive_failures_and_recovery() -> None:
    now = [1000.0]
    metrics = Metrics()
    a, b = tier("a"), tier("b")
    tiers = TierSet([a, b], metrics, clock=lambda: now[0])
    assert [t.name for t in tiers.candidates()] == ["a", "b"]

    tiers.failed(a, TierUnavailable("a", "refused", kind="connect"))
    assert [t.name for t in tiers.candidates()] == ["a", "b"]  # one failure is not a pattern
    tiers.failed(a, TierUnavailable("a", "refused", kind="connect"))
    assert [t.name for t in tiers.candidates()] == ["b", "a"]  # cooling: last resort only
    assert (
        metrics.registry.get_sample_value(
            "cachenode_tier_failures_total", {"tier": "a", "kind": "connect"}
        )
        == 2
    )

    now[0] += 31
    assert [t.name for t in tiers.candidates()] == ["a", "b"]
    tiers.failed(a, TierUnavailable("a", "refused"))
    tiers.succeeded(a)
    tiers.failed(a, TierUnavailable("a", "refused"))
    assert [t.name for t in tiers.candidates()] == ["a", "b"]  # success reset the count


def test_excluded_tiers_are_never_offered() -> None:
    a, b = tier("a"), tier("b")
    tiers = TierSet([a, b], Metrics())
    assert [t.name for t in tiers.candidates(frozenset({"a"}))] == ["b"]
    assert tiers.candidates(frozenset({"a", "b"})) == []
