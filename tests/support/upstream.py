"""An upstream of our own, for faults real services will not produce on demand.

``Upstream`` is an HTTP server on 127.0.0.1 that either serves images itself (``blobs``: the
``http`` tier kind, honouring Range) or forwards to a real glance-api (``target``: a ``glance``
tier whose bytes we can break). Either way it counts what it was asked and what it sent, and
applies ``Fault``s to the bytes at absolute image offsets: flip a byte, end early, reset, stall,
throttle, hold.

A ``hold`` makes timing a test's decision instead of a race: the upstream sends the bytes before
``at``, waits until the peer's kernel has acknowledged every one of them (``reached`` is then set),
and sends nothing more until the test calls ``release()``. A test can so make sure a caller has its
headers and first bytes before a bad byte goes out, or that the sidecar holds exactly ``at`` bytes
when a connection breaks (a reset otherwise loses what was still in flight).

It runs its own event loop in a thread, so synchronous tests can use it as a plain object.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import re
import socket
import struct
import termios
import threading
import time
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass
class Fault:
    # flip | truncate | reset | stall | throttle | hold | no_range (200 to a Range) | deny (403)
    kind: str
    at: int = 0  # image offset where it strikes
    times: int = 1  # how often it strikes (at its offset; throttle: per response); -1: always
    seconds: float = 60.0  # stall length; hold: the longest it waits for release()
    rate: float = 0.0  # throttle: bytes per second
    # hold: set once every byte before `at` is acknowledged by the peer / once the test lets go
    reached: threading.Event = field(default_factory=threading.Event, repr=False)
    released: threading.Event = field(default_factory=threading.Event, repr=False)

    def release(self) -> Fault:
        """Let a hold go on (before it is reached: it only waits for the bytes to be delivered)."""
        self.released.set()
        return self


@dataclass
class Served:
    method: str
    path: str
    range: str | None
    status: int = 0
    bytes: int = 0
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None  # when the last byte went out (None: cut or still sending)
    origin_headers: dict[str, str] = field(default_factory=dict)  # what the target answered


@dataclass
class Upstream:
    blobs: dict[str, bytes] = field(default_factory=dict)
    target: str | None = None
    faults: list[Fault] = field(default_factory=list)
    chunk: int = 64 * 1024

    def __post_init__(self) -> None:
        self.log: list[Served] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, daemon=True, name="upstream")
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self._sock = sock
        self.url = f"http://127.0.0.1:{self.port}"

    # -- what the tests read
    def requests_for(self, image_id: str) -> list[Served]:
        with self._lock:
            return [s for s in self.log if image_id in s.path]

    def bytes_for(self, image_id: str) -> int:
        return sum(s.bytes for s in self.requests_for(image_id))

    # -- life cycle
    def __enter__(self) -> Upstream:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        for fault in self.faults:
            fault.release()  # a test that failed mid-hold must not leave a thread waiting
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # Handlers still stalling when a test ends are cut after a second, not waited for.
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        site = web.SockSite(runner, self._sock)
        await site.start()
        self._session = aiohttp.ClientSession(auto_decompress=False)
        self._ready.set()
        await self._stop.wait()
        await self._session.close()
        await runner.cleanup()

    # -- serving
    async def _handle(self, request: web.Request) -> web.StreamResponse:
        served = Served(request.method, request.path, request.headers.get("Range"))
        with self._lock:
            self.log.append(served)
        if any(f.kind == "deny" and self._strike(f) for f in self._live()):
            served.status = 403
            return web.Response(status=403, text="denied")
        if self.target is not None:
            return await self._forward(request, served)
        image_id = request.path.rstrip("/").rsplit("/", 1)[-1]
        blob = self.blobs.get(image_id)
        if blob is None:
            served.status = 404
            return web.Response(status=404, text="no such image")
        start, end, status = 0, len(blob), 200
        ignore_range = any(f.kind == "no_range" and self._strike(f) for f in self._live())
        if served.range and not ignore_range:
            m = _RANGE.match(served.range)
            if not m or int(m.group(1)) >= len(blob):
                served.status = 416
                return web.Response(status=416, headers={"Content-Range": f"bytes */{len(blob)}"})
            start = int(m.group(1))
            end = min(len(blob), int(m.group(2)) + 1) if m.group(2) else len(blob)
            status = 206
        resp = web.StreamResponse(status=status)
        resp.content_length = end - start
        resp.headers["Accept-Ranges"] = "bytes"
        if status == 206:
            resp.headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(blob)}"
        served.status = status
        await resp.prepare(request)
        await self._send(request, resp, served, _chunks(blob, start, end, self.chunk), start)
        return resp

    async def _forward(self, request: web.Request, served: Served) -> web.StreamResponse:
        headers = {
            k: v for k, v in request.headers.items() if k.lower() not in ("host", "connection")
        }
        async with self._session.request(
            request.method, self.target + request.path_qs, headers=headers
        ) as up:
            served.origin_headers = dict(up.headers)
            resp = web.StreamResponse(status=up.status)
            for name in ("Content-Type", "Content-MD5", "Content-Range", "Content-Length"):
                if name in up.headers:
                    resp.headers[name] = up.headers[name]
            served.status = up.status
            start = 0
            if m := re.match(r"bytes (\d+)-", up.headers.get("Content-Range", "")):
                start = int(m.group(1))
            await resp.prepare(request)
            await self._send(request, resp, served, up.content.iter_any(), start)
            return resp

    async def _send(self, request, resp, served, chunks, offset) -> None:  # type: ignore[no-untyped-def]
        # The sidecar may hang up (it had what it needed, or gave up): nothing to do then.
        with contextlib.suppress(ConnectionError):
            await self._faulty(request, resp, served, chunks, offset)

    async def _faulty(self, request, resp, served, chunks, offset) -> None:  # type: ignore[no-untyped-def]
        faults = [f for f in self._live() if f.kind != "throttle" or self._strike(f)]
        async for data in chunks:
            for fault in faults:
                lo, hi = offset, offset + len(data)
                if fault.kind == "throttle":
                    await asyncio.sleep(len(data) / fault.rate)
                elif not lo <= fault.at < hi or not self._strike(fault):
                    continue
                elif fault.kind == "flip":
                    buf = bytearray(data)
                    buf[fault.at - lo] ^= 0xFF
                    data = bytes(buf)
                elif fault.kind in ("truncate", "reset", "stall", "hold"):
                    head = data[: fault.at - lo]
                    if head:
                        await resp.write(head)
                        served.bytes += len(head)
                        offset += len(head)
                        data = data[len(head) :]
                    if fault.kind == "truncate":
                        request.transport.close()
                        return
                    if fault.kind == "reset":
                        _reset(request.transport)
                        return
                    if fault.kind == "stall":
                        await asyncio.sleep(fault.seconds)
                        continue
                    await _delivered(request.transport)
                    fault.reached.set()
                    await _until(fault.released, fault.seconds)
            await resp.write(data)
            served.bytes += len(data)
            offset += len(data)
        await resp.write_eof()
        served.finished = time.monotonic()

    def _live(self) -> list[Fault]:
        with self._lock:
            return [f for f in self.faults if f.times != 0]

    def _strike(self, fault: Fault) -> bool:
        """Spend one of the fault's ``times``; False when none is left."""
        with self._lock:
            if fault.times == 0:
                return False
            if fault.times > 0:
                fault.times -= 1
            return True


async def _chunks(blob: bytes, start: int, end: int, size: int):  # type: ignore[no-untyped-def]
    for i in range(start, end, size):
        yield blob[i : min(end, i + size)]


async def _delivered(transport: asyncio.Transport) -> None:
    """Wait until every byte written so far has left our buffers and the peer acknowledged it."""
    sock = transport.get_extra_info("socket")
    unsent = array.array("i", [0])
    while not transport.is_closing():
        if transport.get_write_buffer_size() == 0:
            if sock is None:
                return
            fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, unsent)  # unacknowledged bytes
            if unsent[0] == 0:
                return
        await asyncio.sleep(0.002)


async def _until(event: threading.Event, seconds: float) -> None:
    """Wait, without blocking the loop, until ``event`` is set or ``seconds`` have passed."""
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, event.wait, seconds)


def _reset(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # SO_LINGER 0: close() sends RST instead of FIN.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()
