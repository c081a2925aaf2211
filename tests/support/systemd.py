"""Playing systemd's part in socket activation, for restarts that must refuse no connection.

``Sockets`` opens the listening sockets the way a ``.socket`` unit does and holds them across
every start of the service. Each start runs this file as a tiny wrapper in front of the real
command: it moves the inherited descriptors to 3, 4, ..., sets ``LISTEN_FDS``, ``LISTEN_FDNAMES``
and ``LISTEN_PID`` to its own pid, then execs the command, which so keeps that pid (what
systemd does between fork and exec).

    python tests/support/systemd.py FD[,FD...] NAME[:NAME...] -- COMMAND...
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
from pathlib import Path


class Sockets:
    """A data and an admin listening socket on 127.0.0.1, open until ``close``."""

    def __init__(self, backlog: int = 1024) -> None:
        self.data = _listening(backlog)
        self.admin = _listening(backlog)
        self.port = int(self.data.getsockname()[1])
        self.admin_port = int(self.admin.getsockname()[1])

    def command(self, argv: list[str]) -> tuple[list[str], tuple[int, ...]]:
        """``argv`` wrapped to receive both sockets as descriptors 3 and 4, and the descriptors
        to keep open for it (``pass_fds``)."""
        fds = (self.data.fileno(), self.admin.fileno())
        wrapper = [sys.executable, str(Path(__file__).resolve())]
        return [*wrapper, ",".join(map(str, fds)), "data:admin", "--", *argv], fds

    def holders(self, pid: int) -> bool:
        """Whether process ``pid`` still holds the data socket (has not closed its listener)."""
        return holds(pid, {os.fstat(self.data.fileno()).st_ino})

    def close(self) -> None:
        self.data.close()
        self.admin.close()


def holds(pid: int, inodes: set[int]) -> bool:
    """Whether process ``pid`` has a descriptor on one of the sockets ``inodes``."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return False
    names = {f"socket:[{inode}]" for inode in inodes}
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") in names:
                return True
        except FileNotFoundError:
            continue
    return False


def _listening(backlog: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(backlog)
    return sock


def _exec(args: list[str]) -> None:
    fds, names, sep, *argv = args
    assert sep == "--" and argv, __doc__
    inherited = [int(fd) for fd in fds.split(",")]
    targets = range(3, 3 + len(inherited))
    # Out of the way above the targets first (a source may sit on a target), then into place.
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, targets.stop) for fd in inherited]
    for fd in inherited:
        if fd not in targets:
            os.close(fd)
    for n, fd in zip(targets, moved, strict=True):
        os.dup2(fd, n, inheritable=True)
        os.close(fd)
    os.environ.update(LISTEN_FDS=str(len(moved)), LISTEN_FDNAMES=names, LISTEN_PID=str(os.getpid()))
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    _exec(sys.argv[1:])
