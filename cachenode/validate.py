"""A small reader for YAML documents that names the exact key of every error.

Both the config (``cachenode.config``) and the policies (``cachenode.policy``) are read through it,
so every problem is reported the same way: ``tiers[1].url: not an http(s) URL``.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from cachenode.errors import ConfigError

T = TypeVar("T")
_MISSING: Any = object()


class Section:
    """One mapping of the document; ``take`` removes keys so that ``finish`` can flag the rest."""

    def __init__(self, data: object, path: str) -> None:
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(path, f"expected a mapping, got {_kind(data)}")
        self._data = dict(data)
        self.path = path

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def has(self, name: str) -> bool:
        return name in self._data

    def take(self, name: str, parse: Callable[[Any], T], default: Any = _MISSING) -> T:
        if name not in self._data:
            if default is _MISSING:
                raise ConfigError(self.key(name), "missing")
            return default  # type: ignore[no-any-return]
        raw = self._data.pop(name)
        try:
            return parse(raw)
        except ConfigError as exc:  # from a file this key refers to (a policy): keep its detail
            raise ConfigError(self.key(name), str(exc)) from None
        except (ValueError, TypeError) as exc:
            raise ConfigError(self.key(name), str(exc)) from None

    def section(self, name: str) -> Section:
        return Section(self._data.pop(name, None), self.key(name))

    def items(self, name: str) -> list[tuple[str, object]]:
        """The elements of a list under ``name``, each with its own path ``name[i]``."""
        raw = self._data.pop(name, None)
        if raw is None:
            return []
        if not isinstance(raw, list):
            raise ConfigError(self.key(name), f"expected a list, got {_kind(raw)}")
        return [(f"{self.key(name)}[{i}]", item) for i, item in enumerate(raw)]

    def finish(self) -> None:
        if self._data:
            first = sorted(map(str, self._data))[0]
            raise ConfigError(self.key(first), "unknown key")


def _kind(value: object) -> str:
    return {
        dict: "a mapping",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "nothing",
    }.get(type(value), type(value).__name__)


def string(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a non-empty string, got {_kind(value)}")
    if not value.strip():
        raise ValueError("expected a non-empty string, got a blank one")
    return value


def integer(minimum: int | None = None, maximum: int | None = None) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected a whole number, got {_kind(value)}")
        if minimum is not None and value < minimum:
            raise ValueError(f"must be at least {minimum}")
        if maximum is not None and value > maximum:
            raise ValueError(f"must be at most {maximum}")
        return value

    return parse


def fraction(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number between 0 and 1, got {_kind(value)}")
    if not 0 <= value <= 1:
        raise ValueError("must be between 0 and 1")
    return float(value)


def choice(*allowed: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}")
        return str(value)

    return parse


def http_url(value: object) -> str:
    """An http(s) URL with a host and nothing a URL here must not carry: the one rule for every
    URL the sidecar is given, by its config or by Keystone's catalog (``cachenode.identity``)."""
    text = string(value)
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("not an http(s) URL")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError:
        raise ValueError("not an http(s) URL (bad port)") from None
    if parts.query or parts.fragment:
        raise ValueError("an URL here takes no query or fragment")
    if "@" in parts.netloc:
        raise ValueError("an URL here takes no user or password (secrets come only from files)")
    return text.rstrip("/")


def listen_address(value: object) -> tuple[str, int]:
    """``address:port`` or ``[v6]:port``, the address a literal one.

    A listening socket is bound to one address. A host name would stand for whichever of its
    addresses the resolver listed first at start (``localhost`` is ``::1`` on some hosts and
    ``127.0.0.1`` on others), and a client using another would be refused: the operator writes
    the address, as in a systemd ``ListenStream=``.
    """
    text = string(value)
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", text)
    if not m:
        raise ValueError("expected address:port, such as 127.0.0.1:9393")
    host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    try:
        ipaddress.IPv6Address(host) if m.group(1) else ipaddress.IPv4Address(host)
    except ValueError:
        raise ValueError("expected an IP address, such as 127.0.0.1:9393") from None
    if not 1 <= int(port) <= 65535:
        raise ValueError("port must be between 1 and 65535")
    return host, int(port)


def readable_file(value: object) -> Path:
    path = Path(string(value))
    try:
        with path.open("rb") as f:
            f.read(1)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    return path


def string_list(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError("expected a list of strings")
    return tuple(value)


def key_values(value: object) -> tuple[tuple[str, str], ...]:
    """``["os_distro=ubuntu", "hw_arch=x86_64"]`` -> pairs."""
    pairs = []
    for item in string_list(value):
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise ValueError(f"expected key=value, got {item!r}")
        pairs.append((key, val))
    return tuple(pairs)
