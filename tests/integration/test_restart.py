"""Restarts lose no download: a sidecar restarted in the middle of a herd, its listening sockets
held across the restart as ``deploy/cachenode.socket`` has systemd hold them, or handed from the
running sidecar to its successor as in the DaemonSet (``handover.path``).

The stand-in for systemd (``tests/support/systemd.py``) does what ``systemctl restart`` does with
a socket unit: SIGTERM to the old process, wait for it to exit, start the new one with the same
sockets. Meanwhile new callers connect and send their requests while no process accepts."""

from __future__ import annotations

import fcntl
import hashlib
import http.client
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from cachenode.metrics import HANDOVERS
from tests.support.glance import ALICE, Glance, Image
from tests.support.handover import Impostor, described, send
from tests.support.sidecar import Sidecar, free_port
from tests.support.systemd import Sockets, holds
from tests.support.upstream import Fault, Upstream

HERD = 6
LATE = 4


@dataclass
class Caller:
    """One download streamed in a thread: status, how far it got, the hash of what it got."""

    url: str
    status: int = 0
    cache_status: str = ""
    received: int = 0
    digest: str = ""
    error: BaseException | None = None
    thread: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        sha = hashlib.sha512()
        try:
            with requests.get(
                self.url, headers={"X-Auth-Token": ALICE}, stream=True, timeout=120
            ) as resp:
                self.status = resp.status_code
                self.cache_status = resp.headers.get("X-Cachenode-Status", "")
                for chunk in resp.iter_content(256 << 10):
                    sha.update(chunk)
                    self.received += len(chunk)
        except BaseException as exc:  # reported by the test
            self.error = exc
        self.digest = sha.hexdigest()

    def join(self) -> Caller:
        self.thread.join(120)
        assert not self.thread.is_alive()
        return self


def until(condition: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.01)


def answers(late: list[http.client.HTTPConnection]) -> list[tuple[int, str, str | None]]:
    """Each late caller's status, the sha512 of its body and its X-Cachenode-Status."""
    out = []
    for conn in late:
        resp = conn.getresponse()
        out.append((resp.status, hashlib.sha512(resp.read()).hexdigest(),
                    resp.getheader("X-Cachenode-Status")))  # fmt: skip
        conn.close()
    return out


def connect_and_ask(port: int, image_id: str) -> http.client.HTTPConnection:
    """A caller that has connected and sent its whole request; its answer is read later."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.connect()
    conn.request("GET", f"/v2/images/{image_id}/file", headers={"X-Auth-Token": ALICE})
    return conn


@pytest.fixture
def image(glance: Glance) -> Image:
    return glance.create_image(size=24 << 20)


def test_a_restart_mid_herd_loses_no_download(
    glance: Glance, sidecar_factory, image: Image
) -> None:  # type: ignore[no-untyped-def]
    hold = Fault("hold", at=len(image.data) // 2)
    sockets = Sockets()
    try:
        with Upstream(target=glance.url, faults=[hold]) as up:
            tier = {"name": "regional", "kind": "glance", "url": up.url}
            car = sidecar_factory(sockets=sockets, tiers=[tier]).start()
            url = f"{car.url}/v2/images/{image.id}/file"
            herd = [Caller(url) for _ in range(HERD)]
            until(hold.reached.is_set, "the fill reached the hold")
            until(lambda: all(c.received > 0 for c in herd), "every caller is streaming")

            old = car.proc
            assert old is not None
            old.send_signal(signal.SIGTERM)
            until(lambda: not sockets.holders(old.pid), "the old process closed its listener")
            assert old.poll() is None  # still draining: its streams wait on the fill
            late = [connect_and_ask(sockets.port, image.id) for _ in range(LATE)]

            hold.release()
            assert old.wait(30) == 0
            assert not any(c.join().error for c in herd), [c.error for c in herd]
            car.start()  # what systemd does next: the same sockets, a new process
            answered = answers(late)

            assert [c.status for c in herd] == [200] * HERD
            assert {c.digest for c in herd} == {image.sha512}
            # The old process committed its fill before it exited: the new one serves it from L1.
            assert answered == [(200, image.sha512, "HIT")] * LATE
            fetched = up.requests_for(image.id)
            assert [(s.status, s.bytes) for s in fetched] == [(200, len(image.data))]
    finally:
        sockets.close()


def test_sigterm_lets_streams_in_flight_finish(
    glance: Glance, sidecar_factory, image: Image
) -> None:  # type: ignore[no-untyped-def]
    """Without systemd's sockets too: the listener closes, every stream in flight ends whole,
    the process exits 0, and the image it filled is in L1 for the next start."""
    hold = Fault("hold", at=len(image.data) // 3)
    with Upstream(target=glance.url, faults=[hold]) as up:
        tier = {"name": "regional", "kind": "glance", "url": up.url}
        car = sidecar_factory(tiers=[tier]).start()
        herd = [Caller(f"{car.url}/v2/images/{image.id}/file") for _ in range(3)]
        until(hold.reached.is_set, "the fill reached the hold")
        until(lambda: all(c.received > 0 for c in herd), "every caller is streaming")
        assert car.proc is not None
        car.proc.send_signal(signal.SIGTERM)
        until(lambda: _refused(car.port), "the listener is closed")
        hold.release()
        assert car.proc.wait(30) == 0
        assert [(c.join().status, c.digest) for c in herd] == [(200, image.sha512)] * 3
        assert len(up.requests_for(image.id)) == 1
    car.start()
    resp = car.get(image.id, ALICE)
    assert (resp.status_code, resp.headers["X-Cachenode-Status"]) == (200, "HIT")


def _refused(port: int) -> bool:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.connect()
    except ConnectionRefusedError:
        return True
    finally:
        conn.close()
    return False


def test_a_socket_at_another_address_stops_the_start(sidecar_factory) -> None:  # type: ignore[no-untyped-def]
    sockets = Sockets()
    try:
        elsewhere = f"127.0.0.1:{free_port()}"
        car: Sidecar = sidecar_factory(sockets=sockets, admin={"listen": elsewhere})
        with pytest.raises(RuntimeError, match="exited 1"):
            car.start()
        assert (
            f"systemd passed a socket on 127.0.0.1:{sockets.admin_port}, "
            "which is no address of listen or admin.listen"
        ) in car.log()
    finally:
        sockets.close()


@pytest.fixture
def handover_path() -> Iterator[Path]:
    """A path for the handover socket short enough for sun_path (pytest's tmp_path may not be)."""
    where = Path(tempfile.mkdtemp(prefix="ho-", dir="/tmp"))
    yield where / "handover.sock"
    shutil.rmtree(where)


class Arrivals:
    """Callers that keep arriving, one every ``every`` seconds, until ``stop``."""

    def __init__(self, url: str, every: float = 0.1) -> None:
        self.callers: list[Caller] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(url, every), daemon=True)
        self._thread.start()

    def _run(self, url: str, every: float) -> None:
        while not self._done.wait(every):
            self.callers.append(Caller(url))

    def stop(self) -> list[Caller]:
        self._done.set()
        self._thread.join(10)
        return [c.join() for c in self.callers]


def handovers(car: Sidecar) -> dict[tuple[str, str], float]:
    """``cachenode_handovers_total`` as scraped from ``car``'s admin port, the series not at 0;
    every series of both roles is there, at 0 until it happens."""
    found = {
        (dict(labels)["role"], dict(labels)["outcome"]): value
        for (name, labels), value in car.metrics().items()
        if name == "cachenode_handovers_total"
    }
    assert sorted(found) == sorted(
        (role, outcome) for role, outcomes in HANDOVERS.items() for outcome in outcomes
    )
    return {key: value for key, value in found.items() if value}


def holds_socket(pid: int, port: int, peer: int = 0) -> bool:
    """Whether process ``pid`` has a descriptor on the socket listening on 127.0.0.1:``port``,
    or (``peer``) on the connection it accepted there from 127.0.0.1:``peer``."""
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    local, remote = f"0100007F:{port:04X}", f"{'0100007F' if peer else '00000000'}:{peer:04X}"
    state = "01" if peer else "0A"  # established, listening
    return holds(pid, {int(r[9]) for r in rows if r[1:4] == [local, remote, state]})


def test_a_successor_takes_the_sockets_mid_herd_and_loses_no_caller(
    glance: Glance, sidecar_factory, image: Image, handover_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """The DaemonSet's rolling update: B starts while A serves a herd from a held tier; B takes
    A's sockets, A stops accepting and finishes its streams, B opens the cache once A closed it.
    Callers keep connecting before, during and after: each gets 200 and the exact bytes.

    The tier is a mirror of our own, not glance-api behind the upstream: uWSGI gives up a response
    its client has not read for 4 s (its socket-timeout), shorter than this hold can last."""
    hold = Fault("hold", at=len(image.data) // 2)
    with Upstream(blobs={image.id: image.data}, faults=[hold]) as up:
        tier = {"name": "mirror", "kind": "http", "url": up.url + "/images/{image_id}"}
        handover = {"path": str(handover_path)}
        a = sidecar_factory("a", tiers=[tier], handover=handover).start()
        b = sidecar_factory(
            "b",
            tiers=[tier],
            handover=handover,
            listen=f"127.0.0.1:{a.port}",
            admin={"listen": f"127.0.0.1:{a.admin_port}"},
            cache={"dir": str(a.cache_dir)},
        )
        url = f"{a.url}/v2/images/{image.id}/file"
        herd = [Caller(url) for _ in range(HERD)]
        until(hold.reached.is_set, "the fill reached the hold")
        until(lambda: all(c.received > 0 for c in herd), "every caller is streaming")
        arrivals = Arrivals(url)  # before, during and after the handover
        time.sleep(0.3)  # a few arrive before B starts

        assert a.proc is not None
        b.start(ready=False)
        until(lambda: "handed the listening sockets over" in a.log(), "A handed over")
        until(lambda: not holds_socket(a.proc.pid, a.port), "A stopped accepting")
        assert "took the listening sockets of the running sidecar" in b.log()
        assert a.proc.poll() is None  # draining: its streams wait on the held fill
        late = [connect_and_ask(a.port, image.id) for _ in range(LATE)]  # nobody accepts yet

        hold.release()
        assert not any(c.join().error for c in herd), [c.error for c in herd]
        until(lambda: "waiting for SIGTERM" in a.log(), "A drained and closed its cache")
        assert a.proc.poll() is None  # idle until its pod is deleted, holding nothing
        until(lambda: "cachenode serving on" in b.log(), "B serves")
        time.sleep(0.3)  # a few arrive after
        arrived = arrivals.stop()
        answered = answers(late)

        assert [c.status for c in herd] == [200] * HERD
        assert {c.digest for c in herd} == {image.sha512}
        assert [(c.status, c.digest, c.error) for c in arrived] == [
            (200, image.sha512, None)
        ] * len(arrived)
        # Served by both: A's joins of its fill, then B's hits of what A committed.
        assert {"JOINED", "HIT"} <= {c.cache_status for c in arrived}, arrived
        assert answered == [(200, image.sha512, "HIT")] * LATE  # connected during the drain
        fetched = up.requests_for(image.id)
        assert [(s.status, s.bytes) for s in fetched] == [(200, len(image.data))]
        assert a.stop() == 0
        resp = b.get(image.id, ALICE)
        assert (resp.status_code, resp.headers["X-Cachenode-Status"]) == (200, "HIT")
        assert "Traceback" not in a.log() + b.log()
        # Only B answers on the admin port now: its side of the handover, and nothing given yet.
        assert handovers(b) == {("taker", "taken"): 1.0}


@pytest.mark.parametrize("peer", ["garbage", "wrong descriptors", "oversized"])
def test_a_hostile_handover_peer_is_ignored(
    glance: Glance, sidecar_factory, handover_path: Path, peer: str
) -> None:  # type: ignore[no-untyped-def]
    """Whatever answers at the handover path instead of a sidecar: the new sidecar binds its
    listeners itself, starts and serves, with one line on what it refused."""
    image = glance.create_image(size=1 << 20)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with udp, open(__file__, "rb") as file:
        act = {
            "garbage": send(b"\x00\xff{not json"),
            "wrong descriptors": send(described(["listen", "admin.listen"]), udp, file.fileno()),
            "oversized": send(b"{" + b" " * 8192 + b"}", udp),
        }[peer]
        impostor = Impostor(handover_path, act)
        car = sidecar_factory(handover={"path": str(handover_path)}).start()
        impostor.close()
    assert impostor.answer == b""  # never told the sockets were taken
    resp = car.get(image.id, ALICE)
    assert (resp.status_code, resp.content) == (200, image.data)
    log = car.log()
    assert f"handover at {handover_path} refused" in log and "binding the listeners" in log
    assert "Traceback" not in log
    assert handover_path.is_socket()  # the new sidecar offers its own sockets there now
    assert handovers(car) == {("taker", "refused"): 1.0}


def test_a_connection_accepted_before_a_stop_is_answered(glance: Glance, sidecar_factory) -> None:  # type: ignore[no-untyped-def]
    """A caller whose connection the sidecar accepted an instant before it stopped accepting
    (a SIGTERM, a successor taking the sockets), and whose request comes after that, is
    answered: its connection is not closed as idle."""
    image = glance.create_image(1 << 20)
    car = sidecar_factory().start()
    assert car.get(image.id, ALICE).status_code == 200  # cached: the answer needs no tier
    with socket.create_connection(("127.0.0.1", car.port), timeout=30) as conn:
        assert car.proc is not None
        peer = conn.getsockname()[1]
        until(lambda: holds_socket(car.proc.pid, car.port, peer), "accepted, no request sent yet")
        car.proc.send_signal(signal.SIGTERM)
        until(lambda: _refused(car.port), "the stop has begun: the listener is closed")
        reply = http.client.HTTPConnection("127.0.0.1", car.port, timeout=30)
        reply.sock = conn
        reply.request("GET", f"/v2/images/{image.id}/file", headers={"X-Auth-Token": ALICE})
        answer = reply.getresponse()
        body = answer.read()
    assert answer.status == 200 and hashlib.sha512(body).hexdigest() == image.sha512
    assert car.proc.wait(30) == 0


def test_a_sigterm_while_waiting_for_the_cache_stops_at_once(
    sidecar_factory, handover_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """A sidecar that waits for the previous one to close the cache (its drain) and is told to
    stop meanwhile (the rollout was undone, the node drained) stops at once, as a stopped one:
    exit 0, one line on what it waited for, its listening sockets closed."""
    car = sidecar_factory(handover={"path": str(handover_path)})
    car.cache_dir.mkdir(parents=True)
    lock = os.open(car.cache_dir / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as the previous sidecar holds it while it drains
        car.start(ready=False)
        assert car.proc is not None
        until(lambda: "waiting for the previous sidecar to close" in car.log(), "waiting")
        with socket.create_connection(("127.0.0.1", car.port), timeout=10) as caller:
            took = car.sigterm()  # the caller is in the backlog
            with pytest.raises(ConnectionResetError):  # nobody will accept it: told so at once
                caller.recv(1)
    finally:
        os.close(lock)
    assert took < 5, took  # the wait it cut short lasts 30 to 60 s
    log = car.stopped_before_serving(f"the previous sidecar to close {car.cache_dir}")
    assert "serving on" not in log
    assert _refused(car.port) and _refused(car.admin_port)
