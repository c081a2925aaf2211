"""Eviction and warm policies: data files under ``policies/``, read into frozen records.

A policy is selected by ``cache.policy``: anything with a slash or a ``.yaml`` suffix is a path; a
bare name is looked up in ``policy_dirs()``: ``$CACHENODE_POLICY_DIR``, ``/etc/cachenode/policies``
(an operator's own), then the policies shipped with cachenode (``policies/`` of a source checkout,
``<prefix>/share/cachenode/policies`` of an installed one).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import yaml

from cachenode import validate as v
from cachenode.catalog import Entry
from cachenode.errors import ConfigError
from cachenode.units import Size, parse_duration, parse_size

ORDERS = ("lru", "lfu", "largest", "fifo")


@dataclass(frozen=True)
class Selector:
    """Images chosen by id, by tag, or by ``key=value`` property (any one matching is enough)."""

    ids: tuple[str, ...] = ()
    tags: tuple[str, ...] = ()
    properties: tuple[tuple[str, str], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.ids or self.tags or self.properties)

    def matches(
        self, image_id: str, tags: tuple[str, ...], properties: Mapping[str, object]
    ) -> bool:
        if image_id in self.ids or any(t in tags for t in self.tags):
            return True
        return any(str(properties.get(k)) == val for k, val in self.properties if k in properties)


@dataclass(frozen=True)
class Policy:
    name: str
    order: str = "lru"
    max_bytes: Size = field(default_factory=lambda: Size(fraction=0.8))
    high_watermark: float = 0.95
    low_watermark: float = 0.85
    min_free_disk: Size = field(default_factory=lambda: Size(fraction=0.05))
    max_idle: float | None = None
    max_object_size: Size | None = None  # larger images are never cached; None: no limit
    pin: Selector = field(default_factory=Selector)
    warm: Selector = field(default_factory=Selector)
    warm_interval: float = 600.0
    warm_jitter: float = 0.0  # an image.activate warms after a random delay of up to this

    def admits(self, size: int, disk_total: int) -> bool:
        """Whether an image of ``size`` bytes may be cached at all (``max_object_size``)."""
        return self.max_object_size is None or size <= self.max_object_size.resolve(disk_total)


def _object_size(value: object) -> Size:
    size = parse_size(value, allow_percent=True)
    if size.bytes == 0 and not size.fraction:
        raise ValueError("must be more than 0 (leave it out for no limit)")
    return size


def _selector(section: v.Section, *, ids: bool = True) -> Selector:
    sel = Selector(
        ids=section.take("ids", v.string_list, ()) if ids else (),
        tags=section.take("tags", v.string_list, ()),
        properties=section.take("properties", v.key_values, ()),
    )
    return sel


def parse_policy(data: object, name: str) -> Policy:
    doc = v.Section(data, "")
    max_bytes = doc.take(
        "max_bytes", lambda x: parse_size(x, allow_percent=True), Size(fraction=0.8)
    )
    high = doc.take("high_watermark", v.fraction, 0.95)
    low = doc.take("low_watermark", v.fraction, 0.85)
    if low > high:
        raise ConfigError("low_watermark", "must not be above high_watermark")
    min_free = doc.take(
        "min_free_disk", lambda x: parse_size(x, allow_percent=True), Size(fraction=0.05)
    )
    max_idle = doc.take("max_idle", parse_duration, None)
    max_object_size = doc.take("max_object_size", _object_size, None)
    order = doc.take("order", v.choice(*ORDERS), "lru")
    pin_section = doc.section("pin")
    pin = _selector(pin_section)
    pin_section.finish()
    warm_section = doc.section("warm")
    warm = _selector(warm_section, ids=True)
    interval = warm_section.take("interval", parse_duration, 600.0)
    if interval <= 0:
        raise ConfigError("warm.interval", "must be more than 0s")
    jitter = warm_section.take("jitter", parse_duration, 0.0)
    if not 0 <= jitter <= 3600:
        raise ConfigError("warm.jitter", "must be between 0s and 1h")
    warm_section.finish()
    doc.finish()
    return Policy(
        name=name,
        order=order,
        max_bytes=max_bytes,
        high_watermark=high,
        low_watermark=low,
        min_free_disk=min_free,
        max_idle=max_idle,
        max_object_size=max_object_size,
        pin=pin,
        warm=warm,
        warm_interval=interval,
        warm_jitter=jitter,
    )


def load_policy(ref: str) -> Policy:
    """The policy named ``ref`` (shipped) or stored at path ``ref``.

    Raises ConfigError whose key is inside the policy file, prefixed by the file.
    """
    if "/" in ref or ref.endswith((".yaml", ".yml")):
        path = Path(ref)
        label = str(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError("", f"cannot read policy {path}: {exc.strerror}") from None
    else:
        found = [d / f"{ref}.yaml" for d in policy_dirs() if (d / f"{ref}.yaml").is_file()]
        if not found:
            names = ", ".join(sorted(known_policies())) or "none found"
            raise ConfigError("", f"no policy named {ref!r} (known: {names})")
        label, text = str(found[0]), found[0].read_text()
    try:
        data = yaml.safe_load(text)
        return parse_policy(data, name=Path(ref).stem)
    except yaml.YAMLError as exc:
        raise ConfigError("", f"{label}: not valid YAML ({exc})") from None
    except ConfigError as exc:
        raise ConfigError("", f"{label}: {exc}") from None


def policy_dirs() -> list[Path]:
    dirs = [Path(d) for d in [os.environ.get("CACHENODE_POLICY_DIR")] if d]
    dirs.append(Path("/etc/cachenode/policies"))
    dirs.append(Path(__file__).resolve().parent.parent / "policies")
    dirs.append(Path(sys.prefix) / "share" / "cachenode" / "policies")
    return [d for d in dirs if d.is_dir()]


def known_policies() -> set[str]:
    return {p.stem for d in policy_dirs() for p in d.glob("*.yaml")}


# How each order ranks entries for eviction, first evicted first: policies are data.
EVICTION_ORDER: dict[str, Callable[[Entry], tuple[float, ...]]] = {
    "lru": lambda e: (e.last_access, e.created),  # least recently served
    "lfu": lambda e: (e.hits, e.last_access),  # least often served, then least recently
    "largest": lambda e: (-e.size, e.last_access),  # biggest first: room for many small ones
    "fifo": lambda e: (e.created,),  # oldest fill first
}


@dataclass(frozen=True)
class Usage:
    """What the cache holds and what the filesystem under it has, in bytes."""

    cache_bytes: int
    disk_total: int
    disk_free: int


def with_in_flight(usage: Usage, on_disk: int, pending: int) -> Usage:
    """``usage`` with the bytes that are not entries yet counted as cache bytes.

    ``on_disk``: files already on the filesystem (partials a previous run kept, the files of fills
    in flight, fallocated whole), so already out of ``disk_free``. ``pending``: room reserved for
    fills whose file is not created yet, so taken from ``disk_free`` here. A plan that left
    either out would give the same room twice to fills that start together, and L1 would end up
    past ``max_bytes`` (or the disk under ``min_free_disk``) once they commit. A file being
    created while the disk is read may be counted twice: the plan sees less room, never more.
    """
    return Usage(
        cache_bytes=usage.cache_bytes + on_disk + pending,
        disk_total=usage.disk_total,
        disk_free=usage.disk_free - pending,
    )


@dataclass(frozen=True)
class Eviction:
    image_id: str
    size: int
    reason: str  # idle | size | disk


@dataclass(frozen=True)
class Plan:
    evictions: tuple[Eviction, ...]
    fits: bool  # after them, ``needed`` more bytes fit within the policy and on the disk


def is_pinned(policy: Policy, entry: Entry, pins: AbstractSet[str] = frozenset()) -> bool:
    return entry.image_id in pins or policy.pin.matches(
        entry.image_id, entry.tags, entry.properties
    )


class Candidates(Protocol):
    """The entries a plan may evict (never a pinned one), walked lazily: a plan reads only as
    many as it evicts, plus one. ``cachenode.index.Index`` is the one L1 keeps."""

    @property
    def evictable_bytes(self) -> int:
        """The sum of every candidate's size."""
        ...

    def in_order(self) -> Iterator[Entry]:
        """Every candidate, in the policy's order: first evicted first."""
        ...

    def least_recent(self) -> Iterator[Entry]:
        """Every candidate by ``EVICTION_ORDER["lru"]``: least recently served first."""
        ...


class Ranked:
    """Candidates from a list of entries, sorted once (what ``plan`` walks)."""

    def __init__(self, entries: Iterable[Entry], policy: Policy, pins: AbstractSet[str]) -> None:
        self._entries = [e for e in entries if not is_pinned(policy, e, pins)]
        self._order = policy.order
        self.evictable_bytes = sum(e.size for e in self._entries)

    def in_order(self) -> Iterator[Entry]:
        return iter(sorted(self._entries, key=EVICTION_ORDER[self._order]))

    def least_recent(self) -> Iterator[Entry]:
        return iter(sorted(self._entries, key=EVICTION_ORDER["lru"]))


def plan(
    entries: Iterable[Entry],
    policy: Policy,
    usage: Usage,
    now: float,
    needed: int = 0,
    pins: AbstractSet[str] = frozenset(),
) -> Plan:
    """``plan_over`` the given entries, those pinned by ``policy`` or ``pins`` left out."""
    return plan_over(Ranked(entries, policy, pins), policy, usage, now, needed)


def plan_over(
    candidates: Candidates, policy: Policy, usage: Usage, now: float, needed: int = 0
) -> Plan:
    """What to evict so that the cache keeps to ``policy`` with ``needed`` more bytes in it.

    Only ``candidates`` are chosen: pinned entries are not among them (fills are not entries
    yet: never chosen either; their room is in ``usage``, see ``with_in_flight``). Idle entries
    (``max_idle``) go first; then, in the policy's order, entries until the cache is under
    ``low_watermark`` of ``max_bytes`` (once it passed ``high_watermark``) and the filesystem
    keeps ``min_free_disk`` free.

    An image is admitted whole or not at all: when ``needed`` bytes are over ``max_object_size``,
    or would not fit even with every candidate gone, the plan evicts nothing and does not fit.
    Such an image is passed through anyway, so evicting for it would only empty the cache. Both
    are known before any candidate is read, so a plan costs what it evicts, never a walk of all.
    """
    if needed and not policy.admits(needed, usage.disk_total):
        return Plan((), fits=False)
    if needed and not _fits(policy, usage, needed, freed=candidates.evictable_bytes):
        return Plan((), fits=False)
    return _greedy(candidates, policy, usage, now, needed)


def _fits(policy: Policy, usage: Usage, needed: int, freed: int) -> bool:
    """Whether ``needed`` more bytes keep to the policy and the disk once ``freed`` bytes went."""
    capacity = policy.max_bytes.resolve(usage.disk_total)
    min_free = policy.min_free_disk.resolve(usage.disk_total)
    total, free = usage.cache_bytes - freed, usage.disk_free + freed
    return total + needed <= capacity and free - needed >= min_free


def _greedy(candidates: Candidates, policy: Policy, usage: Usage, now: float, needed: int) -> Plan:
    capacity = policy.max_bytes.resolve(usage.disk_total)
    min_free = policy.min_free_disk.resolve(usage.disk_total)
    chosen: dict[str, Eviction] = {}
    total, free = usage.cache_bytes, usage.disk_free

    def evict(entry: Entry, reason: str) -> None:
        nonlocal total, free
        chosen[entry.image_id] = Eviction(entry.image_id, entry.size, reason)
        total -= entry.size
        free += entry.size

    if policy.max_idle is not None:
        # By last access, the idle ones come first: the walk stops at the first one in use.
        idle = []
        for entry in candidates.least_recent():
            if now - entry.last_access <= policy.max_idle:
                break
            idle.append(entry)
        for entry in sorted(idle, key=EVICTION_ORDER[policy.order]):
            evict(entry, "idle")
    if total + needed > capacity * policy.high_watermark:
        staying = total - (candidates.evictable_bytes - (usage.cache_bytes - total))
        target = size_target(policy, capacity, staying + needed)
        for entry in candidates.in_order():
            if total + needed <= target:
                break
            if entry.image_id not in chosen:
                evict(entry, "size")
    for entry in candidates.in_order():
        if free - needed >= min_free:
            break
        if entry.image_id not in chosen:
            evict(entry, "disk")
    fits = total + needed <= capacity and free - needed >= min_free
    return Plan(tuple(chosen.values()), fits)


def size_target(policy: Policy, capacity: int, least: int) -> float:
    """Bytes to evict down to, once past ``high_watermark``: ``low_watermark`` of ``capacity``.

    When what must stay (pinned entries, the new image) is already above it, aim at
    ``high_watermark``, then at ``capacity`` itself: bytes that cannot go are no reason to evict
    every entry that can.
    """
    marks = (capacity * policy.low_watermark, capacity * policy.high_watermark)
    return next((mark for mark in marks if least <= mark), float(capacity))
