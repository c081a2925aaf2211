"""The pass-through's decisions, without a socket: which headers go on, which URLs are Glance's,
what a version document becomes, when a document counts as whole."""

from __future__ import annotations

import asyncio
import json
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp.base_protocol import BaseProtocol
from multidict import CIMultiDict

from cachenode.proxy import end_to_end, read_up_to, rewrite_document, under


def test_end_to_end_keeps_every_value_in_order() -> None:
    headers = CIMultiDict(
        [("X-A", "1"), ("Set-Cookie", "a=1"), ("x-a", "2"), ("Set-Cookie", "b=2"), ("X-A", "3")]
    )
    out = end_to_end(headers)
    assert out.getall("X-A") == ["1", "2", "3"]
    assert out.getall("Set-Cookie") == ["a=1", "b=2"]
    assert list(out.items()) == list(headers.items())


def test_end_to_end_drops_the_hop_by_hop_set() -> None:
    hop = ["Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE",
           "Trailer", "Transfer-Encoding", "Upgrade", "Proxy-Connection"]  # fmt: skip
    headers = CIMultiDict([(name, "x") for name in hop] + [("X-Kept", "yes")])
    assert list(end_to_end(headers).items()) == [("X-Kept", "yes")]


def test_end_to_end_drops_what_connection_names_in_any_case_and_any_connection_line() -> None:
    headers = CIMultiDict(
        [
            ("Connection", "close, X-Foo"),
            ("connection", " x-bar ,keep-alive"),
            ("X-FOO", "1"),
            ("X-Bar", "2"),
            ("X-Auth-Token", "t"),
            ("X-Foo-Bar", "kept: a longer name"),
        ]
    )
    assert list(end_to_end(headers).items()) == [
        ("X-Auth-Token", "t"),
        ("X-Foo-Bar", "kept: a longer name"),
    ]


BASE = urlsplit("http://glance.example:9292")


@pytest.mark.parametrize(
    ("url", "tail"),
    [
        ("http://glance.example:9292/v2/images/x", "/v2/images/x"),
        ("http://GLANCE.example:9292/v2/images/x?a=1#f", "/v2/images/x?a=1#f"),
        ("HTTP://glance.example:9292", "/"),
        ("http://glance.example:92921/v2/", None),  # another port that starts alike
        ("http://glance.example:9292.evil.example/v2/", None),
        ("http://glance.example.evil.example:9292/v2/", None),
        ("http://glance.example:9292@evil.example/v2/", None),
        ("http://user@glance.example:9292/v2/", None),
        ("https://glance.example:9292/v2/", None),
        ("http://glance.example/v2/", None),  # port 80 is not 9292
        ("http://glance.example:99999/v2/", None),  # not a port at all
        ("/v2/images/x", None),  # relative: nothing to rewrite
        ("http://evil.example/http://glance.example:9292/v2/", None),
    ],
)
def test_under_is_true_only_for_glances_own_url(url: str, tail: str | None) -> None:
    assert under(url, BASE) == tail


def test_under_respects_a_path_prefix_and_default_ports() -> None:
    base = urlsplit("https://cloud.example/image/")
    assert under("https://cloud.example:443/image/v2/x", base) == "/v2/x"
    assert under("https://cloud.example/image", base) == "/"
    assert under("https://cloud.example/imagery/v2/x", base) is None
    assert under("https://cloud.example/v2/x", base) is None


def test_rewrite_document_moves_absolute_hrefs_only() -> None:
    doc = {
        "versions": [
            {
                "id": "v2.18",
                "status": "CURRENT",
                "links": [
                    {"rel": "self", "href": "http://glance.internal:9292/v2/?x=1"},
                    {"rel": "describedby", "href": "/relative"},
                ],
                "note": "http://glance.internal:9292/not-a-link",
            }
        ]
    }
    out = json.loads(rewrite_document(json.dumps(doc).encode(), "http://127.0.0.1:9393"))
    links = out["versions"][0]["links"]
    assert links == [
        {"rel": "self", "href": "http://127.0.0.1:9393/v2/?x=1"},
        {"rel": "describedby", "href": "/relative"},
    ]
    assert out["versions"][0]["note"] == doc["versions"][0]["note"]


@pytest.mark.parametrize("raw", [b"<html>not json</html>", b'{"versions": [', b"\xff\xfe"])
def test_rewrite_document_leaves_other_bodies_as_they_are(raw: bytes) -> None:
    assert rewrite_document(raw, "http://127.0.0.1:9393") == raw


def read(pieces: list[bytes], limit: int) -> tuple[bytes, bool]:
    """read_up_to over a real aiohttp StreamReader fed ``pieces`` one event-loop turn apart."""

    async def run() -> tuple[bytes, bool]:
        loop = asyncio.get_running_loop()
        protocol = BaseProtocol(loop)
        protocol.connection_made(asyncio.Transport())  # connected; nothing is ever written
        reader = aiohttp.StreamReader(protocol, 2**16, loop=loop)

        async def feed() -> None:
            for piece in pieces:
                reader.feed_data(piece)
                await asyncio.sleep(0)
            reader.feed_eof()

        feeding = asyncio.create_task(feed())
        try:
            return await read_up_to(reader, limit)
        finally:
            await feeding

    return asyncio.run(run())


def test_read_up_to_reads_a_document_whole_however_many_pieces() -> None:
    doc = json.dumps({"versions": [{"id": f"v2.{i}"} for i in range(50)]}).encode()
    pieces = [doc[i : i + 1] for i in range(len(doc))]
    assert read(pieces, 64 << 10) == (doc, True)
    assert read(pieces, len(doc)) == (doc, True)  # exactly the bound is still whole


def test_read_up_to_stops_past_the_bound() -> None:
    body, whole = read([b"x" * 100] * 5, 250)
    assert not whole
    assert body == b"x" * 300  # what was read is kept, to be passed on unchanged
