"""Listening sockets handed over by systemd, so that a restart refuses no connection.

With ``deploy/cachenode.socket``, systemd opens the listening sockets and keeps them open across
every restart of the service; each start receives them as descriptors 3, 4, ... (the
``sd_listen_fds(3)`` protocol: ``LISTEN_PID`` is the pid they are meant for, ``LISTEN_FDS`` how
many, ``LISTEN_FDNAMES`` their names). While the old process drains and the new one starts,
connections wait in the socket's backlog instead of being refused.

Each inherited socket is matched to ``listen`` or ``admin.listen`` by the address it is bound to,
so the config stays the one place an address is written and one socket unit can carry both
(systemd names every socket of a unit alike). A listener with no inherited socket binds as
without systemd; a socket that matches neither address stops the start, naming it.

Why no library: the protocol is three environment variables and a descriptor range, stable since
2010. ``systemd-python`` would bring a C extension built against libsystemd for these few lines,
and the pure-Python ports are small projects with one maintainer. The lines are here, tested.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
from collections.abc import Mapping, MutableMapping

from cachenode.errors import ConfigError

SD_LISTEN_FDS_START = 3
_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def listen_fds(environ: Mapping[str, str], pid: int) -> list[int]:
    """The descriptors systemd passed to process ``pid`` (none if the variables are meant for
    another process: a child inherits the environment, not the right to the sockets)."""
    if environ.get("LISTEN_PID", "") != str(pid):
        return []
    count = environ.get("LISTEN_FDS", "")
    if not (count.isascii() and count.isdigit()):  # "²" is a digit to isdigit, not to int
        return []
    return list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)))


def same_address(bound: tuple[str, int], wanted: tuple[str, int]) -> bool:
    """Whether a socket bound to ``bound`` serves the configured ``wanted`` (IPv6 spellings and
    scope ids aside)."""
    try:
        return (ipaddress.ip_address(bound[0]), bound[1]) == (
            ipaddress.ip_address(wanted[0]),
            wanted[1],
        )
    except ValueError:
        return False


def assign(
    bound: Mapping[int, tuple[str, int]],
    wanted: Mapping[str, tuple[str, int]],
    source: str = "systemd",
) -> dict[str, int]:
    """Which inherited descriptor serves which listener. ``bound`` maps each descriptor to its
    address, ``wanted`` each listener's config key to its address (an IP address: config
    refuses names, so there is nothing to resolve); ``source`` names who passed them, for the
    error."""
    chosen: dict[str, int] = {}
    for fd, address in bound.items():
        keys = [k for k, addr in wanted.items() if same_address(address, addr)]
        where = (
            f"[{address[0]}]:{address[1]}" if ":" in address[0] else f"{address[0]}:{address[1]}"
        )
        if not keys:
            names = " or ".join(wanted)
            raise ConfigError(
                "", f"{source} passed a socket on {where}, which is no address of {names}"
            )
        if keys[0] in chosen:
            raise ConfigError(keys[0], f"{source} passed two sockets for it ({where} twice)")
        chosen[keys[0]] = fd
    return chosen


def inherited(
    wanted: Mapping[str, tuple[str, int]], environ: MutableMapping[str, str] | None = None
) -> dict[str, socket.socket]:
    """The listening sockets systemd passed for the listeners in ``wanted`` (config key to
    address), by key. The variables are removed from the environment, as ``sd_listen_fds(1)``
    does, so that nothing this process starts believes they are its own."""
    env = os.environ if environ is None else environ
    fds = listen_fds(env, os.getpid())
    for name in _VARS:
        env.pop(name, None)
    return adopt(fds, wanted, "systemd")


def adopt(
    fds: list[int], wanted: Mapping[str, tuple[str, int]], source: str
) -> dict[str, socket.socket]:
    """The listening sockets on ``fds`` by the listener each serves, each checked to be a
    listening TCP socket bound to its listener's configured address. Anything else raises
    ConfigError naming it, with every descriptor of ``fds`` closed: none is left behind."""
    socks: dict[int, socket.socket] = {}
    try:
        for fd in fds:
            socks[fd] = _listening(fd, source)
        bound = {fd: (str(s.getsockname()[0]), int(s.getsockname()[1])) for fd, s in socks.items()}
        chosen = assign(bound, wanted, source)
    except ConfigError:
        for fd in fds:
            if fd in socks:
                socks[fd].close()
            else:
                with contextlib.suppress(OSError):
                    os.close(fd)
        raise
    return {key: socks[fd] for key, fd in chosen.items()}


def bind(address: tuple[str, int], backlog: int = 1024) -> socket.socket:
    """A listening socket of our own on ``address`` (an IP address: ``validate.listen_address``
    refuses names), for a listener nobody passed a socket for."""
    family = socket.getaddrinfo(*address, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    sock = socket.create_server(address, family=family, backlog=backlog)
    sock.setblocking(False)
    return sock


def _listening(fd: int, source: str) -> socket.socket:
    """The socket on descriptor ``fd``, checked to be a listening TCP socket, close-on-exec.
    On ConfigError the descriptor is left open (``adopt`` closes it)."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ConfigError("", f"{source} passed descriptor {fd}, which is not a socket") from exc
    listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
        sock.detach()
        raise ConfigError("", f"{source} passed descriptor {fd}, which is not a TCP socket")
    if not listening:
        sock.detach()
        raise ConfigError("", f"{source} passed descriptor {fd}, which is not listening")
    sock.set_inheritable(False)
    sock.setblocking(False)
    return sock
