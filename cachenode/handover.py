"""Listening sockets handed from the running sidecar to its successor, where no systemd holds them.

A DaemonSet has no socket unit: its rolling update (``maxSurge: 1``, ``maxUnavailable: 0``)
starts the new pod while the old one still serves. With ``handover.path`` set (a unix socket in a
directory both pods mount), the two processes pass the listening sockets between them, as Envoy's
hot restart and HAProxy's ``expose-fd listeners`` do:

1. The running sidecar (the giver) listens on ``handover.path``, mode 0600.
2. A new sidecar (the taker) connects to it before anything else. The giver checks the peer
   (``SO_PEERCRED``: its own uid, else it closes) and sends its listening sockets in one message
   (``SCM_RIGHTS``) with a versioned description: ``{"version": 1, "listeners": ["admin.listen",
   "listen"]}``, one name per descriptor, in order.
3. The taker checks the giver's uid as well, then each socket exactly as it checks systemd's
   (``activation.adopt``: TCP, listening, bound to the configured address of the listener it is
   named for) and answers ``{"taken": true}``.
4. The giver then stops accepting: it closes its own descriptors, never shuts the sockets down,
   so the connections queued in them wait for the taker (both descriptors name one kernel
   socket). Its streams in flight finish (the graceful stop), it closes its cache and idles until
   its SIGTERM: a container that exits is restarted by the kubelet (``restartPolicy: Always`` is
   the only one a DaemonSet allows), and the restarted process would take the sockets back.
5. The taker waits for the cache (below), starts accepting, and offers the sockets in its turn.

**Anything wrong with the handover is no handover** (no file, a stale file, a peer of another
uid, no answer within 2 s, a message that is not the description, is longer than 1 KiB, carries
descriptors that are no listening TCP sockets at the configured addresses): one log line, every
received descriptor closed, and the taker binds the listeners itself, as without a handover.
Unlike a wrong socket from systemd (the operator's units disagree with the config: the start
stops), what comes over the handover socket is another process's word, and binding is always a
safe answer: if a real sidecar still listens, the bind fails (the start stops with one line,
exit 1) while that sidecar keeps serving; if nobody does, binding is right.

**One cache directory, one process at a time.** Both pods mount the same cache. Two processes on
it would corrupt it: each start reconciles the catalog with the blobs and sweeps ``partial/``,
discarding the other's fills in progress. So with a handover path set, the cache is locked
(``flock`` on ``<cache.dir>/lock``, released by the kernel however the holder ends) and the taker
opens it only once the giver has drained and closed it (``lock_cache``); meanwhile new
connections wait in the sockets' backlog (1024), as during a restart under systemd. The cost is
that wait (the drain: 15 s at most); the alternative, the taker serving from the cache while the
giver still fills into it, would need the two to share one catalog and one set of fills.

**A taker waits for the cache as long as it takes**, saying so every ``LOCK_WAIT``, and never
gives up by itself. The giver closed its descriptors when it handed over: the taker holds the
only ones, so a taker that gave up would reset every caller queued in the backlog, and the
process restarted in its place (the kubelet, systemd) would bind fresh sockets and wait for the
same lock again: callers lost, nothing gained. Waiting keeps them, and serves them the instant
the giver lets go. How long is too long is the orchestrator's to say, where the operator sets it
(the DaemonSet's liveness probe on the admin port, which nobody answers meanwhile); its SIGTERM
ends the wait at once, closing the sockets (``Sidecar._lock_cache``).

Each handover is counted by role and outcome (``cachenode_handovers_total``, ``metrics``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

from cachenode import activation
from cachenode.errors import ConfigError, StoreError
from cachenode.metrics import Metrics

log = logging.getLogger(__name__)

VERSION = 1
TIMEOUT = 2.0  # for the whole exchange, on either side: a handover never holds a start up longer
MAX_MESSAGE = 1024  # a description is about 60 bytes
LOCK_WAIT = 60.0  # the giver's drain (15 s) and stop, with room to spare: then said again
TAKEN = b'{"taken": true}'
SOURCE = "the running sidecar"  # who passed a socket, in errors


class Refused(Exception):
    """The handover is not one: why, in one line."""


def describe(sockets: Mapping[str, socket.socket]) -> tuple[bytes, list[int]]:
    """The message that hands ``sockets`` (config key to socket) over, and its descriptors."""
    keys = sorted(sockets)
    body = {"version": VERSION, "listeners": keys}
    return json.dumps(body).encode(), [sockets[k].fileno() for k in keys]


def listener_names(message: bytes, count: int, flags: int) -> list[str]:
    """The listener named for each of the ``count`` descriptors that came with ``message``."""
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        raise Refused(f"a message longer than {MAX_MESSAGE} bytes or with too many descriptors")
    try:
        body = json.loads(message)
    except (ValueError, RecursionError):  # UnicodeDecodeError too; "[[[[..." nested past the limit
        raise Refused("a message that is not JSON") from None
    if not isinstance(body, dict) or body.get("version") != VERSION:
        raise Refused(f"a message that is no version {VERSION} description")
    names = body.get("listeners")
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise Refused("a description without a list of listeners")
    if len(names) != count or len(set(names)) != count:
        raise Refused(f"{len(names)} listeners named for {count} descriptors")
    return names


def take(
    path: Path, wanted: Mapping[str, tuple[str, int]], metrics: Metrics, uid: int | None = None
) -> dict[str, socket.socket]:
    """The listening sockets of the sidecar serving at ``path``, by config key (blocking, at most
    TIMEOUT). Empty, after one log line, when there is none or what answers is not one."""
    outcome, taken = _take(path, wanted, os.getuid() if uid is None else uid)
    metrics.handovers.labels("taker", outcome).inc()
    return taken


def _take(
    path: Path, wanted: Mapping[str, tuple[str, int]], uid: int
) -> tuple[str, dict[str, socket.socket]]:
    """``take``, and its outcome for the metric: taken, refused or none."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
            conn.settimeout(TIMEOUT)
            conn.connect(str(path))
            _check_peer(conn, uid)
            message, fds, flags, _ = socket.recv_fds(
                conn, MAX_MESSAGE, len(wanted), socket.MSG_CMSG_CLOEXEC
            )
            try:
                names = listener_names(message, len(fds), flags)
                taken = activation.adopt(fds, wanted, SOURCE)  # closes fds on ConfigError
            except Refused:
                _close(fds)
                raise
            try:
                if [k for fd in fds for k, s in taken.items() if s.fileno() == fd] != names:
                    raise Refused("sockets named for listeners at other addresses")
                conn.sendall(TAKEN)
            except (Refused, OSError):
                for s in taken.values():
                    s.close()
                raise
    except (FileNotFoundError, ConnectionRefusedError):
        log.info("no running sidecar at %s to take the listeners from: binding them", path)
        return "none", {}
    except (Refused, ConfigError, OSError) as exc:
        log.warning("handover at %s refused (%s): binding the listeners", path, _why(exc))
        return "refused", {}
    log.info("took the listening sockets of the running sidecar: %s", " ".join(sorted(taken)))
    return "taken", taken


class Giver:
    """Offers this process's listening sockets at ``path`` to the next sidecar; ``given`` is
    called once one took them (this process must then stop accepting)."""

    def __init__(
        self,
        path: Path,
        sockets: Mapping[str, socket.socket],
        given: Callable[[], None],
        metrics: Metrics,
    ) -> None:
        self.path = path
        self.sockets = dict(sockets)
        self.given = given
        self.metrics = metrics
        self._server: socket.socket | None = None
        self._inode = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Offer the sockets at ``path``. A path where this process cannot listen costs only the
        next handover (that restart refuses connections until the next process binds, as
        without one): never the start, which may hold sockets taken from the previous process."""
        try:
            self._server = await asyncio.to_thread(self._bind)
        except OSError as exc:
            log.error("cannot offer the listening sockets at %s: %s", self.path, _why(exc))
            return
        self._task = asyncio.create_task(self._serve(self._server), name="handover")

    def _bind(self) -> socket.socket:
        """Listen at ``path``, replacing a file left there: this process holds the listening
        sockets and the cache, so whoever left it no longer serves."""
        server = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.path.unlink(missing_ok=True)
            server.bind(str(self.path))
            os.chmod(self.path, 0o600)  # the peer check is SO_PEERCRED; this is the first gate
            server.listen(1)
            server.setblocking(False)
            self._inode = os.stat(self.path).st_ino
        except OSError:
            server.close()
            raise
        return server

    async def _serve(self, server: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _ = await loop.sock_accept(server)
            except OSError as exc:  # out of descriptors, say: the next caller may fare better
                log.warning("handover at %s: accept failed: %s", self.path, _why(exc))
                await asyncio.sleep(1.0)
                continue
            given = await asyncio.to_thread(self._give, conn)
            self.metrics.handovers.labels("giver", "given" if given else "refused").inc()
            if given:
                server.close()  # no second taker; the file is the taker's to replace
                self._server = None
                self.given()
                return

    def _give(self, conn: socket.socket) -> bool:
        """Hand the sockets to ``conn``; whether it took them (blocking, at most TIMEOUT)."""
        with conn:
            try:
                conn.settimeout(TIMEOUT)
                _check_peer(conn, os.getuid())
                message, fds = describe(self.sockets)
                socket.send_fds(conn, [message], fds)
                answer = conn.recv(len(TAKEN) + 1)
            except (Refused, OSError) as exc:
                log.warning("handover at %s: not given (%s)", self.path, _why(exc))
                return False
        if answer != TAKEN:
            log.warning("handover at %s: the new sidecar did not take the sockets", self.path)
            return False
        log.info("handed the listening sockets over: no longer accepting, draining")
        return True

    async def close(self) -> None:
        """Stop offering; remove the file if it is still this process's."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(OSError):
                if os.stat(self.path).st_ino == self._inode:
                    self.path.unlink()


async def lock_cache(
    cache_dir: Path,
    remind: float = LOCK_WAIT,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> int:
    """Hold ``<cache_dir>/lock`` (its descriptor; closing it lets go), waiting for the process that
    holds it (a sidecar that handed its sockets over, draining) as long as it takes: one line
    when the wait begins, one more each ``remind`` seconds (why never longer: the module's
    docstring). Cancelled, it lets go of what it opened."""
    fd = await asyncio.to_thread(_open_lock, cache_dir / "lock")
    try:
        began = clock()
        said = 0  # reminders logged
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                pass
            waited = clock() - began
            if said == 0:
                log.info("waiting for the previous sidecar to close %s", cache_dir)
                said = 1
            elif waited >= said * remind:
                log.warning(
                    "still waiting for the previous sidecar to close %s after %.0fs; "
                    "holding the listening sockets, new connections wait in their backlog",
                    cache_dir,
                    waited,
                )
                said += 1
            await sleep(0.05)
    except BaseException:
        os.close(fd)
        raise


def _open_lock(lock: Path) -> int:
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        return os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StoreError(f"cannot open {lock}: {exc.strerror}") from exc


def _check_peer(conn: socket.socket, uid: int) -> None:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, peer_uid, _ = struct.unpack("3i", creds)
    if peer_uid != uid:
        raise Refused(f"peer pid {pid} runs as uid {peer_uid}, not {uid}")


def _close(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _why(exc: Exception) -> str:
    if isinstance(exc, TimeoutError):
        return f"no answer within {TIMEOUT:.0f}s"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)
