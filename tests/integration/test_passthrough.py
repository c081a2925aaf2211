"""Pass-through is exact (SPEC §3): what reaches Glance is what the caller sent, and back.

Against the real glance-api wherever it can show the behaviour; against ``Origin``, a small server
of our own on 127.0.0.1, only for what the real one cannot be made to do: answer
``100 Continue`` (uWSGI's http-socket never does), trickle a document, repeat or hop response
headers, hold a hundred streams open (the test bed runs 8 threads).
"""

from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import socket
import subprocess
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import pytest
import requests
from aiohttp import web

from cachenode.proxy import MAX_DISCOVERY_BODY, STREAM_POOL
from tests.support.glance import ALICE, BOB, Glance
from tests.support.sidecar import Sidecar, free_port

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Origin:
    """An aiohttp app of ours on 127.0.0.1, served from its own thread and event loop."""

    def __init__(self, app: Callable[[], web.Application]) -> None:
        self._app = app
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._failed: Exception | None = None
        self._thread = threading.Thread(target=self._main, daemon=True, name="origin")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Origin:
        self._thread.start()
        assert self._ready.wait(10), "origin did not start"
        if self._failed is not None:
            raise self._failed
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _main(self) -> None:
        try:
            self.loop.run_until_complete(self._serve())
        except Exception as exc:  # handed to the test thread by __enter__
            self._failed = exc
            self._ready.set()
        finally:
            self.loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        runner = web.AppRunner(self._app(), access_log=None, handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", self.port).start()
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()


def exchange(port: int, data: bytes, timeout: float = 30) -> bytes:
    """Send raw bytes to 127.0.0.1:port; everything it answers until it closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        return read_all(sock)


def read_all(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(1 << 16):
        out += chunk
    return out


def read_exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n and (chunk := sock.recv(n - len(out))):
        out += chunk
    return out


def get(
    port: int, path: str, headers: list[tuple[str, str]], method: str = "GET"
) -> http.client.HTTPResponse:
    """One request whose headers go out exactly as listed (repeats included); body read."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
    for name, value in [("Host", f"127.0.0.1:{port}"), *headers]:
        conn.putheader(name, value)
    conn.endheaders()
    resp = conn.getresponse()
    resp.read()
    conn.close()
    return resp


def pointed_at(doc: Any, base: str) -> Any:
    """``doc`` with every absolute href moved to ``base``, as the test expects the sidecar to."""
    if isinstance(doc, dict):
        return {k: _moved(v, base) if k == "href" else pointed_at(v, base) for k, v in doc.items()}
    if isinstance(doc, list):
        return [pointed_at(v, base) for v in doc]
    return doc


def _moved(href: str, base: str) -> str:
    parts, to = urlsplit(href), urlsplit(base)
    return urlunsplit((to.scheme, to.netloc, parts.path, parts.query, parts.fragment))


def glance_log(glance: Glance) -> str:
    return (glance.base / "log" / "uwsgi.log").read_text()


def echo_app() -> web.Application:
    """Answers with the header lines it received, and sends back repeated and hop headers."""

    async def echo(request: web.Request) -> web.Response:
        resp = web.json_response([[k.decode(), v.decode()] for k, v in request.raw_headers])
        resp.headers.add("Set-Cookie", "a=1; Path=/")
        resp.headers.add("Set-Cookie", "b=2; Path=/")
        resp.headers.add("X-Multi", "one")
        resp.headers.add("X-Multi", "two")
        resp.headers["Connection"] = "keep-alive, X-Hop"
        resp.headers["X-Hop"] = "for the next hop only"
        resp.headers["Keep-Alive"] = "timeout=5"
        if to := request.query.get("location"):
            resp.headers["Location"] = to
        return resp

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


# -- version documents


def test_version_documents_are_glances_with_links_to_the_sidecar(
    glance: Glance, sidecar: Sidecar
) -> None:
    for path in ("/", "/versions"):
        direct = requests.get(glance.url + path, timeout=10)
        through = requests.get(sidecar.url + path, timeout=10)
        assert through.status_code == direct.status_code
        assert through.json() == pointed_at(direct.json(), sidecar.url)
        assert int(through.headers["Content-Length"]) == len(through.content)


def test_links_use_the_callers_host_only_when_it_is_a_host(sidecar: Sidecar) -> None:
    answer = exchange(
        sidecar.port,
        b"GET /versions HTTP/1.1\r\nHost: evil.example/x?\r\nConnection: close\r\n\r\n",
    )
    doc = json.loads(answer.partition(b"\r\n\r\n")[2])
    hrefs = [link["href"] for v in doc["versions"] for link in v["links"]]
    assert hrefs and all(href.startswith(sidecar.url + "/") for href in hrefs), hrefs


def test_a_version_document_in_many_small_reads_is_read_whole(
    glance: Glance, sidecar_factory
) -> None:  # type: ignore[no-untyped-def]
    document = requests.get(glance.url + "/versions", timeout=10).content

    def app() -> web.Application:
        async def trickle(request: web.Request) -> web.StreamResponse:
            resp = web.StreamResponse(headers={"Content-Type": "application/json"})
            resp.content_length = len(document)
            await resp.prepare(request)
            for i in range(0, len(document), 7):  # a few hundred TCP segments
                await resp.write(document[i : i + 7])
                await asyncio.sleep(0.002)
            return resp

        application = web.Application()
        application.router.add_get("/versions", trickle)
        return application

    with Origin(app) as origin:
        sidecar = sidecar_factory(glance_url=origin.url).start()
        through = requests.get(sidecar.url + "/versions", timeout=30)
    assert through.status_code == 200
    assert through.json() == pointed_at(json.loads(document), sidecar.url)


def test_a_document_over_the_bound_is_streamed_unchanged(sidecar_factory) -> None:  # type: ignore[no-untyped-def]
    link = {"rel": "self", "href": "http://glance.example:9292/v2/"}
    small = json.dumps({"versions": [{"id": "v2.18", "links": [link]}]}).encode()
    big = json.dumps(
        {"versions": [{"id": "v2.18", "links": [link]}], "pad": "x" * MAX_DISCOVERY_BODY}
    ).encode()

    def app() -> web.Application:
        async def root(_: web.Request) -> web.Response:
            return web.Response(body=small, status=300, content_type="application/json")

        async def versions(_: web.Request) -> web.Response:
            return web.Response(body=big, content_type="application/json")

        application = web.Application()
        application.router.add_get("/", root)
        application.router.add_get("/versions", versions)
        return application

    with Origin(app) as origin:
        sidecar = sidecar_factory(glance_url=origin.url).start()
        rewritten = requests.get(sidecar.url + "/", timeout=10)
        unchanged = requests.get(sidecar.url + "/versions", timeout=10)
    assert rewritten.status_code == 300
    assert rewritten.json()["versions"][0]["links"][0]["href"] == sidecar.url + "/v2/"
    assert unchanged.status_code == 200
    assert unchanged.content == big
    assert unchanged.headers["Content-Length"] == str(len(big))


# -- headers


def test_repeated_request_headers_all_reach_glance(glance: Glance, sidecar: Sidecar) -> None:
    # Two tokens of two projects: Glance (uWSGI joins repeats) refuses them together; a sidecar
    # that kept only one of them would get the caller in.
    port = urlsplit(glance.url).port
    assert port is not None
    both = [("X-Auth-Token", ALICE), ("X-Auth-Token", BOB)]
    assert get(port, "/v2/images", both).status == 401
    assert get(sidecar.port, "/v2/images", both).status == 401
    assert get(sidecar.port, "/v2/images", both[:1]).status == 200


def test_headers_keep_every_value_and_lose_hop_by_hop_ones(sidecar_factory) -> None:  # type: ignore[no-untyped-def]
    with Origin(echo_app) as origin:
        sidecar = sidecar_factory(glance_url=origin.url).start()
        sent = [
            ("Host", "caller.example"),
            ("X-Repeat", "a"),
            ("X-Repeat", "b"),
            ("Cookie", "mine=1"),
            ("X-Repeat", "c"),
            ("Connection", "keep-alive, X-Named"),
            ("Connection", "x-also-named"),
            ("X-Named", "hop"),
            ("X-Also-Named", "hop"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Upgrade", "websocket"),
            ("Proxy-Authorization", "Basic eDp5"),
        ]
        conn = http.client.HTTPConnection("127.0.0.1", sidecar.port, timeout=30)
        conn.putrequest("GET", "/v2/echo", skip_host=True, skip_accept_encoding=True)
        for name, value in sent:
            conn.putheader(name, value)
        conn.endheaders()
        resp = conn.getresponse()
        received = json.loads(resp.read())
        conn.close()
        # A second caller: no cookie of the first one's answer goes with it.
        second = requests.get(sidecar.url + "/v2/echo", timeout=10).json()

    assert resp.status == 200
    assert [v for k, v in received if k == "X-Repeat"] == ["a", "b", "c"]
    names = {k.lower() for k, _ in received}
    assert names & {"x-named", "x-also-named", "keep-alive", "te", "upgrade"} == set()
    assert "proxy-authorization" not in names
    assert ("Host", f"127.0.0.1:{origin.port}") in [tuple(p) for p in received]  # Glance's own
    assert ["Cookie", "mine=1"] in received
    assert (
        names & {"accept", "accept-encoding", "user-agent", "content-type"} == set()
    )  # nothing of aiohttp's
    assert "cookie" not in {k.lower() for k, _ in second}
    assert resp.headers.get_all("Set-Cookie") == ["a=1; Path=/", "b=2; Path=/"]
    assert resp.headers.get_all("X-Multi") == ["one", "two"]
    assert resp.headers.get("X-Hop") is None
    assert resp.headers.get("Keep-Alive") is None


def test_a_header_named_in_connection_does_not_reach_glance(
    glance: Glance, sidecar: Sidecar
) -> None:
    token = [("X-Auth-Token", ALICE)]
    assert get(sidecar.port, "/v2/images", token).status == 200
    named = [*token, ("Connection", "keep-alive, X-Auth-Token")]
    assert get(sidecar.port, "/v2/images", named).status == 401  # Glance saw no token


def test_an_upload_without_content_type_gets_glances_415(glance: Glance, sidecar: Sidecar) -> None:
    port = urlsplit(glance.url).port
    assert port is not None
    image_id = new_image(glance)
    for target in (port, sidecar.port):  # http.client adds no Content-Type; nor may the sidecar
        conn = http.client.HTTPConnection("127.0.0.1", target, timeout=30)
        conn.request("PUT", f"/v2/images/{image_id}/file", b"x" * 1024, {"X-Auth-Token": ALICE})
        assert conn.getresponse().status == 415
        conn.close()
    assert glance.api("GET", f"/v2/images/{image_id}").json()["status"] == "queued"


def test_location_is_rewritten_only_when_it_is_glances(
    glance: Glance, sidecar: Sidecar, sidecar_factory
) -> None:  # type: ignore[no-untyped-def]
    created = requests.post(
        sidecar.url + "/v2/images",
        headers={"X-Auth-Token": ALICE},
        json={"name": "loc", "disk_format": "raw", "container_format": "bare"},
        timeout=30,
    )
    assert created.status_code == 201
    assert created.headers["Location"] == f"{sidecar.url}/v2/images/{created.json()['id']}"

    with Origin(echo_app) as origin:
        car = sidecar_factory("loc", glance_url=origin.url).start()
        cases = {
            f"{origin.url}/v2/images/x": f"{car.url}/v2/images/x",
            f"{origin.url}0/v2/images/x": None,  # another port that starts alike
            f"http://127.0.0.1:{origin.port}@evil.example/v2/": None,
            f"http://evil.example/{origin.url}/v2/": None,
            "https://evil.example/v2/images/x": None,
        }
        for location, expected in cases.items():
            resp = requests.get(car.url + "/v2/echo", params={"location": location}, timeout=10)
            assert resp.headers["Location"] == (expected or location)


# -- Expect: 100-continue


def curl_upload(
    url: str, token: str, body: Path, *extra: str
) -> tuple[int, int, subprocess.CompletedProcess[str]]:
    """curl PUTs ``body`` with Expect: 100-continue: (status, bytes curl sent, the run)."""
    run = subprocess.run(
        ["curl", "-sv", "-o", "/dev/null", "-X", "PUT", "--data-binary", f"@{body}",
         "-H", f"X-Auth-Token: {token}", "-H", "Content-Type: application/octet-stream",
         "-H", "Expect: 100-continue", "-w", "%{http_code} %{size_upload}", *extra, url],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    status, sent = run.stdout.split()
    return int(status), int(float(sent)), run


def new_image(glance: Glance) -> str:
    body = {"name": "expect", "disk_format": "raw", "container_format": "bare"}
    return str(glance.api("POST", "/v2/images", json=body).json()["id"])


def test_expect_refused_by_glance_never_costs_the_body(
    glance: Glance, sidecar: Sidecar, tmp_path: Path
) -> None:
    image_id = new_image(glance)
    body = tmp_path / "image.raw"
    body.write_bytes(os.urandom(4 << 20))
    # curl waits up to 60 s for a 100: only one sent before Glance's answer would get the body out.
    status, sent, run = curl_upload(
        f"{sidecar.url}/v2/images/{image_id}/file", "not:a-token", body,
        "--expect100-timeout", "60",
    )  # fmt: skip
    assert status == 401, run.stderr
    assert sent == 0
    assert "< HTTP/1.1 100" not in run.stderr
    assert "< Connection: close" in run.stderr
    assert glance.api("GET", f"/v2/images/{image_id}").json()["status"] == "queued"


def test_expect_upload_completes_without_a_100_glance_never_sent(
    glance: Glance, sidecar: Sidecar, tmp_path: Path
) -> None:
    # uWSGI's http-socket never answers 100: curl sends the body after its own 1 s wait, and the
    # sidecar takes it on to Glance without having said 100 itself.
    image_id = new_image(glance)
    data = os.urandom(4 << 20)
    body = tmp_path / "image.raw"
    body.write_bytes(data)
    status, sent, run = curl_upload(f"{sidecar.url}/v2/images/{image_id}/file", ALICE, body)
    assert status == 204, run.stderr
    assert sent == len(data)
    assert "< HTTP/1.1 100" not in run.stderr
    assert "< Connection: close" not in run.stderr  # the body was all read: the connection lives
    record = glance.api("GET", f"/v2/images/{image_id}").json()
    assert record["status"] == "active"
    assert record["checksum"] == hashlib.md5(data).hexdigest()
    assert record["os_hash_value"] == hashlib.sha512(data).hexdigest()


def test_expect_relays_glances_100_and_only_then_reads_the_body(sidecar_factory) -> None:  # type: ignore[no-untyped-def]
    asked = threading.Event()
    go: dict[str, asyncio.Event] = {}

    def app() -> web.Application:
        async def expect(request: web.Request) -> None:
            asked.set()
            await go["event"].wait()
            await request.writer.write(CONTINUE)

        async def upload(request: web.Request) -> web.Response:
            data = await request.read()
            digest = hashlib.sha256(data).hexdigest()
            return web.json_response({"bytes": len(data), "sha256": digest}, status=201)

        async def startup(_: web.Application) -> None:
            go["event"] = asyncio.Event()

        application = web.Application()
        application.on_startup.append(startup)
        application.router.add_put("/v2/images/{id}/file", upload, expect_handler=expect)
        return application

    data = os.urandom(1 << 20)
    with Origin(app) as origin:
        sidecar = sidecar_factory(glance_url=origin.url).start()
        with socket.create_connection(("127.0.0.1", sidecar.port), timeout=30) as sock:
            sock.sendall(
                b"PUT /v2/images/x/file HTTP/1.1\r\nHost: s\r\nConnection: close\r\n"
                b"Content-Type: application/octet-stream\r\nExpect: 100-continue\r\n"
                b"Content-Length: %d\r\n\r\n" % len(data)
            )
            assert asked.wait(10), "the expectation never reached the origin"
            # Anything the sidecar had said before forwarding would be here by now (loopback).
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)
            sock.settimeout(30)
            origin.loop.call_soon_threadsafe(go["event"].set)
            assert read_exactly(sock, len(CONTINUE)) == CONTINUE
            sock.sendall(data)
            answer = read_all(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 201"), head
    assert json.loads(body) == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


# -- pools


class Held:
    """Streams the origin holds open, counted under one lock the test can wait on."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.now = self.peak = self.finished = 0

    def opened(self) -> None:
        with self.changed:
            self.now += 1
            self.peak = max(self.peak, self.now)
            self.changed.notify_all()

    def closed(self) -> None:
        with self.changed:
            self.now -= 1
            self.finished += 1
            self.changed.notify_all()


PIECE = 4096
SESSION = web.AppKey("session", aiohttp.ClientSession)


def holding_app(glance_url: str, held: Held, release: dict[str, asyncio.Event]) -> web.Application:
    """Image files whose second half waits for ``release``; everything else from real Glance."""

    async def file(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = 2 * PIECE
        await resp.prepare(request)
        await resp.write(b"a" * PIECE)
        held.opened()
        await release["event"].wait()
        await resp.write(b"b" * PIECE)
        held.closed()
        return resp

    async def forward(request: web.Request) -> web.Response:
        session = request.app[SESSION]
        headers = {"X-Auth-Token": request.headers.get("X-Auth-Token", "")}
        async with session.get(glance_url + request.path_qs, headers=headers) as up:
            return web.Response(
                status=up.status, body=await up.read(), content_type="application/json"
            )

    async def context(app: web.Application) -> AsyncIterator[None]:
        release["event"] = asyncio.Event()
        app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        yield
        await app[SESSION].close()

    app = web.Application()
    app.cleanup_ctx.append(context)
    app.router.add_get("/v2/images/{name}/file", file)
    app.router.add_get("/{tail:.*}", forward)
    return app


def test_metadata_calls_do_not_queue_behind_a_full_stream_pool(
    glance: Glance, sidecar_factory
) -> None:  # type: ignore[no-untyped-def]
    image = glance.create_image(64 << 10)
    held, release = Held(), {}
    streams = STREAM_POOL + 2
    with Origin(lambda: holding_app(glance.url, held, release)) as origin:
        sidecar = sidecar_factory(glance_url=origin.url).start()
        socks = []
        try:
            for i in range(streams):  # ids that are not UUIDs: passed through, not cached
                sock = socket.create_connection(("127.0.0.1", sidecar.port), timeout=60)
                sock.sendall(b"GET /v2/images/slow-%d/file HTTP/1.1\r\nHost: s\r\n"
                             b"Connection: close\r\n\r\n" % i)  # fmt: skip
                socks.append(sock)
            with held.changed:
                assert held.changed.wait_for(lambda: held.now == STREAM_POOL, 60), held.now

            listed = requests.get(
                sidecar.url + "/v2/images", headers={"X-Auth-Token": ALICE}, timeout=20
            )
            assert listed.status_code == 200
            assert image.id in [i["id"] for i in listed.json()["images"]]
            assert (held.now, held.finished) == (STREAM_POOL, 0)  # every stream still open
        finally:
            origin.loop.call_soon_threadsafe(release["event"].set)
            answers = [read_all(sock) for sock in socks]
            for sock in socks:
                sock.close()
    assert held.peak == STREAM_POOL  # the two beyond it waited for a connection, then went
    for answer in answers:
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        assert body == b"a" * PIECE + b"b" * PIECE


# -- as an attacker


SMUGGLES = {
    "cl-te": b"Content-Length: %(n)d\r\nTransfer-Encoding: chunked\r\n",
    "te-list": b"Transfer-Encoding: chunked, identity\r\n",
    "te-cl": b"Transfer-Encoding: chunked\r\nContent-Length: %(n)d\r\n",
    "two-cl": b"Content-Length: %(n)d\r\nContent-Length: 0\r\n",
    "plus-cl": b"Content-Length: +%(n)d\r\n",
    "te-junk": b"Transfer-Encoding: xchunked\r\n",
}


@pytest.mark.parametrize("framing", SMUGGLES)
def test_ambiguous_framing_is_refused_and_smuggles_nothing(
    glance: Glance, sidecar: Sidecar, framing: str
) -> None:
    marker = f"/smuggled-{uuid.uuid4().hex}"
    inner = b"0\r\n\r\nGET %s HTTP/1.1\r\nHost: g\r\n\r\n" % marker.encode()
    head = b"POST /v2/images HTTP/1.1\r\nHost: s\r\n" + SMUGGLES[framing] % {b"n": len(inner)}
    answer = exchange(sidecar.port, head + b"\r\n" + inner)
    assert answer.split(b"\r\n", 1)[0].split()[1] == b"400", answer[:200]
    assert answer.count(b"HTTP/1.") == 1
    assert requests.get(sidecar.url + "/versions", timeout=10).status_code == 200
    assert marker not in glance_log(glance)


def test_a_body_that_looks_like_a_request_stays_a_body(glance: Glance, sidecar: Sidecar) -> None:
    marker = f"/smuggled-{uuid.uuid4().hex}"
    inner = b"GET %s HTTP/1.1\r\nHost: g\r\n\r\n" % marker.encode()
    answer = exchange(
        sidecar.port,
        b"GET /versions HTTP/1.1\r\nHost: s\r\nContent-Length: %d\r\n\r\n" % len(inner)
        + inner
        + b"GET /versions HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n",
    )
    assert answer.count(b"HTTP/1.1 200 OK\r\n") == 2
    assert marker not in glance_log(glance)


def test_head_is_glances_answer_with_no_body(glance: Glance, sidecar: Sidecar) -> None:
    image = glance.create_image(64 << 10)
    port = urlsplit(glance.url).port
    assert port is not None
    token = [("X-Auth-Token", ALICE)]
    for path in ("/versions", "/v2/images", f"/v2/images/{image.id}/file"):
        direct = get(port, path, token, "HEAD")
        through = get(sidecar.port, path, token, "HEAD")
        assert through.status == direct.status < 500, path
        assert through.headers.get("Content-Length") == direct.headers.get("Content-Length")
    # One connection: a HEAD then a GET; any body after the HEAD would break the GET's answer.
    conn = http.client.HTTPConnection("127.0.0.1", sidecar.port, timeout=30)
    conn.request("HEAD", "/versions")
    assert conn.getresponse().read() == b""
    conn.request("GET", "/versions")
    assert json.loads(conn.getresponse().read())["versions"]
    conn.close()


def test_header_bytes_that_are_not_utf8_get_400_not_500(sidecar: Sidecar) -> None:
    answer = exchange(
        sidecar.port,
        b"GET /v2/images HTTP/1.1\r\nHost: s\r\nX-Name: caf\xe9\r\nConnection: close\r\n\r\n",
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), head
    assert json.loads(body)["error"]["code"] == 400


@pytest.mark.parametrize(
    "head",
    [b"HTTP/1.1 200 OK\r\nX-Name: caf\xe9\r\n", b"HTTP/1.1 200 Caf\xe9\r\n"],
    ids=["header", "reason"],
)
def test_an_answer_that_cannot_be_relayed_unchanged_is_502_not_500(
    sidecar_factory, head: bytes
) -> None:  # type: ignore[no-untyped-def]
    with socket.create_server(("127.0.0.1", 0)) as server:
        origin = f"http://127.0.0.1:{server.getsockname()[1]}"
        sidecar = sidecar_factory(glance_url=origin).start()

        def answer() -> None:
            conn, _ = server.accept()
            with conn:
                conn.recv(1 << 16)
                conn.sendall(head + b"Content-Length: 2\r\nConnection: close\r\n\r\nok")

        thread = threading.Thread(target=answer)
        thread.start()
        resp = requests.get(sidecar.url + "/v2/images", timeout=30)
        thread.join(10)
    assert resp.status_code == 502
    assert resp.json()["error"]["code"] == 502


def test_unreachable_glance_is_502_and_an_expecting_upload_keeps_its_body(
    sidecar_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    sidecar = sidecar_factory(glance_url=f"http://127.0.0.1:{free_port()}").start()
    resp = requests.get(sidecar.url + "/v2/images", timeout=30)
    assert resp.status_code == 502
    assert resp.json()["error"]["code"] == 502
    body = tmp_path / "image.raw"
    body.write_bytes(os.urandom(1 << 20))
    status, sent, run = curl_upload(
        f"{sidecar.url}/v2/images/{uuid.uuid4()}/file", ALICE, body, "--expect100-timeout", "60"
    )
    assert (status, sent) == (502, 0), run.stderr
