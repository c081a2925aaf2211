"""The probe's decision (``judge_probe``): a grant only on an answer that is provably Glance's.

The answers below are the ones Glance 33 gives (seen on the test bed, file and Swift stores) and
the ones a front proxy gives on its own (nginx's pages, a redirect, a maintenance page).
"""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from cachenode.authz import (
    EMPTY_IMAGE,
    NO_RANDOM_ACCESS,
    PROBE_BODY_LIMIT,
    ProbeAnswer,
    Verdict,
    judge_probe,
)

GRANTED, NO_DATA, REFUSED = Verdict.GRANTED, Verdict.GRANTED_NO_DATA, Verdict.REFUSED
UNDECIDED, FAILED = Verdict.UNDECIDED, Verdict.FAILED
REQ_ID = ("x-openstack-request-id", "req-0b6f6f0e-6f43-4d0c-9a53-3b7d1c1f2a10")
OCTETS = ("Content-Type", "application/octet-stream")
HTML = ("Content-Type", "text/html; charset=UTF-8")


def webob_page(status: str, sentence: bytes) -> bytes:
    """An error page as webob renders Glance's exceptions for ``Accept: */*``."""
    return (
        b"<html>\n <head>\n  <title>" + status.encode() + b"</title>\n </head>\n <body>\n  <h1>"
        + status.encode() + b"</h1>\n  " + sentence + b"<br /><br />\n\n\n\n </body>\n</html>"
    )  # fmt: skip


def nginx_page(title: str, h1: str) -> bytes:
    return (
        f"<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n<center><h1>{h1}</h1>"
        "</center>\r\n<hr><center>nginx/1.22.1</center>\r\n</body>\r\n</html>\r\n"
    ).encode()


def answer(status: int, *headers: tuple[str, str], body: bytes | None = b"") -> ProbeAnswer:
    return ProbeAnswer(status, CIMultiDict(headers), body)


ONE_BYTE = (OCTETS, ("Content-Range", "bytes 0-0/1000"), ("Content-Length", "1"), REQ_ID)
NGINX = ("Server", "nginx/1.22.1")

CASES: list[tuple[str, ProbeAnswer, int | None, Verdict]] = [
    # -- Glance granting
    ("206 of byte 0", answer(206, *ONE_BYTE, body=b"\xf7"), None, GRANTED),
    ("206, record size matches", answer(206, *ONE_BYTE, body=b"\xf7"), 1000, GRANTED),
    ("206 via a proxy that drops the request id",
     answer(206, OCTETS, ("Content-Range", "bytes 0-0/1000"), body=b"x"), None, GRANTED),
    ("400 of a store without random access (Swift)",
     answer(400, HTML, REQ_ID, body=webob_page("400 Bad Request", NO_RANDOM_ACCESS)), None,
     GRANTED),
    ("the same 400 in JSON (Accept: application/json)",
     answer(400, ("Content-Type", "application/json"), REQ_ID,
            body=b'{"message": "' + NO_RANDOM_ACCESS + b'<br /><br />\\n\\n\\n", '
                 b'"code": "400 Bad Request", "title": "Bad Request"}'), None, GRANTED),
    ("200 of the whole image, as the record says",
     answer(200, OCTETS, ("Content-Length", "1000"), REQ_ID, body=None), 1000, GRANTED),
    ("204: the image has no data", answer(204, REQ_ID), None, NO_DATA),
    ("416 of an empty image",
     answer(416, HTML, REQ_ID, body=webob_page("416 Request Range Not Satisfiable", EMPTY_IMAGE)),
     None, NO_DATA),
    # -- Glance refusing
    ("401 of the identity middleware", answer(401, HTML, body=webob_page("401 Unauthorized",
     b"fakeauth: invalid or revoked token")), None, REFUSED),
    ("401 of keystonemiddleware",
     answer(401, ("Content-Type", "application/json"),
            ("WWW-Authenticate", 'Keystone uri="https://keystone.example/v3"'),
            body=b'{"error": {"code": 401, "title": "Unauthorized"}}'), None, REFUSED),
    ("403 of Glance", answer(403, HTML, REQ_ID, body=webob_page("403 Forbidden",
     b"You are not authorized to complete download_image action.")), None, REFUSED),
    ("404 of Glance", answer(404, HTML, REQ_ID, body=webob_page("404 Not Found",
     b"No image found with ID 89e8952c")), None, REFUSED),
    ("404 of Glance, too long to relay", answer(404, HTML, REQ_ID, body=None), None, UNDECIDED),
    ("401, too long to relay", answer(401, HTML, body=None), None, UNDECIDED),
    # -- a front proxy answering on its own
    ("nginx: header too large", answer(400, HTML, NGINX, body=nginx_page(
     "400 Request Header Or Cookie Too Large", "400 Bad Request")), None, UNDECIDED),
    ("nginx: 400 with Glance's sentence but no request id", answer(400, HTML, NGINX,
     body=webob_page("400 Bad Request", NO_RANDOM_ACCESS)), None, UNDECIDED),
    ("400 of Glance, another sentence (several ranges)", answer(400, HTML, REQ_ID,
     body=webob_page("400 Bad Request", b"Requests with multiple ranges are not supported")),
     None, UNDECIDED),
    ("400 of Glance, body not read (too long)", answer(400, HTML, REQ_ID, body=None), None,
     UNDECIDED),
    ("413", answer(413, HTML, NGINX, body=nginx_page("413 Request Entity Too Large",
     "413 Request Entity Too Large")), None, UNDECIDED),
    ("414", answer(414, HTML, NGINX, body=nginx_page("414 Request-URI Too Large",
     "414 Request-URI Too Large")), None, UNDECIDED),
    ("431", answer(431, HTML, body=b"Request Header Fields Too Large"), None, UNDECIDED),
    ("429", answer(429, HTML, body=b"slow down"), None, UNDECIDED),
    ("nginx 403 (an ACL)", answer(403, HTML, NGINX, body=nginx_page("403 Forbidden",
     "403 Forbidden")), None, UNDECIDED),
    ("nginx 404 (no route)", answer(404, HTML, NGINX, body=nginx_page("404 Not Found",
     "404 Not Found")), None, UNDECIDED),
    ("401 of the proxy's own Basic authentication",
     answer(401, HTML, NGINX, ("WWW-Authenticate", 'Basic realm="glance"'),
            body=nginx_page("401 Authorization Required", "401 Authorization Required")), None,
     UNDECIDED),
    ("302 with a Location", answer(302, HTML, NGINX,
     ("Location", "http://elsewhere.example/v2/images/x/file"),
     body=nginx_page("302 Found", "302 Found")), None, UNDECIDED),
    ("302 of Glance itself", answer(302, REQ_ID, ("Location", "http://elsewhere.example/")),
     None, UNDECIDED),
    ("301", answer(301, ("Location", "https://glance.example/")), None, UNDECIDED),
    ("307", answer(307, ("Location", "https://glance.example/")), None, UNDECIDED),
    ("304", answer(304, REQ_ID), None, UNDECIDED),
    ("200 HTML maintenance page", answer(200, ("Content-Type", "text/html"), NGINX,
     body=b"<html><body><h1>Down for maintenance</h1></body></html>\n"), 1000, UNDECIDED),
    ("200 octets of a length other than the record's",
     answer(200, OCTETS, ("Content-Length", "999"), REQ_ID, body=None), 1000, UNDECIDED),
    ("200 octets, the record's size unknown",
     answer(200, OCTETS, ("Content-Length", "1000"), REQ_ID, body=None), None, UNDECIDED),
    ("200 octets without a length (Glance's cache streaming a miss)",
     answer(200, OCTETS, REQ_ID, body=None), 1000, UNDECIDED),
    ("200 octets without Glance's request id",
     answer(200, OCTETS, ("Content-Length", "1000"), body=None), 1000, UNDECIDED),
    ("204 of a proxy", answer(204, NGINX), None, UNDECIDED),
    ("416 of a proxy", answer(416, HTML, NGINX, ("Content-Range", "bytes */1000"),
     body=nginx_page("416 Requested Range Not Satisfiable", "416")), None, UNDECIDED),
    ("416 of Glance for a non-empty image", answer(416, HTML, REQ_ID, body=webob_page(
     "416 Request Range Not Satisfiable", b"Invalid Range header.")), None, UNDECIDED),
    # -- a 206 of the wrong shape
    ("206 of another range", answer(206, OCTETS, ("Content-Range", "bytes 1-1/1000"), REQ_ID,
     body=b"x"), None, UNDECIDED),
    ("206 of two bytes", answer(206, OCTETS, ("Content-Range", "bytes 0-1/1000"),
     ("Content-Length", "2"), REQ_ID, body=b"xy"), None, UNDECIDED),
    ("206 claiming one byte, sending two", answer(206, *ONE_BYTE, body=b"xy"), None, UNDECIDED),
    ("206 with Content-Length 2", answer(206, OCTETS, ("Content-Range", "bytes 0-0/1000"),
     ("Content-Length", "2"), body=b"x"), None, UNDECIDED),
    ("206 of an image of another size", answer(206, *ONE_BYTE, body=b"x"), 999, UNDECIDED),
    ("206 of unknown total", answer(206, OCTETS, ("Content-Range", "bytes 0-0/*"), body=b"x"),
     None, UNDECIDED),
    ("206 of total 0", answer(206, OCTETS, ("Content-Range", "bytes 0-0/0"), body=b"x"), None,
     UNDECIDED),
    ("206 with two Content-Range headers",
     answer(206, OCTETS, ("Content-Range", "bytes 0-0/1000"), ("Content-Range", "bytes 0-0/9"),
            body=b"x"), None, UNDECIDED),
    ("206 multipart/byteranges", answer(206, ("Content-Type", "multipart/byteranges; boundary=x"),
     body=b"--x\r\n"), None, UNDECIDED),
    ("206 HTML", answer(206, HTML, ("Content-Range", "bytes 0-0/1000"), body=b"<"), None,
     UNDECIDED),
    ("206 with trailing text in Content-Range", answer(206, OCTETS,
     ("Content-Range", "bytes 0-0/1000 junk"), body=b"x"), None, UNDECIDED),
    ("206 body not read", answer(206, *ONE_BYTE, body=None), None, UNDECIDED),
    ("201", answer(201, REQ_ID), None, UNDECIDED),
    ("405", answer(405, REQ_ID), None, UNDECIDED),
    # -- failing
    ("nginx 502 (Glance dropped the connection)", answer(502, HTML, NGINX,
     body=nginx_page("502 Bad Gateway", "502 Bad Gateway")), None, FAILED),
    ("nginx 503 maintenance", answer(503, HTML, NGINX, body=b"maintenance"), None, FAILED),
    ("504", answer(504, HTML, NGINX), None, FAILED),
    ("500 of Glance", answer(500, HTML, REQ_ID, body=b"oops"), None, FAILED),
]  # fmt: skip


@pytest.mark.parametrize(("answer", "size", "verdict"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])  # fmt: skip
def test_verdict(answer: ProbeAnswer, size: int | None, verdict: Verdict) -> None:
    assert judge_probe(answer, size) is verdict


def test_the_sentences_are_glances_own() -> None:
    # What Glance 33 sent on the test bed, word for word (tests/integration check it live).
    assert NO_RANDOM_ACCESS.endswith(b"Offset: 0, length: 1")
    assert EMPTY_IMAGE.endswith(b"[0, -1].")
    assert len(webob_page("400 Bad Request", NO_RANDOM_ACCESS)) < PROBE_BODY_LIMIT


def test_a_repeated_request_id_is_not_glances() -> None:
    page = webob_page("404 Not Found", b"No image found")
    twice = answer(404, HTML, REQ_ID, REQ_ID, body=page)
    assert judge_probe(twice) is UNDECIDED
    assert judge_probe(answer(404, HTML, ("x-openstack-request-id", "abc"), body=page)) is UNDECIDED
