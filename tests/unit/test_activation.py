"""Socket activation (``cachenode.activation``): which descriptors are ours, which listener each
serves, and that anything else stops the start with a line naming it."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

import pytest

from cachenode.activation import assign, inherited, listen_fds, same_address
from cachenode.errors import ConfigError

WANTED = {"listen": ("127.0.0.1", 9393), "admin.listen": ("127.0.0.1", 9394)}


def test_descriptors_are_ours_only_with_our_pid() -> None:
    env = {"LISTEN_PID": "42", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "data:admin"}
    assert listen_fds(env, 42) == [3, 4]
    assert listen_fds(env, 43) == []  # meant for the process that started us, not for us
    assert listen_fds({}, 42) == []
    assert listen_fds({"LISTEN_PID": "42", "LISTEN_FDS": "x"}, 42) == []
    assert listen_fds({"LISTEN_PID": "42", "LISTEN_FDS": "0"}, 42) == []
    # Digits to str.isdigit, not to int(): "ignored", as any count that is not ASCII digits
    assert listen_fds({"LISTEN_PID": "42", "LISTEN_FDS": "\u00b2"}, 42) == []


def test_addresses_compare_as_addresses() -> None:
    assert same_address(("::1", 9393), ("0:0::1", 9393))
    assert same_address(("0.0.0.0", 9393), ("0.0.0.0", 9393))
    assert not same_address(("127.0.0.1", 9393), ("127.0.0.1", 9394))
    assert not same_address(("::", 9393), ("0.0.0.0", 9393))  # ListenStream=9393 is [::]
    assert not same_address(("127.0.0.1", 9393), ("localhost", 9393))  # config refuses names


def test_each_socket_goes_to_the_listener_at_its_address() -> None:
    bound = {3: ("127.0.0.1", 9394), 4: ("127.0.0.1", 9393)}
    assert assign(bound, WANTED) == {"admin.listen": 3, "listen": 4}
    assert assign({3: ("127.0.0.1", 9393)}, WANTED) == {"listen": 3}  # admin binds itself
    assert assign({}, WANTED) == {}


def test_a_socket_at_no_configured_address_stops_the_start() -> None:
    with pytest.raises(ConfigError, match=r"socket on \[::\]:9393, which is no address of listen"):
        assign({3: ("::", 9393)}, WANTED)


def test_two_sockets_for_one_listener_stop_the_start() -> None:
    with pytest.raises(ConfigError, match=r"listen: systemd passed two sockets"):
        assign({3: ("127.0.0.1", 9393), 4: ("127.0.0.1", 9393)}, WANTED)


@contextlib.contextmanager
def placed(*socks: socket.socket) -> Iterator[None]:
    """``socks`` on descriptors 3, 4, ... for the block, as systemd places them; whatever this
    process had there before is put back afterwards."""
    saved: list[int | None] = []
    for n, sock in enumerate(socks):
        try:
            saved.append(os.dup(3 + n))
        except OSError:
            saved.append(None)
        os.dup2(sock.fileno(), 3 + n)
    try:
        yield
    finally:
        for n, fd in enumerate(saved):
            if fd is None:
                with contextlib.suppress(OSError):
                    os.close(3 + n)
            else:
                os.dup2(fd, 3 + n)
                os.close(fd)


def listening() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def test_inherited_sockets_are_found_and_the_variables_dropped() -> None:
    with listening() as admin, listening() as data, placed(admin, data):
        env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "x:y"}
        wanted = {"listen": data.getsockname(), "admin.listen": admin.getsockname()}
        got = inherited(wanted, env)
        assert env == {}
        assert {k: s.fileno() for k, s in got.items()} == {"listen": 4, "admin.listen": 3}
        assert got["listen"].getsockname() == data.getsockname()
        assert not got["listen"].get_inheritable()
        for s in got.values():
            s.detach()  # put back by placed()


def test_a_descriptor_that_is_no_listening_socket_stops_the_start() -> None:
    with socket.socket() as sock:  # bound, never listening
        sock.bind(("127.0.0.1", 0))
        env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1"}
        with placed(sock), pytest.raises(ConfigError, match="descriptor 3, which is not listen"):
            inherited({"listen": sock.getsockname()}, env)
