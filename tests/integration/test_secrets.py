"""No secret is written anywhere, and no request forges a log line (issue 7, item 7).

One sidecar handles every kind of credential at once, each made distinctive: callers' tokens (one
allowed, one of another project, one that may only read the record, one malformed, an
X-Service-Token), the service token, the admin token (and a wrong one presented to it), the Swift
tier's TempURL key and its token file (a bogus token first, rotated to a real one). It goes through
a representative run: pass-through calls (list, create, upload), a miss, a hit, joined callers,
refusals on a hit and on a miss, a failover, an integrity failure, the admin API and the CLI.
Afterwards every secret, in every form it could be written in (as is, %-encoded, base64, hex), is
looked for in everything the sidecar wrote or answered: every file under its directory (the log
with its access lines, blobs, partial files, the catalog's SQLite files), /metrics, the admin API's
answers and the CLI's output.

The access log writes the raw path, so an image id that carries an encoded CR or LF, or a path
of thousands of them, leaves exactly one line per request.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import re
import secrets
import subprocess
import sys
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support.clients import Caller, start, wait_for
from tests.support.glance import ALICE, Glance
from tests.support.sidecar import Sidecar
from tests.support.swift import Swift
from tests.support.upstream import Fault, Upstream

_TAG = secrets.token_hex(6)
READER = f"tok3nAl1ce{_TAG}:projA:reader,member"  # may download projA's images
SECOND = f"tok3nAl1son{_TAG}:projA:reader,member"
FOREIGN = f"tok3nMall0ry{_TAG}:projZ:reader,member"  # another project: Glance says 404
RECORD_ONLY = f"tok3nR3cord{_TAG}:projA:reader"  # may read the record, not the bytes: 403
MALFORMED = f"tok3nBr0ken{_TAG}"  # not user:project:roles: 401
CALLER_SERVICE = f"svcH3ader{_TAG}"  # a caller's X-Service-Token
SERVICE = f"s3rv1ce{_TAG}:admin:admin,reader,member"  # service_auth.token_file
ADMIN_TOKEN = f"adm1nT0ken{_TAG}"
WRONG_ADMIN = f"wr0ngAdm1n{_TAG}"
TEMPURL_KEY = f"t3mpUrlK3y{_TAG}"
BOGUS_SWIFT_TOKEN = f"AUTH_tkB0gus{_TAG}"
# A log record starts with its time stamp (cachenode.cli.serve); anything else is a forged line.
RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ [\w.]+: ")


@dataclass
class Run:
    """The sidecar under test, its fault-injecting regional link, and what it answered."""

    sidecar: Sidecar
    front: Upstream
    glance: Glance
    swift_token_file: Path
    answers: list[str] = field(default_factory=list)  # admin API bodies, CLI output, /metrics

    def download(self, image_id: str, token: str | None, **headers: str) -> requests.Response:
        return self.sidecar.get(image_id, None, headers=_auth(token) | headers)

    def admin(self, method: str, path: str, token: str = ADMIN_TOKEN, **kw: Any) -> int:
        resp = requests.request(
            method, f"{self.sidecar.admin_url}/admin/v1{path}", timeout=120,
            headers={"Authorization": f"Bearer {token}"}, **kw,
        )  # fmt: skip
        self.answers.append(resp.text)
        return resp.status_code

    def cli(self, *args: str) -> int:
        done = subprocess.run(
            [sys.executable, "-m", "cachenode", *args, "-c", str(self.sidecar.config_path)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        self.answers += [done.stdout, done.stderr]
        return done.returncode


def _auth(token: str | None) -> dict[str, str]:
    return {"X-Auth-Token": token} if token else {}


def test_no_secret_is_written_or_answered(
    glance_swift: Glance, swift: Swift, tmp_path: Path, sidecar_factory
) -> None:  # type: ignore[no-untyped-def]
    keys = tmp_path / "secrets"
    keys.mkdir()
    files = {"admin": ADMIN_TOKEN, "service": SERVICE, "tempurl": TEMPURL_KEY,
             "swift": BOGUS_SWIFT_TOKEN}  # fmt: skip
    for name, value in files.items():
        (keys / name).write_text(value + "\n")
    account = {"X-Auth-Token": swift.token()}
    # The second account key: the session's temp_url_key fixture keeps the first one.
    requests.post(swift.storage_url, headers={**account, "X-Account-Meta-Temp-URL-Key-2":
                  TEMPURL_KEY}, timeout=10).raise_for_status()  # fmt: skip
    try:
        with Upstream(target=glance_swift.url) as front:
            sidecar = sidecar_factory(
                glance_url=glance_swift.url, log_level="debug",
                authz={"ttl": "60s"},  # decisions are kept, by token digest
                admin={"token_file": str(keys / "admin")},
                service_auth={"token_file": str(keys / "service")},
                tiers=[
                    {"name": "regional", "kind": "glance", "url": front.url, "read_timeout": "2s"},
                    {"name": "swifttoken", "kind": "swift", "url": swift.storage_url,
                     "token_file": str(keys / "swift")},
                    {"name": "swiftkey", "kind": "swift", "url": swift.storage_url,
                     "temp_url_key_file": str(keys / "tempurl"), "parallel": 2,
                     "chunk_size": "1MiB"},
                ],
            ).start()  # fmt: skip
            run = Run(sidecar, front, glance_swift, keys / "swift")
            _exercise(run, swift)
            run.answers.append(requests.get(sidecar.admin_url + "/metrics", timeout=10).text)
            assert sidecar.stop() == 0
        found = _leaks(sidecar, run.answers, swift_token=swift.token())
        assert found == [], "secrets written or answered:\n" + "\n".join(found)
    finally:
        requests.post(swift.storage_url, timeout=10, headers={
            **account, "X-Remove-Account-Meta-Temp-URL-Key-2": "x"})  # fmt: skip


def _exercise(run: Run, swift: Swift) -> None:
    """Every path that handles a credential, each checked for the answer it must give."""
    image = _passthrough(run)
    _miss_hit_and_refusals(run, image)
    _joined(run)
    _failover(run)
    _integrity_failure(run, swift)
    _operated(run, image)


def _passthrough(run: Run) -> str:
    """List, create and upload through the sidecar; returns the uploaded image's id."""
    base = run.sidecar.url
    listed = requests.get(f"{base}/v2/images", headers=_auth(READER), timeout=30)
    assert listed.status_code == 200 and "images" in listed.json()
    created = requests.post(f"{base}/v2/images", timeout=30, headers=_auth(READER), json={
        "name": "secrets", "disk_format": "raw", "container_format": "bare"})  # fmt: skip
    assert created.status_code == 201
    image_id = str(created.json()["id"])
    data = _data(2 << 20, image_id)
    uploaded = requests.put(f"{base}/v2/images/{image_id}/file", data=data, timeout=60, headers={
        **_auth(READER), "X-Service-Token": CALLER_SERVICE,
        "Content-Type": "application/octet-stream"})  # fmt: skip
    assert uploaded.status_code == 204
    return image_id


def _miss_hit_and_refusals(run: Run, image_id: str) -> None:
    data = _data(2 << 20, image_id)
    cold = run.glance.create_image(1 << 20, token=READER)
    refusals = {FOREIGN: 404, RECORD_ONLY: 403, MALFORMED: 401, None: 401}
    for token, status in refusals.items():  # on a miss: no fill, no byte
        refused = run.download(cold.id, token)
        assert refused.status_code == status and cold.data[:64] not in refused.content
    miss = run.download(image_id, READER, **{"X-Service-Token": CALLER_SERVICE})
    assert miss.headers["X-Cachenode-Status"] == "MISS" and miss.content == data
    hit = run.download(image_id, READER)
    assert hit.headers["X-Cachenode-Status"] == "HIT" and hit.content == data
    for token, status in refusals.items():  # on a hit (a 404 asks Glance with the service token)
        refused = run.download(image_id, token)
        assert refused.status_code == status and data[:64] not in refused.content
    assert [b.name for b in run.sidecar.blobs()] == [image_id]


def _joined(run: Run) -> None:
    image = run.glance.create_image(4 << 20, token=READER)
    hold = Fault("hold", at=1 << 20)
    run.front.faults[:] = [hold]
    url = f"{run.sidecar.url}/v2/images/{image.id}/file"
    callers = [Caller(url, READER), Caller(url, SECOND),
               Caller(url, SECOND, {"X-Service-Token": CALLER_SERVICE})]  # fmt: skip
    joined_before = run.sidecar.metric("cachenode_requests_total", status="joined")
    threads = [start(c) for c in callers]
    wait_for(lambda: run.sidecar.metric("cachenode_requests_total", status="joined")
             == joined_before + 2)  # fmt: skip
    hold.release()
    for thread in threads:
        thread.join(60)
    assert [(c.status, c.sha512) for c in callers] == [(200, image.sha512)] * 3
    run.sidecar.settle()


def _failover(run: Run) -> None:
    """The regional link resets mid-body; the bogus Swift token is refused; the key signs."""
    image = run.glance.create_image(3 << 20, token=READER)
    at = (1 << 20) + 123
    run.front.faults[:] = [Fault("hold", at=at).release(), Fault("reset", at=at)]
    served = run.download(image.id, READER)
    assert served.status_code == 200 and served.content == image.data
    metric = run.sidecar.metric
    assert metric("cachenode_tier_failures_total", tier="regional", kind="short_read") == 1
    assert metric("cachenode_tier_failures_total", tier="swifttoken", kind="denied") == 1
    assert metric("cachenode_upstream_bytes_total", tier="swiftkey") == len(image.data) - at


def _integrity_failure(run: Run, swift: Swift) -> None:
    """A flipped byte cuts the caller; the next attempt reads Swift with the rotated token."""
    image = run.glance.create_image(2 << 20, token=READER)
    hold = Fault("hold", at=512 << 10)
    run.front.faults[:] = [Fault("flip", at=1000, times=-1), hold]
    caller = Caller(f"{run.sidecar.url}/v2/images/{image.id}/file", READER)
    misses = run.sidecar.metric("cachenode_requests_total", status="miss")
    thread = start(caller)
    wait_for(lambda: run.sidecar.metric("cachenode_requests_total", status="miss") > misses)
    hold.release()
    thread.join(60)
    assert caller.status == 200 and caller.error is not None
    assert caller.received < len(image.data)
    run.sidecar.settle()
    assert run.sidecar.metric("cachenode_integrity_failures_total", tier="regional") == 1
    run.front.faults[:] = []
    run.swift_token_file.write_text(swift.token() + "\n")  # rotated: no restart
    again = run.download(image.id, READER)
    assert again.content == image.data and again.headers["X-Cachenode-Tier"] == "swifttoken"


def _operated(run: Run, image_id: str) -> None:
    """The admin API (with the token, a wrong one, none) and the CLI."""
    warmed = run.glance.create_image(1 << 20, token=READER)
    assert run.admin("GET", "/images", token=WRONG_ADMIN) == 401
    assert run.admin("GET", "/stats", token="") == 401
    assert run.admin("GET", "/images") == 200
    assert run.admin("GET", f"/images/{image_id}") == 200
    assert run.admin("GET", "/stats") == 200
    assert run.admin("PUT", f"/images/{image_id}/pin") == 200
    assert run.admin("DELETE", f"/images/{image_id}/pin") == 200
    assert run.admin("POST", f"/images/{warmed.id}/warm") == 202  # a fill as the service
    run.sidecar.settle()
    assert run.admin("POST", "/verify") == 200
    assert run.admin("POST", "/evict", json={"ids": [warmed.id]}) == 200
    assert run.cli("warm", warmed.id) == 0
    for command in (("ls", "--json"), ("stats",), ("pin", image_id), ("unpin", image_id),
                    ("verify",), ("evict", warmed.id)):  # fmt: skip
        assert run.cli(*command) == 0, command


def _data(size: int, seed: str) -> bytes:
    """Bytes of an image, the same each time they are asked for."""
    out = bytearray()
    block = seed.encode()
    while len(out) < size:
        block = hashlib.sha512(block).digest()
        out += block
    return bytes(out[:size])


# -- looking for the secrets


def _secrets(swift_token: str) -> dict[str, str]:
    return {
        "reader token": READER, "second token": SECOND, "foreign token": FOREIGN,
        "record-only token": RECORD_ONLY, "malformed token": MALFORMED,
        "caller's service token": CALLER_SERVICE, "service token": SERVICE,
        "admin token": ADMIN_TOKEN, "wrong admin token": WRONG_ADMIN,
        "TempURL key": TEMPURL_KEY, "bogus Swift token": BOGUS_SWIFT_TOKEN,
        "Swift token": swift_token,
    }  # fmt: skip


def forms(secret: str) -> dict[str, bytes]:
    """The ways a secret could be written: as is, %-encoded, base64 (at any alignment), hex.

    A token's distinctive part (before its first ``:``) is looked for on its own too, so that a
    token cut short or written in pieces is found as well.
    """
    raw = secret.encode()
    out = {"as is": raw, "%-encoded": urllib.parse.quote(secret, safe="").encode(),
           "form-encoded": urllib.parse.quote_plus(secret).encode(),
           "hex": raw.hex().encode(), "HEX": raw.hex().upper().encode()}  # fmt: skip
    core = secret.split(":", 1)[0].encode()
    if core != raw:
        out["distinctive part"] = core
    for pad in range(3):
        encoded = base64.b64encode(b"\0" * pad + raw)
        # Only the characters made of the secret's bits alone, whatever surrounds it.
        first, last = -(-8 * pad // 6), 8 * (pad + len(raw)) // 6
        out[f"base64/{pad}"] = encoded[first:last]
        out[f"base64url/{pad}"] = encoded[first:last].translate(bytes.maketrans(b"+/", b"-_"))
    return out


def _leaks(sidecar: Sidecar, answers: list[str], swift_token: str) -> list[str]:
    """Where any form of any secret appears: files under the sidecar's directory, answers."""
    places = {str(p.relative_to(sidecar.workdir)): p.read_bytes()
              for p in sorted(sidecar.workdir.rglob("*")) if p.is_file()}  # fmt: skip
    assert any(name.startswith("cache/") and name.endswith(".db") for name in places), places
    places.update({f"answer {i}": text.encode() for i, text in enumerate(answers)})
    return [f"{found} in {where}" for where, content in places.items()
            for found in _found_in(content, swift_token)]  # fmt: skip


def _found_in(content: bytes, swift_token: str) -> list[str]:
    """Each secret, and the form it is in, that ``content`` holds (with some context)."""
    found = []
    for what, secret in _secrets(swift_token).items():
        for form, needle in forms(secret).items():
            if (at := content.find(needle)) >= 0:
                context = content[max(0, at - 80) : at + len(needle) + 40]
                found.append(f"{what} ({form}): {context!r}")
    if b"temp_url_sig" in content:
        found.append("a signed URL")
    return found


@pytest.mark.parametrize(
    "encode",
    [bytes, urllib.parse.quote_from_bytes, urllib.parse.quote_plus, base64.b64encode,
     base64.urlsafe_b64encode, bytes.hex, lambda b: b.hex().upper()],
    ids=["raw", "quote", "quote_plus", "base64", "base64url", "hex", "HEX"],
)  # fmt: skip
def test_the_search_finds_a_secret_however_it_is_written(encode) -> None:  # type: ignore[no-untyped-def]
    """The search can fail: a secret written in any of these forms, at any alignment, is found."""
    for secret in (READER, SERVICE, TEMPURL_KEY, "AUTH_tk0123456789abcdef"):
        for prefix in (b"X-Auth-Token: ", b"X-Auth-Token:  ", b"X-Auth-Token:   "):
            written = encode(prefix + secret.encode() + b"\r\n")
            written = written.encode() if isinstance(written, str) else written
            assert _found_in(b"<" + written + b">", "AUTH_tk0123456789abcdef"), (secret, prefix)
    assert _found_in(b"GET /x?temp_url_sig=0f&temp_url_expires=1", "unused")
    assert not _found_in(b"tok3nAl1ce tok3nAl1cf " + _TAG.encode()[:-1], "unused")


# -- the access log


FORGERIES = [
    "/v2/images/{id}%0a/file",  # a valid id, then a newline: must not pass for the id
    "/v2/images/{id}%0d/file",
    "/v2/images/{id}%0d%0a2026-01-01%2000:00:00,000%20INFO%20cachenode.access:%20FORGED/file",
    "/v2/images/x%0aFORGED%0dFORGED%0d%0aFORGED/file",
    "/v2/images/" + "%0a%0dFORGED" * 600 + "/file",  # over 8000 bytes of them
]


def test_a_path_cannot_forge_a_log_line(glance: Glance, sidecar_factory) -> None:  # type: ignore[no-untyped-def]
    sidecar = sidecar_factory().start()
    image = glance.create_image(1 << 10)
    for template in FORGERIES:
        path = template.format(id=image.id)
        before = len(_lines(sidecar))
        status = _get(sidecar, path)
        assert status == _glance_status(glance, path) >= 400, path  # passed to Glance as is
        wait_for(lambda n=before: _accessed(sidecar, n))  # type: ignore[misc]
        added = _lines(sidecar)[before:]
        assert len(added) == 1, (path, added)  # one request, one line
        assert RECORD.match(added[0]) and f" {path} " in added[0], added
        assert not any(p.name.startswith(image.id) for p in sidecar.cache_dir.rglob("*"))
    assert _get(sidecar, f"/v2/images/{image.id}/file") == 200  # and a real download: one line
    wait_for(lambda: f"GET /v2/images/{image.id}/file 200 MISS" in sidecar.log())
    assert all(RECORD.match(line) for line in _lines(sidecar)), "a line that is no record"


def _accessed(sidecar: Sidecar, before: int) -> bool:
    """Whether an access line came after the first ``before`` lines (it follows the answer)."""
    return any(" cachenode.access: " in line for line in _lines(sidecar)[before:])


def _lines(sidecar: Sidecar) -> list[str]:
    """The log's lines, split wherever a viewer would start a new one (LF, CR or both)."""
    return [line for line in re.split(r"\r\n|\r|\n", sidecar.log()) if line]


def _get(sidecar: Sidecar, path: str) -> int:
    return _status("127.0.0.1", sidecar.port, path)


def _glance_status(glance: Glance, path: str) -> int:
    host, port = glance.url.removeprefix("http://").rsplit(":", 1)
    return _status(host, int(port), path)


def _status(host: str, port: int, path: str) -> int:
    """GET ``path`` exactly as written (no client normalising its escapes); the status."""
    conn = http.client.HTTPConnection(host, port, timeout=60)
    try:
        conn.request("GET", path, headers={"X-Auth-Token": ALICE})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()
