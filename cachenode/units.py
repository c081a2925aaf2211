"""Durations (``30s``, ``5m``, ``14d``) and sizes (``500MiB``, ``200GiB``, ``10%``) in config."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]i?B|B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "pb": 10**15,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "pib": 2**50,
}


def parse_duration(value: object) -> float:
    """Seconds from ``"30s"``, ``"5m"``, ``"14d"``; a bare number is seconds.

    Raises ValueError with a message fit for a config error.
    """
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 30s, 5m or 14d")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ValueError(f"not a duration: {value!r} (use 30s, 5m, 2h, 14d)")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


@dataclass(frozen=True)
class Size:
    """A byte count, or a fraction of something (a filesystem) when given as ``10%``."""

    bytes: int = 0
    fraction: float | None = None

    def resolve(self, total: int) -> int:
        """Bytes, taking a fraction of ``total`` when the size was given in percent."""
        if self.fraction is None:
            return self.bytes
        return int(total * self.fraction)

    def __str__(self) -> str:
        if self.fraction is not None:
            return f"{self.fraction * 100:g}%"
        return format_bytes(self.bytes)


def parse_size(value: object, *, allow_percent: bool = False) -> Size:
    """A Size from ``"500MiB"``, ``"1GB"``, ``1048576`` or, when allowed, ``"10%"``."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 500MiB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return Size(bytes=value)
    if isinstance(value, str):
        text = value.strip()
        if text.endswith("%"):
            if not allow_percent:
                raise ValueError("a percentage is not allowed here")
            try:
                pct = float(text[:-1])
            except ValueError:
                raise ValueError(f"not a percentage: {value!r}") from None
            if not 0 <= pct <= 100:
                raise ValueError("a percentage must be between 0% and 100%")
            return Size(fraction=pct / 100)
        if m := _SIZE.match(text):
            unit = (m.group(2) or "B").lower()
            nbytes = float(m.group(1)) * _SIZE_UNITS[unit]
            if not math.isfinite(nbytes):  # int() of it would raise OverflowError, no ValueError
                raise ValueError(f"too large: {text[:20]}...")
            return Size(bytes=int(nbytes))
    raise ValueError(
        f"not a size: {value!r} (use bytes, 500MiB, 200GiB{', 10%' if allow_percent else ''})"
    )


def format_bytes(n: float) -> str:
    """``1.5GiB`` style, for humans (CLI, logs)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    raise AssertionError("unreachable")
