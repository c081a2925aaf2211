"""Glance behind a real nginx (Debian's, with its default limits), as in real clouds (SPEC §3).

The front proxy answers some requests itself (a header too large for its buffers, a redirect, a
maintenance page, a 502 when Glance drops the connection); none of those is Glance granting a
download. Whatever the credentials, a caller gets image bytes from the cache only where
nginx+Glance would have given it the image, and otherwise exactly what nginx+Glance answer.
"""

from __future__ import annotations

import http.client
import socket
import threading
from dataclasses import dataclass
from pathlib import Path

import requests

from tests.support.clients import wait_for
from tests.support.frontproxy import FrontProxy, front_proxy
from tests.support.glance import ALICE, ALICE_READER, BOB, Glance, Image
from tests.support.sidecar import Sidecar, free_port

__all__ = ["front_proxy"]  # the session fixture, used by the tests below

A, B = ALICE.encode(), BOB.encode()


def token(value: bytes) -> bytes:
    return b"X-Auth-Token: " + value + b"\r\n"


def padded(size: int) -> bytes:
    """Alice's token grown to ``size`` bytes with a role nobody has: still valid for Glance."""
    return (A + b"," + b"x" * size)[:size]


@dataclass(frozen=True)
class Bad:
    name: str
    lines: tuple[bytes, ...]  # header lines, as sent on the wire
    exact: bool  # the sidecar's answer is nginx+Glance's, status and body

    def __str__(self) -> str:
        return self.name


# The sidecar takes header values up to 8190 bytes; nginx's 8 KiB buffers take a header line
# ("X-Auth-Token: " + value + CRLF) up to 8192: a token of 8185 bytes is one nginx refuses with
# its own 400, before Glance sees it. The probe used to take that 400 as Glance's "allowed".
BAD = (
    Bad("junk", (token(b"not-a-token"),), exact=True),
    Bad("junk with a tab", (token(b"not\ta-token"),), exact=True),
    Bad("good with a tab and more", (token(A + b"\tx"),), exact=True),  # Glance: 403
    Bad("8185 bytes", (token(padded(8185)),), exact=True),  # nginx: 400
    Bad("two good", (token(A), token(A)), exact=True),  # joined into one value: 401
    Bad("good and another", (token(A), token(B)), exact=True),
    Bad("9 KiB", (token(padded(9 << 10)),), exact=False),  # both refuse it with 400
    Bad("64 KiB", (token(padded(64 << 10)),), exact=False),
    Bad("good and 0x01", (token(A + b"\x01"),), exact=False),  # the sidecar: 400, nginx: 403
    Bad("good and DEL", (token(A + b"\x7f"),), exact=False),
    Bad("good and NUL", (token(A + b"\x00"),), exact=False),
    Bad("folded", (token(A) + b" junk\r\n",), exact=False),
)


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes


def raw_get(url: str, path: str, lines: tuple[bytes, ...]) -> Answer:
    """GET with header lines exactly as given (repeats, control bytes, any size)."""
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        head = b"GET " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: */*\r\n"
        sock.sendall(head + b"".join(lines) + b"Connection: close\r\n\r\n")
        resp = http.client.HTTPResponse(sock)
        resp.begin()
        return Answer(resp.status, resp.headers, resp.read())


def file_path(image_id: str) -> str:
    return f"/v2/images/{image_id}/file"


def assert_no_image_bytes(answer: Answer, image: Image) -> None:
    assert answer.status >= 400
    assert answer.headers.get("X-Cachenode-Status") in (None, "BYPASS")
    assert len(answer.body) < 1024 and image.data[:32] not in answer.body


SERVED = ("hit", "miss", "joined")


def check_bad_callers(front: FrontProxy, sidecar: Sidecar, image: Image) -> None:
    """No bad caller gets an image byte; where it is meaningful, each gets nginx+Glance's answer."""
    direct = {bad.name: raw_get(front.url, file_path(image.id), bad.lines) for bad in BAD}
    served = {s: sidecar.metric("cachenode_requests_total", status=s) for s in SERVED}
    for bad in BAD:
        via = raw_get(sidecar.url, file_path(image.id), bad.lines)
        ref = direct[bad.name]
        assert_no_image_bytes(via, image)
        assert_no_image_bytes(ref, image)
        if bad.exact:
            assert (via.status, via.body) == (ref.status, ref.body), bad.name
        else:
            assert via.status == 400, bad.name  # the sidecar cannot parse it: refused
    assert {s: sidecar.metric("cachenode_requests_total", status=s) for s in SERVED} == served


def test_bad_credentials_get_nothing_from_a_hit(
    glance: Glance, front_proxy: FrontProxy, sidecar_factory
) -> None:  # type: ignore[no-untyped-def]
    image = glance.create_image(1 << 20)
    warm = sidecar_factory("warm", glance_url=front_proxy.url).start()
    assert warm.get(image.id, ALICE).content == image.data
    warm.stop()
    sidecar = sidecar_factory(glance_url=front_proxy.url, cache={"dir": str(warm.cache_dir)})
    sidecar.start()
    assert [b.name for b in sidecar.blobs()] == [image.id]

    check_bad_callers(front_proxy, sidecar, image)
    assert sidecar.metric("cachenode_served_bytes_total", tier="l1") == 0
    assert sidecar.metric("cachenode_passthrough_total", reason="undecided") == 1  # 8185 bytes
    hit = sidecar.get(image.id, ALICE)
    assert hit.headers["X-Cachenode-Status"] == "HIT" and hit.content == image.data


def test_bad_credentials_get_nothing_from_a_miss(
    glance: Glance, front_proxy: FrontProxy, sidecar_factory
) -> None:  # type: ignore[no-untyped-def]
    image = glance.create_image(1 << 20)
    sidecar = sidecar_factory(glance_url=front_proxy.url).start()

    check_bad_callers(front_proxy, sidecar, image)
    sidecar.settle()
    assert sidecar.blobs() == [] and sidecar.partials() == []
    assert sidecar.metric("cachenode_fills_total", tier="glance", outcome="ok") == 0
    # Nobody got the image from Glance either: nginx sent no 200 for its file.
    assert not [e for e in front_proxy.log() if e.uri == file_path(image.id) and e.status == 200]
    miss = sidecar.get(image.id, ALICE)
    assert miss.headers["X-Cachenode-Status"] == "MISS" and miss.content == image.data


def test_bad_credentials_get_nothing_from_a_fill_in_progress(
    glance: Glance, front_proxy: FrontProxy, sidecar_factory
) -> None:  # type: ignore[no-untyped-def]
    image = glance.create_image(16 << 20)  # ~8 s through the proxy's 2 MiB/s link
    slow = {"name": "slow", "kind": "glance", "url": front_proxy.url + "/slow"}
    sidecar = sidecar_factory(glance_url=front_proxy.url, tiers=[slow]).start()
    owner: dict[str, requests.Response] = {}
    thread = threading.Thread(target=lambda: owner.update(r=sidecar.get(image.id, ALICE)))
    thread.start()
    wait_for(lambda: bool(sidecar.partials()))

    check_bad_callers(front_proxy, sidecar, image)
    assert sidecar.metric("cachenode_inflight_fills") == 1  # all of them came during the fill
    thread.join(60)
    assert owner["r"].status_code == 200 and owner["r"].content == image.data
    assert sidecar.metric("cachenode_coalesced_requests_total") == 0
    assert sidecar.metric("cachenode_requests_total", status="miss") == 1


def test_a_redirect_or_a_maintenance_page_is_no_grant(
    glance: Glance, front_proxy: FrontProxy, sidecar_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    image, cold = glance.create_image(1 << 20), glance.create_image(1 << 20)
    cache = {"dir": str(tmp_path / "cache")}
    warm = sidecar_factory("warm", glance_url=front_proxy.url, cache=cache).start()
    assert warm.get(image.id, ALICE).content == image.data
    warm.stop()
    for prefix, status in (("/redirect", 302), ("/maintenance", 200)):
        # Alice may download both images, one is in L1; the proxy answers in Glance's place.
        sidecar = sidecar_factory(prefix[1:], glance_url=front_proxy.url + prefix, cache=cache)
        sidecar.start()
        for one in (image, cold):
            url = sidecar.url + file_path(one.id)
            via = requests.get(url, headers={"X-Auth-Token": ALICE}, allow_redirects=False,
                               timeout=60)  # fmt: skip
            ref = requests.get(front_proxy.url + prefix + file_path(one.id), timeout=60,
                               headers={"X-Auth-Token": ALICE}, allow_redirects=False)  # fmt: skip
            assert (via.status_code, via.content) == (status, ref.content)
            assert via.headers.get("Location") == ref.headers.get("Location")
            assert via.headers["X-Cachenode-Status"] == "BYPASS"
            assert one.data[:32] not in via.content
        assert sidecar.metric("cachenode_passthrough_total", reason="undecided") == 2
        assert sidecar.metric("cachenode_served_bytes_total", tier="l1") == 0
        sidecar.stop()
    assert b"maintenance" in ref.content
    assert not [e for e in front_proxy.log() if e.uri.startswith("/caught/")]  # never followed


def test_an_image_without_data_behind_the_proxy_gets_glances_204(
    glance: Glance, front_proxy: FrontProxy, sidecar_factory
) -> None:  # type: ignore[no-untyped-def]
    # Glance drops the probe's connection; nginx makes that a 502 of its own. Glance is not
    # down: the caller's own GET, passed through, gets Glance's 204.
    r = glance.api("POST", "/v2/images", json={"name": "queued", "disk_format": "raw",
                                               "container_format": "bare"})  # fmt: skip
    image_id = r.json()["id"]
    sidecar = sidecar_factory(glance_url=front_proxy.url).start()
    via = sidecar.get(image_id, ALICE)
    ref = requests.get(front_proxy.url + file_path(image_id), headers={"X-Auth-Token": ALICE},
                       timeout=60)  # fmt: skip
    assert (via.status_code, ref.status_code) == (204, 204) and via.content == b""
    assert [e.status for e in front_proxy.log() if image_id in e.uri and e.range] == [502]
    assert sidecar.metric("cachenode_passthrough_total", reason="undecided") == 1


def test_probes_reuse_their_connection(
    glance: Glance, front_proxy: FrontProxy, sidecar_factory
) -> None:  # type: ignore[no-untyped-def]
    image = glance.create_image(1 << 20)
    sidecar = sidecar_factory(glance_url=front_proxy.url).start()
    assert sidecar.get(image.id, ALICE).status_code == 200
    seen = len(front_proxy.log())
    callers = [ALICE] * 10 + [BOB] * 5 + [ALICE_READER] * 5  # 206, Glance's 404 and 403
    for caller in callers:
        sidecar.get(image.id, caller, settle=False)
    probes = [e for e in front_proxy.log()[seen:] if e.range == "bytes=0-0"]
    assert sorted(e.status for e in probes) == [206] * 10 + [403] * 5 + [404] * 5
    # One TCP connection (two at most, the probe's and the image record's of the first miss)
    # carried the 20 probes: small bodies are read and the connection goes back to the pool.
    assert len({e.connection for e in probes}) <= 2
    assert max(e.number for e in probes) >= 10


def test_a_200_is_a_grant_only_when_it_is_the_whole_image(
    glance: Glance, front_proxy: FrontProxy, sidecar_factory
) -> None:  # type: ignore[no-untyped-def]
    # /norange/ drops the Range header, so Glance answers the probe with the whole image.
    image = glance.create_image(32 << 20)
    norange = front_proxy.url + "/norange"
    sidecar = sidecar_factory(glance_url=norange).start()
    # A miss in Glance's cache streams without Content-Length: not provably the image.
    first = sidecar.get(image.id, ALICE)
    assert first.headers["X-Cachenode-Status"] == "BYPASS" and first.content == image.data

    def glance_cached() -> bool:
        with requests.get(norange + file_path(image.id), headers={"X-Auth-Token": ALICE},
                          stream=True, timeout=60) as resp:  # fmt: skip
            return resp.headers.get("Content-Length") == str(len(image.data))

    wait_for(glance_cached)
    # Now octets of exactly the record's size, from Glance: the image, so a grant.
    second = sidecar.get(image.id, ALICE)
    assert second.headers["X-Cachenode-Status"] == "MISS" and second.content == image.data
    probes = [e for e in front_proxy.log() if e.uri.startswith("/norange/") and e.range]
    assert [e.status for e in probes if image.id in e.uri] == [200, 200]
    # Neither 200 was read: the probe closed the connection instead of taking in the image.
    assert all(e.bytes < len(image.data) for e in probes if image.id in e.uri)
    assert sidecar.metric("cachenode_authz_total", outcome="undecided") == 1
    assert sidecar.metric("cachenode_authz_total", outcome="allowed") == 1


def test_glance_down_behind_the_proxy(glance: Glance, sidecar_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    image, cold = glance.create_image(1 << 20), glance.create_image(1 << 20)
    front = FrontProxy(tmp_path / "nginx", glance.url).start()
    try:
        sidecar = sidecar_factory(glance_url=front.url, authz={"ttl": "0s", "stale_if_error": "5m"})
        sidecar.start()
        assert sidecar.get(image.id, ALICE).status_code == 200
        front.retarget(f"http://127.0.0.1:{free_port()}")  # glance-api is gone; nginx says 502
        # A recently approved caller keeps its L1 hits (stale_if_error) ...
        hit = sidecar.get(image.id, ALICE)
        assert hit.status_code == 200 and hit.headers["X-Cachenode-Status"] == "HIT"
        assert hit.content == image.data
        # ... and anyone else gets exactly what nginx answers: its own 502.
        for token, image_id in ((BOB, image.id), (ALICE, cold.id)):
            via = sidecar.get(image_id, token)
            ref = requests.get(front.url + file_path(image_id), headers={"X-Auth-Token": token},
                               timeout=60)  # fmt: skip
            assert (via.status_code, via.content) == (502, ref.content)
            assert via.headers["X-Cachenode-Status"] == "BYPASS"
        assert sidecar.metric("cachenode_authz_total", outcome="stale") == 1
        assert sidecar.metric("cachenode_authz_total", outcome="undecided") == 2
    finally:
        front.stop()
