"""Bad input against the real Glance (issue 7): the sidecar answers as Glance does, or refuses.

Each hostile request is sent twice, the same bytes: to a sidecar and straight to the glance-api it
fronts, a Glance without its image cache, so that every answer of Glance's comes from its file
store. After each one these hold:

- the sidecar answered, and never with a 5xx of its own (a 5xx is only ever Glance's, relayed);
- a request Glance refuses (or cannot answer) gets no byte of the image from the sidecar;
- a request Glance grants gets the same bytes from the sidecar;
- the sidecar is the same process, still ready; once fills are over, no partial file is left and
  nothing in its log is an exception it did not handle.

Ranges are drawn by hypothesis (derandomized: the same examples every run); the other inputs are
lists, each case named after what it tries.
"""

from __future__ import annotations

import hashlib
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.support import rawhttp
from tests.support.clients import Caller, start, wait_for
from tests.support.glance import ALICE, ALICE_READER, BOB, Glance, Image
from tests.support.health import (
    assert_alive,
    assert_clean,
    image_files,
    pid,
    sockets,
    wait_below,
)
from tests.support.rawhttp import Answer, Header, leaked
from tests.support.sidecar import Sidecar
from tests.support.upstream import Fault, Upstream

TOKENS = (ALICE, ALICE, ALICE, BOB, ALICE_READER, None, "not-a-token")


class Target:
    """An image, without its bytes in every failure report (hypothesis prints dataclasses whole)."""

    def __init__(self, image: Image) -> None:
        self.id, self.data = image.id, image.data

    def __repr__(self) -> str:
        return f"Target({self.id}, {len(self.data)} bytes)"


@dataclass
class Bed:
    store: Glance  # answers from its file store: no image cache in its pipeline
    car: Sidecar  # in front of ``store``, its one tier
    pid: int
    images: list[Target]  # in the sidecar's L1: every download of them is a HIT

    @property
    def store_port(self) -> int:
        return int(self.store.url.rsplit(":", 1)[1])

    def path(self, image: Target) -> str:
        return f"/v2/images/{image.id}/file"


@pytest.fixture(scope="module")
def bed(glance: Glance, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    # ``glance`` (the session's) only makes sure the test bed is installed.
    store = Glance(tmp_path_factory.mktemp("glance-store"), flavor="fakeauth").start()
    car = Sidecar(tmp_path_factory.mktemp("adversarial"), store.url).start()
    try:
        images = [store.create_image(size) for size in (1, 4099, (1 << 20) + 3)]
        for image in images:
            assert car.get(image.id, ALICE).content == image.data
            hit = car.get(image.id, ALICE)
            assert hit.headers["X-Cachenode-Status"] == "HIT" and hit.content == image.data
            hit.close()
        yield Bed(store, car, pid(car), [Target(i) for i in images])
    finally:
        car.stop()
        store.stop()


def attack(
    bed: Bed, raw: bytes, image: Target, method: str = "GET"
) -> tuple[Answer | None, Answer]:
    """Send ``raw`` to Glance and to the sidecar; assert the invariants; both answers."""
    ref = rawhttp.exchange(bed.store_port, raw, method)
    via = rawhttp.exchange(bed.car.port, raw, method)
    if via is None:  # the sidecar may close without an answer only where Glance did
        assert ref is None, f"the sidecar closed the connection; Glance answered {ref.status}"
        assert_alive(bed.car, bed.pid)
        return ref, via  # type: ignore[return-value]
    if via.status >= 500:
        relayed = ref is not None and ref.status == via.status
        assert relayed and "X-Cachenode-Status" not in via.headers, (via.status, via.body[:300])
    granted = ref is not None and ref.ok
    if not granted:
        assert not via.ok, f"Glance refused ({ref and ref.status}), the sidecar sent {via.status}"
        assert not leaked(via.body, image.data), "image bytes in a refusal"
    elif via.ok and method != "HEAD":
        assert via.complete and via.body == ref.body
    assert_alive(bed.car, bed.pid)
    return ref, via


def with_token(token: str | None, *headers: Header) -> list[Header]:
    return ([("X-Auth-Token", token)] if token is not None else []) + list(headers)


# -- ranges


_NUMBERS = st.one_of(
    st.just(""),
    st.integers(0, 12).map(str),
    st.integers(0, 5000).map(str),
    st.integers(0, 10**30).map(str),
    st.sampled_from(["00007", "-1", "+1", "1.5", "0x10", " 1", "1 ", "\u0663", "\uff11", "\u00b2"]),
)
_UNITS = st.sampled_from(
    ["bytes", "BYTES", "Bytes", "bytes ", " bytes", "items", "byte", "bytes\t", "", "byte\u017f"]
)
_TAILS = st.sampled_from(["", "", "", ",", ", 5-9", ",-1", "junk", " ", ";", "\t", "-"])
_STRUCTURED = st.builds(
    "{}{}{}{}{}{}".format,
    _UNITS,
    st.sampled_from(["=", "=", " = ", "  =", ":", "==", ""]),
    _NUMBERS,
    st.sampled_from(["-", "-", " - ", "--", "", "\u2010"]),
    _NUMBERS,
    _TAILS,
)
# Any text a header may carry: no control characters other than tab (CR, LF and NUL make the
# request itself malformed; those are the encodings tests' business).
_TEXT = st.text(
    st.characters(blacklist_categories=("Cs", "Cc"), whitelist_characters="\t"), max_size=24
)
RANGES = st.one_of(_STRUCTURED, _STRUCTURED, _STRUCTURED, _TEXT)


@settings(
    max_examples=200,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    value=RANGES,
    which=st.integers(0, 2),
    token=st.sampled_from(TOKENS),
    latin1=st.booleans(),
)
# Non-ASCII digits and letters: Glance reads header bytes as latin-1, where neither is a digit
# nor an "s"; the sidecar must not read them as one either.
@example(value="bytes=\u0663-", which=1, token=ALICE, latin1=False)
@example(value="byte\u017f=0-0", which=1, token=ALICE, latin1=False)
@example(value="bytes=-", which=1, token=ALICE, latin1=False)  # webob's own parser raises
def test_a_range_on_a_hit_is_answered_as_glance_answers_it(
    bed: Bed, value: str, which: int, token: str | None, latin1: bool
) -> None:
    image = bed.images[which]
    encoded = value.encode("utf-8")
    if latin1 and all(ord(c) < 256 for c in value):
        encoded = value.encode("latin-1")  # the bytes Glance's server decodes as they are
    raw = rawhttp.request("GET", bed.path(image), with_token(token, ("Range", encoded)))
    ref, via = attack(bed, raw, image)
    # Glance's webob parser raises on a few malformed values (int('') for "bytes=-"): what it
    # means by them is "no such range", which is a 416.
    wanted = 416 if ref is None or ref.status >= 500 else ref.status
    assert via.status == wanted, f"Range {encoded!r}: Glance {ref and ref.status}, us {via.status}"
    if via.ok:
        assert ref is not None
        assert via.header("Content-Range") == ref.header("Content-Range")
        assert via.header("X-Cachenode-Status") == "HIT"
    if via.status == 416:
        assert via.header("Content-Range") == f"bytes */{len(image.data)}"


@pytest.mark.parametrize(
    "values",
    [
        pytest.param([b"bytes=0-0", b"bytes=5-9"], id="two-ranges"),
        pytest.param([b"bytes=0-0", b"bytes=0-0"], id="same-range-twice"),
        pytest.param([b"bytes=0-0", b""], id="range-then-empty"),
    ],
)
def test_repeated_range_headers_are_answered_as_glance_answers_them(
    bed: Bed, values: list[bytes]
) -> None:
    """Glance's server joins repeated headers with ", ": to Glance this is several ranges (400)."""
    image = bed.images[2]
    ranges = [("Range", value) for value in values]
    raw = rawhttp.request("GET", bed.path(image), with_token(ALICE, *ranges))
    ref, via = attack(bed, raw, image)
    assert ref is not None and via.status == ref.status == 400
    assert_clean(bed.car, bed.pid)


# -- ids, paths and methods

OTHER = "0123abcd-0000-4000-8000-000000000000"  # an id Glance does not know
IDS = [
    # (name, path given the image id; True: the sidecar must answer exactly Glance's status)
    ("uppercase", lambda i: f"/v2/images/{i.upper()}/file", True),
    ("trailing-newline", lambda i: f"/v2/images/{i}%0a/file", True),
    ("trailing-crlf", lambda i: f"/v2/images/{i}%0d%0a/file", True),
    ("trailing-space", lambda i: f"/v2/images/{i}%20/file", True),
    ("trailing-nul", lambda i: f"/v2/images/{i}%00/file", True),
    ("dot-dot-encoded", lambda i: f"/v2/images/%2e%2e/images/{i}/file", True),
    ("dot-dot", lambda i: f"/v2/images/{i}/../{i}/file", True),
    ("dot", lambda i: f"/v2/./images/{i}/file", True),
    ("slash-encoded", lambda i: f"/v2/images/{i}%2ffile", True),
    ("slash-in-id", lambda i: f"/v2/images/{OTHER}%2f..%2f{i}/file", True),
    ("dashes-encoded", lambda i: f"/v2/images/{i.replace('-', '%2d')}/file", True),
    ("file-encoded", lambda i: f"/v2/images/{i}/fil%65", True),
    ("semicolon", lambda i: f"/v2/images/{i};x/file", True),
    ("query", lambda i: f"/v2/images/{i}/file?x=1&id=..", True),
    ("trailing-slash", lambda i: f"/v2/images/{i}/file/", True),
    ("double-slash", lambda i: f"//v2/images/{i}/file", True),
    ("absolute-form", lambda i: f"http://127.0.0.1/v2/images/{i}/file", True),
    ("long-id", lambda i: f"/v2/images/{'a' * 300}/file", True),
    ("id-plus-5k", lambda i: f"/v2/images/{i}{'0' * 5000}/file", True),
    ("non-ascii-id", lambda i: "/v2/images/%C3%A9/file", True),
    # Longer than aiohttp's 8190-byte request line: the sidecar's own 400.
    ("id-9k", lambda i: f"/v2/images/{'a' * 9000}/file", False),
]


@pytest.mark.parametrize(("path", "exact"), [pytest.param(p, e, id=n) for n, p, e in IDS])
@pytest.mark.parametrize("token", [ALICE, BOB], ids=["alice", "bob"])
def test_odd_ids_and_paths_get_glances_answer(bed: Bed, path, exact: bool, token: str) -> None:  # type: ignore[no-untyped-def]
    image = bed.images[2]
    ref, via = attack(bed, rawhttp.request("GET", path(image.id), with_token(token)), image)
    if exact:
        assert ref is not None and via.status == ref.status
    else:
        assert via.status == 400
    assert_clean(bed.car, bed.pid)


@pytest.mark.parametrize("eol", ["%0a", "%0d", "%0d%0a"])
def test_a_path_cannot_forge_a_log_line(bed: Bed, eol: str) -> None:
    image = bed.images[2]
    forged = quote("2000-01-01 00:00:00,000 ERROR cachenode.fill: forged")
    seen = len(bed.car.log())
    for path in (f"/v2/images/{image.id}{eol}{forged}/file", f"/v2/{eol}{forged}/images"):
        attack(bed, rawhttp.request("GET", path, with_token(ALICE)), image)
    lines = bed.car.log()[seen:].replace("\r", "\n").splitlines()
    assert not [line for line in lines if line.startswith("2000-01-01")]
    assert_clean(bed.car, bed.pid)


@pytest.mark.parametrize(
    ("method", "exact"),
    [
        *((m, True) for m in ("HEAD", "POST", "DELETE", "OPTIONS", "PATCH", "TRACE", "PROPFIND")),
        ("PUT", True),  # no body and no Content-Type: Glance says 415
        ("get", False),  # methods are case-sensitive: the sidecar's HTTP parser refuses these
        ("FOO", False),
    ],
)
@pytest.mark.parametrize("token", [ALICE, BOB], ids=["alice", "bob"])
def test_other_methods_on_the_file_get_glances_answer(
    bed: Bed, method: str, exact: bool, token: str
) -> None:
    image = bed.images[2]
    raw = rawhttp.request(method, bed.path(image), with_token(token))
    ref, via = attack(bed, raw, image, method)
    if exact:
        assert ref is not None and via.status == ref.status, (method, ref and ref.body, via.body)
    else:
        assert via.status == 400
    assert_clean(bed.car, bed.pid)


# -- header sizes and encodings

PADDED = ALICE + "," * (8000 - len(ALICE))  # fakeauth ignores empty roles: still alice
SIZES = {
    "token-8000": [("X-Auth-Token", PADDED)],
    "token-8k": [("X-Auth-Token", ALICE + "," * (8192 - len(ALICE)))],
    "token-64k": [("X-Auth-Token", ALICE + "," * (65536 - len(ALICE)))],
    "bob-token-8000": [("X-Auth-Token", BOB + "," * (8000 - len(BOB)))],
    "junk-token-64k": [("X-Auth-Token", "x" * 65536)],
    "header-64k": [("X-Auth-Token", ALICE), ("Cookie", "c" * 65536)],
    "range-8000": [("X-Auth-Token", ALICE), ("Range", "bytes=" + "0" * 7990 + "-0")],
    "30-headers": [("X-Auth-Token", ALICE), *((f"X-Pad-{i}", "p") for i in range(30))],
    "100-headers": [("X-Auth-Token", ALICE), *((f"X-Pad-{i}", "p") for i in range(100))],
    "200-headers": [("X-Auth-Token", ALICE), *((f"X-Pad-{i}", "p") for i in range(200))],
    "bob-100-headers": [("X-Auth-Token", BOB), *((f"X-Pad-{i}", "p") for i in range(100))],
    "1000-tokens": [("X-Auth-Token", ALICE)] * 1000,
}


@pytest.mark.parametrize("name", list(SIZES))
def test_oversized_headers_never_cost_a_5xx_or_a_byte(bed: Bed, name: str) -> None:
    image = bed.images[2]
    attack(bed, rawhttp.request("GET", bed.path(image), SIZES[name]), image)
    assert_clean(bed.car, bed.pid)


A, B = ALICE.encode(), BOB.encode()
ENCODINGS: dict[str, bytes] = {
    # repeated credentials: Glance's server joins them into one value Keystone cannot read
    "token-twice": b"X-Auth-Token: " + A + b"\r\nX-Auth-Token: " + A,
    "token-then-bob": b"X-Auth-Token: " + A + b"\r\nX-Auth-Token: " + B,
    "token-then-empty": b"X-Auth-Token: " + A + b"\r\nX-Auth-Token: ",
    # WSGI servers map "_" and "-" to the same variable: one header to Glance, two to us
    "underscore-bob": b"X-Auth-Token: " + A + b"\r\nX_Auth_Token: " + B,
    "bob-underscore": b"X_Auth_Token: " + B + b"\r\nX-Auth-Token: " + A,
    "underscore-only": b"X_Auth_Token: " + A,
    "service-token-bob": b"X-Auth-Token: " + A + b"\r\nX-Service-Token: " + B,
    "lowercase-name": b"x-auth-token: " + A,
    "tabs": b"X-Auth-Token:\t" + A + b"\t",
    "latin1-alice": b"X-Auth-Token: " + A + b"\xe9",
    "latin1-bob": b"X-Auth-Token: " + B + b"\xe9",
    "utf8-alice": b"X-Auth-Token: " + A + "\u00e9".encode(),
    "nul-in-token": b"X-Auth-Token: " + A + b"\x00x",
    "obs-fold": b"X-Auth-Token: " + B + b"\r\n " + A,
    "space-before-colon": b"X-Auth-Token : " + A,
    "bare-lf": b"X-Auth-Token: " + A + b"\nX-Foo: 1",
    "bare-cr": b"X-Auth-Token: " + A + b"\rX-Foo: 1",
    "crlf-in-name": b"X-Auth\r\n-Token: " + A,
    "latin1-range": b"X-Auth-Token: " + A + b"\r\nRange: bytes=0-\xb9",
    "latin1-name": b"X-Auth-T\xf6ken: " + A,
    "del-in-value": b"X-Auth-Token: " + A + b"\x7f",
    "no-space": b"X-Auth-Token:" + A,
}


@pytest.mark.parametrize("name", list(ENCODINGS))
def test_odd_header_bytes_never_cost_a_5xx_or_a_byte(bed: Bed, name: str) -> None:
    image = bed.images[2]
    head = f"GET {bed.path(image)} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
    attack(bed, head.encode() + ENCODINGS[name] + b"\r\n\r\n", image)
    assert_clean(bed.car, bed.pid)


# -- slow and vanishing callers


def _slow_reader(port: int, path: str, token: str, reads: int, stop: threading.Event) -> int:
    """Ask for ``path`` with a tiny receive window and read one byte a second, ``reads`` times."""
    got = 0
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.sendall(rawhttp.request("GET", path, [("X-Auth-Token", token)]))
        for _ in range(reads):
            if stop.wait(1.0):
                break
            got += len(sock.recv(1))
    return got


def _slow_sender(port: int, raw: bytes, stop: threading.Event) -> None:
    """Send a request's header one byte a second (slowloris) until told to stop."""
    with socket.create_connection(("127.0.0.1", port)) as sock:
        for byte in raw[: len(raw) - 2]:
            if stop.wait(1.0):
                return
            sock.sendall(bytes([byte]))


def test_slow_callers_hold_nobody_up(glance: Glance, sidecar_factory) -> None:  # type: ignore[no-untyped-def]
    sidecar: Sidecar = sidecar_factory().start()
    process = pid(sidecar)
    warm, cold = glance.create_image(4 << 20), glance.create_image(4 << 20)
    assert sidecar.get(warm.id, ALICE).content == warm.data
    assert sidecar.get(warm.id, ALICE).headers["X-Cachenode-Status"] == "HIT"
    baseline = sockets(process)

    stop = threading.Event()
    hit_request = rawhttp.request("GET", f"/v2/images/{warm.id}/file", [("X-Auth-Token", ALICE)])
    slow = [
        threading.Thread(target=_slow_reader, args=(sidecar.port, path, ALICE, 5, stop))
        for path in (f"/v2/images/{warm.id}/file", *[f"/v2/images/{cold.id}/file"] * 2)
    ] + [
        threading.Thread(target=_slow_sender, args=(sidecar.port, hit_request, stop))
        for _ in range(5)
    ]
    for thread in slow:
        thread.start()
    try:
        # While the slow ones are connected (and one of them joined the cold image's fill):
        wait_for(lambda: sidecar.metric("cachenode_requests_total", status="miss") == 1)
        # (rawhttp, not requests: a requests response keeps its connection until collected)
        fast = rawhttp.get(sidecar.port, f"/v2/images/{cold.id}/file", [("X-Auth-Token", ALICE)])
        assert fast is not None and fast.status == 200 and fast.body == cold.data
        sidecar.settle()
        assert cold.id in [b.name for b in sidecar.blobs()]  # committed, slow reader or not
        hit = rawhttp.get(sidecar.port, f"/v2/images/{warm.id}/file", [("X-Auth-Token", ALICE)])
        assert hit is not None and hit.header("X-Cachenode-Status") == "HIT"
        assert hit.body == warm.data
    finally:
        stop.set()
        for thread in slow:
            thread.join(30)
    assert_clean(sidecar, process)
    assert wait_below(lambda: sockets(process), baseline) <= baseline
    assert image_files(sidecar, process) == []


def _vanish(port: int, path: str, token: str, after: int | None, reset: bool) -> int:
    """Ask for ``path`` and go away: before reading (``after`` None) or after ``after`` bytes,
    with a FIN or, ``reset``, an RST. Returns the bytes read."""
    got = 0
    sock = socket.create_connection(("127.0.0.1", port))
    try:
        sock.sendall(rawhttp.request("GET", path, [("X-Auth-Token", token)]))
        while after is not None and got < after:
            data = sock.recv(min(65536, after - got))
            if not data:
                break
            got += len(data)
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()
    return got


def test_vanishing_callers_leave_nothing_behind(glance: Glance, sidecar_factory) -> None:  # type: ignore[no-untyped-def]
    warm, cold, lonely = (glance.create_image(4 << 20) for _ in range(3))
    with Upstream(target=glance.url, faults=[Fault("throttle", rate=4 << 20, times=-1)]) as l2:
        sidecar: Sidecar = sidecar_factory(
            tiers=[{"name": "regional", "kind": "glance", "url": l2.url}]
        ).start()
        process = pid(sidecar)
        assert sidecar.get(warm.id, ALICE).content == warm.data
        baseline = sockets(process)
        path = f"/v2/images/{warm.id}/file"
        token_header = ("X-Auth-Token", ALICE)

        # On a hit: gone before the answer, after the status line, mid-body; FIN and RST.
        for after in (None, 1, 1 << 20):
            for reset in (False, True):
                _vanish(sidecar.port, path, ALICE, after, reset)
        half = rawhttp.request("GET", path, [("X-Auth-Token", ALICE)])[:40]
        with socket.create_connection(("127.0.0.1", sidecar.port)) as sock:
            sock.sendall(half)  # and never the rest

        # During a fill: callers leave at every stage while one stays to the end.
        stayer = Caller(f"{sidecar.url}/v2/images/{cold.id}/file", ALICE)
        thread = start(stayer)
        for after, reset in ((None, False), (1, True), (256 << 10, False), (1 << 20, True)):
            _vanish(sidecar.port, f"/v2/images/{cold.id}/file", ALICE, after, reset)
        thread.join(120)
        assert stayer.status == 200 and stayer.sha512 == cold.sha512

        # A fill every one of whose callers left: it finishes for the next one.
        _vanish(sidecar.port, f"/v2/images/{lonely.id}/file", ALICE, 64 << 10, True)
        sidecar.settle()
        for image in (warm, cold, lonely):
            again = rawhttp.get(sidecar.port, path.replace(warm.id, image.id), [token_header])
            assert again is not None and again.status == 200 and again.body == image.data
        assert sidecar.metric("cachenode_requests_total", status="error") == 0
        assert_clean(sidecar, process)
        assert wait_below(lambda: sockets(process), baseline) <= baseline
        assert image_files(sidecar, process) == []


def test_refused_callers_get_no_byte_however_they_ask(bed: Bed) -> None:
    """Every refused caller, on every image, plain and ranged: Glance's refusal, not a byte."""
    for image in bed.images:
        for token in (BOB, ALICE_READER, None, "not-a-token", ALICE + "x"):
            for extra in ([], [("Range", "bytes=0-")], [("Range", "bytes=-1")]):
                raw = rawhttp.request("GET", bed.path(image), with_token(token, *extra))
                ref, via = attack(bed, raw, image)
                assert ref is not None and not ref.ok and via.status == ref.status
    assert_clean(bed.car, bed.pid)


def test_pipelined_requests_are_each_authorized_on_their_own(bed: Bed) -> None:
    """Several requests on one connection, sent at once: each gets its own caller's answer."""
    image = bed.images[1]
    tokens = [ALICE, BOB, None, ALICE_READER, ALICE, "not-a-token", ALICE]
    path = bed.path(image)
    raws = [rawhttp.request("GET", path, with_token(t), connection="keep-alive") for t in tokens]
    refs = [rawhttp.get(bed.store_port, path, with_token(t)) for t in tokens]
    answers = rawhttp.pipeline(bed.car.port, raws)
    assert len(answers) == len(tokens)
    for token, ref, via in zip(tokens, refs, answers, strict=True):
        assert ref is not None and via.status == ref.status, token
        if via.ok:
            assert via.body == image.data and via.header("X-Cachenode-Status") == "HIT"
        else:
            assert not leaked(via.body, image.data)
    assert_clean(bed.car, bed.pid)


@pytest.mark.parametrize(
    "value", ["bytes 0-4/4099", "bytes 0-4/*", "bytes 4000-5000/*", "bytes */4099", "junk"]
)
@pytest.mark.parametrize("token", [ALICE, BOB], ids=["alice", "bob"])
def test_a_content_range_request_gets_glances_answer(bed: Bed, value: str, token: str) -> None:
    """Glance still honours the old ``Content-Range`` on a request; the sidecar passes it on."""
    image = bed.images[1]
    raw = rawhttp.request("GET", bed.path(image), with_token(token, ("Content-Range", value)))
    ref, via = attack(bed, raw, image)
    if ref is None:  # Glance fails on "bytes */SIZE" and closes: the caller sees just that
        assert via is None
    else:
        assert via.status == ref.status
        assert via.header("Content-Range") == ref.header("Content-Range")
    assert_clean(bed.car, bed.pid)


FILL_RANGES = [
    "bytes=0-99",
    "bytes=1000000-1000099",
    "bytes=-100",
    "bytes=4194303-",
    "bytes=0-",
    "bytes=4194304-",
    "bytes=5-2",
    "bytes=x",
    "bytes=2000000-9999999",
]


def test_ranges_during_a_fill_get_glances_answer(bed: Bed, sidecar_factory) -> None:  # type: ignore[no-untyped-def]
    image = Target(bed.store.create_image(4 << 20))
    throttle = Fault("throttle", rate=2 << 20, times=-1)
    with Upstream(target=bed.store.url, faults=[throttle]) as l2:
        car: Sidecar = sidecar_factory(
            "filling", glance_url=bed.store.url,
            tiers=[{"name": "regional", "kind": "glance", "url": l2.url}],
        ).start()  # fmt: skip
        whole = Caller(f"{car.url}/v2/images/{image.id}/file", ALICE)
        thread = start(whole)
        wait_for(lambda: l2.bytes_for(image.id) > 0)
        for value in FILL_RANGES:
            raw = rawhttp.request("GET", bed.path(image), with_token(ALICE, ("Range", value)))
            ref = rawhttp.exchange(bed.store_port, raw)
            via = rawhttp.exchange(car.port, raw)
            assert ref is not None and via is not None and via.status == ref.status, value
            if via.ok:
                assert via.body == ref.body and via.header("Content-Range") == ref.header(
                    "Content-Range"
                )
        thread.join(120)
        assert whole.status == 200 and whole.sha512 == hashlib.sha512(image.data).hexdigest()
        assert_clean(car, pid(car))
