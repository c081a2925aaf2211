"""The catalog: what L1 holds, one small record per image, kept in diskcache (SQLite).

Only metadata lives here; the bytes are files of ``cachenode.blobs``. This is the only module that
imports diskcache. Its calls block on SQLite, so async code reaches it through ``cachenode.local``,
which runs them in an executor.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import diskcache

from cachenode.errors import StoreError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Entry:
    """One verified image in L1."""

    image_id: str
    size: int
    hash_algo: str
    hash_value: str
    checksum: str | None
    tier: str
    created: float
    last_access: float
    hits: int = 0
    tags: tuple[str, ...] = ()
    properties: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tags"] = list(self.tags)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Entry:
        return cls(**{**d, "tags": tuple(d.get("tags", ()))})


class Catalog:
    """A diskcache-backed map of image id to Entry. Thread-safe; every call may block."""

    def __init__(self, directory: Path) -> None:
        try:
            self._db = self._open(directory)
        except sqlite3.DatabaseError as exc:
            # A catalog that is not a database (a torn disk, a stray write) must not keep the
            # host's cache down: set it aside and start empty; the blobs it described are
            # dropped at start (they cannot be proven any more) and refilled on demand.
            aside = directory.with_name(f"{directory.name}.corrupt-{int(time.time())}")
            log.error("the catalog in %s is unreadable (%s); moved to %s, starting empty",
                      directory, exc, aside)  # fmt: skip
            directory.rename(aside)
            self._db = self._open(directory)
        except (OSError, diskcache.Timeout) as exc:
            raise StoreError(f"cannot open the catalog in {directory}: {exc}") from exc

    @staticmethod
    def _open(directory: Path) -> diskcache.Cache:
        # cachenode evicts by its own policies; diskcache must never drop a record by itself.
        db = diskcache.Cache(str(directory), eviction_policy="none", size_limit=2**62)
        db.check(fix=False)  # reads every page header: a corrupt file fails here, not later
        return db

    def close(self) -> None:
        self._db.close()

    def get(self, image_id: str) -> Entry | None:
        raw = self._call(self._db.get, ("entry", image_id))
        return Entry.from_dict(raw) if raw else None

    def put(self, entry: Entry) -> None:
        self._call(self._db.set, ("entry", entry.image_id), entry.to_dict())

    def delete(self, image_id: str) -> bool:
        return bool(self._call(self._db.delete, ("entry", image_id)))

    def record_access(self, entries: Iterable[Entry]) -> None:
        """Write the access times and hit counts of ``entries`` onto their records, in one
        SQLite transaction; a record gone meanwhile (evicted) is not written again."""
        with _translated(), self._db.transact():
            for entry in entries:
                stored = self.get(entry.image_id)
                if stored is not None:
                    self.put(replace(stored, last_access=entry.last_access, hits=entry.hits))

    def pin(self, image_id: str) -> None:
        self._call(self._db.set, ("pin", image_id), True)

    def unpin(self, image_id: str) -> bool:
        return bool(self._call(self._db.delete, ("pin", image_id)))

    def pins(self) -> frozenset[str]:
        """Images pinned at run time (``cachenode pin``), cached or not."""
        return frozenset(
            k[1] for k in list(self._db.iterkeys()) if isinstance(k, tuple) and k[0] == "pin"
        )

    def entries(self) -> Iterator[Entry]:
        with _translated():
            keys = list(self._db.iterkeys())
        for key in keys:
            if isinstance(key, tuple) and key[0] == "entry":
                entry = self.get(key[1])
                if entry is not None:
                    yield entry

    def _call(self, fn: Any, *args: Any) -> Any:
        with _translated():
            return fn(*args, retry=True)


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    """diskcache's and SQLite's failures, as the StoreError the rest of cachenode handles."""
    try:
        yield
    except (OSError, sqlite3.Error, diskcache.Timeout) as exc:
        raise StoreError(f"catalog: {exc}") from exc
