"""Fault injection into a real cachenode process, for faults no real service produces on demand.

Put this folder on PYTHONPATH and set CACHENODE_FAULT_CATALOG to a path: while a file exists
there, every catalog read fails the way a broken SQLite file does (``sqlite3.OperationalError``).
Nothing else of the process is touched.
"""

import os
import sqlite3
from pathlib import Path

_trigger = os.environ.get("CACHENODE_FAULT_CATALOG")
if _trigger:
    import diskcache

    _get = diskcache.Cache.get

    def _failing_get(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if Path(_trigger).exists():
            raise sqlite3.OperationalError("disk I/O error (injected)")
        return _get(self, *args, **kwargs)

    diskcache.Cache.get = _failing_get
