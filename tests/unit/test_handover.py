"""The listening-socket handover (``cachenode.handover``): a running sidecar's sockets reach the
next one whole, and anything else at the handover path is no handover: logged, every descriptor
closed, nothing taken, never a hang."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cachenode import handover
from cachenode.config import parse_config
from cachenode.errors import ConfigError
from cachenode.handover import Giver, Refused, listener_names, lock_cache, take
from cachenode.metrics import Metrics
from tests.support.handover import Impostor, described, send


@pytest.fixture
def path() -> Iterator[Path]:
    """A socket path short enough for sun_path (pytest's tmp_path may not be)."""
    where = Path(tempfile.mkdtemp(prefix="ho-", dir="/tmp"))
    yield where / "handover.sock"
    shutil.rmtree(where)


def listening(kind: socket.SocketKind = socket.SOCK_STREAM) -> socket.socket:
    sock = socket.socket(socket.AF_INET, kind)
    sock.bind(("127.0.0.1", 0))
    if kind == socket.SOCK_STREAM:
        sock.listen()
    return sock


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def handovers(metrics: Metrics) -> dict[tuple[str, str], float]:
    """The handovers counted, by role and outcome (those not at 0)."""
    return {
        (s.labels["role"], s.labels["outcome"]): s.value
        for family in metrics.registry.collect()
        if family.name == "cachenode_handovers"
        for s in family.samples
        if s.name.endswith("_total") and s.value
    }


def test_a_description_names_one_listener_per_descriptor() -> None:
    with listening() as data, listening() as admin:
        message, fds = handover.describe({"listen": data, "admin.listen": admin})
        assert fds == [admin.fileno(), data.fileno()]
    assert json.loads(message) == {"version": 1, "listeners": ["admin.listen", "listen"]}
    assert listener_names(message, 2, 0) == ["admin.listen", "listen"]


@pytest.mark.parametrize(
    ("message", "count", "flags", "why"),
    [
        (b"\xff\xfe garbage", 2, 0, "not JSON"),
        (b"[" * 1024, 0, 0, "not JSON"),  # nested past the recursion limit
        (b'{"version": 2, "listeners": ["listen"]}', 1, 0, "no version 1"),
        (b'["listen"]', 1, 0, "no version 1"),
        (b'{"version": 1, "listeners": "listen"}', 1, 0, "without a list"),
        (b'{"version": 1, "listeners": [1]}', 1, 0, "without a list"),
        (b'{"version": 1, "listeners": ["listen"]}', 2, 0, "1 listeners named for 2"),
        (b'{"version": 1, "listeners": ["listen", "listen"]}', 2, 0, "2 listeners named for 2"),
        (b'{"version": 1, "listeners": []}', 0, socket.MSG_TRUNC, "longer than 1024"),
        (b'{"version": 1, "listeners": []}', 0, socket.MSG_CTRUNC, "too many descriptors"),
    ],
)
def test_a_message_that_is_no_description_is_refused(
    message: bytes, count: int, flags: int, why: str
) -> None:
    with pytest.raises(Refused, match=why):
        listener_names(message, count, flags)


def test_a_giver_hands_its_sockets_to_a_taker(path: Path) -> None:
    data, admin = listening(), listening()
    wanted = {"listen": data.getsockname(), "admin.listen": admin.getsockname()}

    giving, taking = Metrics(), Metrics()

    async def scene() -> dict[str, socket.socket]:
        given = asyncio.Event()
        giver = Giver(path, {"listen": data, "admin.listen": admin}, given.set, giving)
        await giver.start()
        taken = await asyncio.to_thread(take, path, wanted, taking)
        await asyncio.wait_for(given.wait(), 5)
        await giver.close()
        return taken

    taken = asyncio.run(scene())
    assert handovers(giving) == {("giver", "given"): 1}
    assert handovers(taking) == {("taker", "taken"): 1}
    assert path.stat().st_mode & 0o777 == 0o600  # only its own uid may connect
    assert path.exists()  # handed over: the file is the taker's to replace, not removed
    assert sorted(taken) == ["admin.listen", "listen"]
    address = data.getsockname()
    assert taken["listen"].getsockname() == address
    with socket.create_connection(address, timeout=5) as caller:  # queued, not yet accepted
        data.close()  # the giver stops accepting: its own descriptor closes, nothing else
        caller.sendall(b"x")
        taken["listen"].setblocking(True)
        conn, _ = taken["listen"].accept()  # the same socket: the queued caller is there
        with conn:
            assert conn.recv(1) == b"x"
    for sock in (*taken.values(), admin):
        sock.close()


@pytest.fixture
def wanted() -> Iterator[dict[str, tuple[str, int]]]:
    data = listening()  # the configured address, which the impostor's sockets are not
    yield {"listen": data.getsockname()}
    data.close()


@pytest.mark.parametrize(
    "case",
    ["garbage", "oversized", "udp", "file", "unix", "elsewhere", "not listening", "three fds"],
)
def test_a_hostile_peer_hands_over_nothing(
    path: Path, wanted: dict[str, tuple[str, int]], case: str, caplog: pytest.LogCaptureFixture
) -> None:
    udp, other, idle = listening(socket.SOCK_DGRAM), listening(), socket.socket()
    idle.bind(("127.0.0.1", 0))
    pair = socket.socketpair()
    with open(__file__, "rb") as file:
        act = {
            "garbage": send(b"\x00\xffnot json at all"),
            "oversized": send(b"{" + b" " * 8192 + b"}", other),
            "udp": send(described(["listen"]), udp),
            "file": send(described(["listen"]), file.fileno()),
            "unix": send(described(["listen"]), pair[0]),
            "elsewhere": send(described(["listen"]), other),
            "not listening": send(described(["listen"]), idle),
            "three fds": send(described(["listen"] * 3), other, other, other),
        }[case]
        metrics = Metrics()
        before = open_fds()
        impostor = Impostor(path, act)
        with caplog.at_level(logging.INFO, "cachenode.handover"):
            assert take(path, wanted, metrics) == {}
        impostor.close()
        assert open_fds() == before  # every descriptor received is closed again
    assert handovers(metrics) == {("taker", "refused"): 1}
    assert impostor.answer == b""  # never told it was taken
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    assert "refused" in caplog.text and "binding the listeners" in caplog.text
    for sock in (udp, other, idle, *pair):
        sock.close()


def test_a_silent_peer_costs_the_timeout_not_a_hang(
    path: Path, wanted: dict[str, tuple[str, int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(handover, "TIMEOUT", 0.2)
    impostor = Impostor(path, lambda conn: None)
    assert take(path, wanted, Metrics()) == {}
    impostor.close()


def test_no_sidecar_or_a_stale_file_is_no_handover(
    path: Path, wanted: dict[str, tuple[str, int]], caplog: pytest.LogCaptureFixture
) -> None:
    metrics = Metrics()
    with caplog.at_level(logging.INFO, "cachenode.handover"):
        assert take(path, wanted, metrics) == {}  # no file
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as gone:
            gone.bind(str(path))  # closed at once: a stale file
        assert take(path, wanted, metrics) == {}
        path.unlink()
        path.write_text("not a socket")
        assert take(path, wanted, metrics) == {}
    assert [r.levelname for r in caplog.records] == ["INFO"] * 3  # a plain file: refused too
    assert handovers(metrics) == {("taker", "none"): 3}


def test_a_taker_checks_the_givers_uid(
    path: Path, wanted: dict[str, tuple[str, int]], caplog: pytest.LogCaptureFixture
) -> None:
    impostor = Impostor(path, send(described(["listen"])))
    assert take(path, wanted, Metrics(), uid=os.getuid() + 1) == {}
    impostor.close()
    assert f"runs as uid {os.getuid()}, not {os.getuid() + 1}" in caplog.text


SYSTEM_PYTHON = "/usr/bin/python3"  # the test's own may sit where another uid cannot run it


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to connect as another uid")
@pytest.mark.skipif(not os.access(SYSTEM_PYTHON, os.X_OK), reason=f"no {SYSTEM_PYTHON}")
def test_a_giver_hands_nothing_to_another_uid(path: Path) -> None:
    path.parent.chmod(0o755)
    peer = (
        "import socket, sys\n"
        "c = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
        "c.settimeout(5)\n"
        "c.connect(sys.argv[1])\n"
        "msg, fds, _, _ = socket.recv_fds(c, 1024, 4)\n"
        "print(len(msg), len(fds))\n"
    )

    async def scene(data: socket.socket) -> str:
        given = asyncio.Event()
        giver = Giver(path, {"listen": data}, given.set, metrics)
        await giver.start()
        try:
            await asyncio.to_thread(path.chmod, 0o666)  # past the mode: SO_PEERCRED is tested
            out = await asyncio.to_thread(
                subprocess.run,
                [SYSTEM_PYTHON, "-c", peer, str(path)],
                user=65534,
                capture_output=True,
                text=True,
                timeout=30,
            )
        finally:
            await giver.close()
        assert not given.is_set()
        return out.stdout + out.stderr

    metrics = Metrics()
    with listening() as data:
        assert asyncio.run(scene(data)).split() == ["0", "0"]  # closed on it: nothing sent
    assert handovers(metrics) == {("giver", "refused"): 1}
    assert not path.exists()  # not handed over: the giver removes its own file on close


def test_the_cache_is_one_process_at_a_time(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The next process waits for the lock as long as it takes, past LOCK_WAIT and past many
    of them, saying so once a LOCK_WAIT: giving up would reset the callers queued in the
    sockets it holds (cachenode.handover)."""
    now = 0.0

    async def scene() -> None:
        first = await lock_cache(tmp_path / "cache")

        async def sleep(seconds: float) -> None:  # a clock that runs as fast as the loop
            nonlocal now
            now += seconds
            if now >= 5 * handover.LOCK_WAIT + 1:
                os.close(first)  # the old process closed its cache at last (or ended)
            await asyncio.sleep(0)

        with caplog.at_level(logging.INFO, "cachenode.handover"):
            os.close(await lock_cache(tmp_path / "cache", clock=lambda: now, sleep=sleep))

    asyncio.run(scene())
    assert now >= 5 * handover.LOCK_WAIT + 1
    said = [r.getMessage() for r in caplog.records]
    assert said[0] == f"waiting for the previous sidecar to close {tmp_path / 'cache'}"
    assert [m.split(" after ")[1].split(";")[0] for m in said[1:]] == [
        "60s", "120s", "180s", "240s", "300s"
    ]  # fmt: skip
    assert all(r.levelname == "WARNING" for r in caplog.records[1:])


def test_a_cancelled_wait_for_the_cache_lets_go_of_it(tmp_path: Path) -> None:
    async def scene() -> None:
        first = await lock_cache(tmp_path / "cache")
        before = open_fds()
        polled = asyncio.Event()

        async def sleep(seconds: float) -> None:
            polled.set()  # the lock was tried, and found held
            await asyncio.sleep(seconds)

        waiting = asyncio.create_task(lock_cache(tmp_path / "cache", sleep=sleep))
        await polled.wait()
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert open_fds() == before
        os.close(first)

    asyncio.run(scene())


def test_the_handover_path_is_a_unix_socket_path() -> None:
    base = {"glance": {"url": "http://glance.example:9292"}}
    assert parse_config(base).handover_path is None
    cfg = parse_config({**base, "handover": {"path": "/run/cachenode/handover.sock"}})
    assert cfg.handover_path == Path("/run/cachenode/handover.sock")
    for bad, why in (
        ("run/handover.sock", "handover.path: must be an absolute path"),
        ("/" + "x" * 107, "handover.path: too long for a unix socket"),
    ):
        with pytest.raises(ConfigError, match=why):
            parse_config({**base, "handover": {"path": bad}})


def test_a_path_the_giver_cannot_listen_on_costs_only_the_next_handover(
    path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The start goes on: it may hold sockets taken from the previous process already."""
    nowhere = path.parent / "missing" / "handover.sock"

    async def scene() -> None:
        with listening() as data:
            giver = Giver(nowhere, {"listen": data}, lambda: None, Metrics())
            await giver.start()
            await giver.close()

    asyncio.run(scene())
    assert [r.levelname for r in caplog.records] == ["ERROR"]
    assert f"cannot offer the listening sockets at {nowhere}" in caplog.text


def sidecar_config(tmp_path: Path, path: Path, data: socket.socket, admin: socket.socket):  # type: ignore[no-untyped-def]
    host, port = data.getsockname()
    ahost, aport = admin.getsockname()
    return parse_config({
        "glance": {"url": "http://127.0.0.1:9"},
        "listen": f"{host}:{port}",
        "admin": {"listen": f"{ahost}:{aport}"},
        "cache": {"dir": str(tmp_path / "cache")},
        "handover": {"path": str(path)},
    })  # fmt: skip


def test_a_stop_asked_for_before_the_sockets_leaves_the_running_sidecar_its_sockets(
    tmp_path: Path, path: Path
) -> None:
    """A start already asked to stop never takes a running sidecar's sockets only to close
    them: the running one would have stopped accepting, and nobody would serve."""
    from cachenode.sidecar import Sidecar, StartAbandoned

    data, admin = listening(), listening()
    giving = Metrics()

    async def scene() -> None:
        given = asyncio.Event()
        giver = Giver(path, {"listen": data, "admin.listen": admin}, given.set, giving)
        await giver.start()
        car = Sidecar(sidecar_config(tmp_path, path, data, admin))
        car.stop_requested.set()
        with pytest.raises(StartAbandoned, match="listening sockets"):
            await car.start()
        await giver.close()
        assert not given.is_set()

    asyncio.run(scene())
    assert handovers(giving) == {}
    data.close()
    admin.close()


def test_a_stop_that_fails_still_lets_go_of_the_cache(tmp_path: Path, path: Path) -> None:
    """A sidecar whose stop fails (a fill's writer cannot close, a catalog error) still lets go
    of the cache: after a handover it then only waits for its SIGTERM, and its successor waits
    for the lock for as long as it is held."""
    from cachenode.errors import StoreError
    from cachenode.sidecar import Sidecar

    data, admin = listening(), listening()

    class FailingFills:
        async def close(self) -> None:
            raise StoreError("partial: Input/output error")

    async def never(seconds: float) -> None:
        raise AssertionError("the lock is still held")

    async def scene() -> None:
        car = Sidecar(sidecar_config(tmp_path, path, data, admin))
        car._cache_lock = await lock_cache(tmp_path / "cache")
        car.fills = FailingFills()  # type: ignore[assignment]
        with pytest.raises(StoreError, match="Input/output"):
            await car.stop()
        os.close(await lock_cache(tmp_path / "cache", sleep=never))

    asyncio.run(scene())
    data.close()
    admin.close()
