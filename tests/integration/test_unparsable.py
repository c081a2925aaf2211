"""A request aiohttp cannot parse: a 400, and its bytes (a token, perhaps) never logged."""

from __future__ import annotations

import socket

from tests.support.sidecar import Sidecar


def raw_request(sidecar: Sidecar, head: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", sidecar.port), timeout=10) as sock:
        sock.sendall(head)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def test_an_unparsable_token_is_refused_and_never_written_to_the_log(sidecar: Sidecar) -> None:
    secret = b"s3cr3t-Tok3n-7c1d9e"
    path = b"/v2/images/0b7e7e6e-1d3a-4c55-9a2f-6f0d2b7c1a11/file"
    for bad in (b"\x01", b"\x7f", b"\x00"):
        head = b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nX-Auth-Token: " + secret + bad
        answer = raw_request(sidecar, head + b"\r\nConnection: close\r\n\r\n")
        assert answer.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request")
    log = sidecar.log()
    assert secret.decode() not in log
    assert log.count("unparsable request refused") == 3
    assert "Traceback" not in log
