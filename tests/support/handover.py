"""Whatever may answer at a handover path instead of a running sidecar (``cachenode.handover``)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from collections.abc import Callable
from pathlib import Path


class Impostor:
    """A unix socket at ``path`` that treats its first caller with ``act``, then reads what the
    caller answers (``answer``: b"" when it said nothing, having refused)."""

    def __init__(self, path: Path, act: Callable[[socket.socket], None]) -> None:
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.server.bind(str(path))
        self.server.listen()
        self.act = act
        self.answer = b""
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        conn, _ = self.server.accept()
        with conn, contextlib.suppress(OSError):  # a taker that refused may be gone already
            self.act(conn)
            conn.settimeout(5)
            self.answer = conn.recv(64)

    def close(self) -> None:
        self.thread.join(10)
        self.server.close()


def described(names: list[str]) -> bytes:
    """A well-formed version 1 description naming ``names``."""
    return json.dumps({"version": 1, "listeners": names}).encode()


def send(message: bytes, *socks: socket.socket | int) -> Callable[[socket.socket], None]:
    """An act: send ``message`` with the descriptors of ``socks``."""
    fds = [s if isinstance(s, int) else s.fileno() for s in socks]

    def act(conn: socket.socket) -> None:
        socket.send_fds(conn, [message], fds)

    return act
