"""HTTP/1.1 by hand: requests whose bytes no client library would send, and what came back.

``exchange`` writes the request bytes as given (duplicate headers, latin-1 or UTF-8 values, odd
line ends, paths no URL parser would keep) on a fresh connection and reads the answer with the
standard library's response parser. ``None`` means the server closed the connection without
answering, which is itself an answer some servers give (uWSGI to a header it cannot parse).
"""

from __future__ import annotations

import contextlib
import http.client
import socket
from dataclasses import dataclass

Header = tuple[bytes | str, bytes | str]


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes
    complete: bool  # False: the body ended before its Content-Length (the connection was cut)

    def header(self, name: str) -> str | None:
        return self.headers.get(name)

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


def request(
    method: str, path: bytes | str, headers: list[Header], connection: str = "close"
) -> bytes:
    """The bytes of one request; ``Connection: close`` so that the server ends the exchange."""
    lines = [_b(method) + b" " + _b(path) + b" HTTP/1.1", b"Host: 127.0.0.1"]
    lines.append(b"Connection: " + _b(connection))
    lines += [_b(name) + b": " + _b(value) for name, value in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def exchange(port: int, raw: bytes, method: str = "GET", timeout: float = 60) -> Answer | None:
    """Send ``raw`` to 127.0.0.1:``port`` and read the answer (the whole body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        # The server may answer, and close, before it read everything we sent.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(raw)
        resp = http.client.HTTPResponse(sock, method=method)
        try:
            resp.begin()
        except (http.client.RemoteDisconnected, ConnectionResetError, http.client.BadStatusLine):
            return None
        try:
            body, complete = resp.read(), True
        except http.client.IncompleteRead as exc:
            body, complete = exc.partial, False
        except ConnectionResetError:
            body, complete = b"", False
        finally:
            resp.close()
        return Answer(resp.status, resp.headers, body, complete)


def pipeline(port: int, raws: list[bytes], timeout: float = 60) -> list[Answer]:
    """Send every request at once on one keep-alive connection; the answers, in order.

    Each answer must carry a Content-Length (the sidecar's own do); reading stops at the first
    that the server did not send (it may close after a refusal).
    """
    answers = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(b"".join(raws))
        stream = sock.makefile("rb")
        for _ in raws:
            status_line = stream.readline()
            if not status_line:
                break
            status = int(status_line.split(b" ", 2)[1])
            headers = http.client.parse_headers(stream)
            length = int(headers["Content-Length"])
            body = stream.read(length)
            answers.append(Answer(status, headers, body, len(body) == length))
    return answers


def get(port: int, path: str, headers: list[Header], method: str = "GET") -> Answer | None:
    return exchange(port, request(method, path, headers), method)


def leaked(body: bytes, data: bytes, block: int = 16) -> bool:
    """Whether ``body`` carries any run of ``data`` long enough to contain one aligned block.

    Image data is random: an aligned 16-byte block of it inside an error document can only be
    there because the image's bytes were sent.
    """
    if len(body) < block:
        return False
    windows = {body[i : i + block] for i in range(len(body) - block + 1)}
    return any(data[i : i + block] in windows for i in range(0, len(data) - block + 1, block))


def _b(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode("latin-1")
