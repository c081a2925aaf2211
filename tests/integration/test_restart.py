"""Restarts lose no download: a sidecar restarted in the middle of a herd, its listening sockets
held across the restart as ``deploy/cachenode.socket`` has systemd hold them.

The stand-in for systemd (``tests/support/systemd.py``) does what ``systemctl restart`` does with
a socket unit: SIGTERM to the old process, wait for it to exit, start the new one with the same
sockets. Meanwhile new callers connect and send their requests while no process accepts."""

from __future__ import annotations

import hashlib
import http.client
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import requests

from tests.support.glance import ALICE, Glance, Image
from tests.support.sidecar import Sidecar, free_port
from tests.support.systemd import Sockets
from tests.support.upstream import Fault, Upstream

HERD = 6
LATE = 4


@dataclass
class Caller:
    """One download streamed in a thread: status, how far it got, the hash of what it got."""

    url: str
    status: int = 0
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
            answers = [conn.getresponse() for conn in late]
            bodies = [a.read() for a in answers]
            for conn in late:
                conn.close()

            assert [c.status for c in herd] == [200] * HERD
            assert {c.digest for c in herd} == {image.sha512}
            assert [a.status for a in answers] == [200] * LATE
            assert {hashlib.sha512(b).hexdigest() for b in bodies} == {image.sha512}
            # The old process committed its fill before it exited: the new one serves it from L1.
            assert {a.getheader("X-Cachenode-Status") for a in answers} == {"HIT"}
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
