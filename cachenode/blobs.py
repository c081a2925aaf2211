"""Image bytes on the local disk: one file per image, written once, in place.

Layout under ``cache.dir``::

    blobs/<id[:2]>/<image id>        committed: complete and verified, never written again
    partial/<image id>.<nonce>       a fill in progress; kept at start only to resume it
    partial/<image id>.<nonce>.journal   what of it is written (``cachenode.journal``)

A fill writes its partial file at the offsets the bytes belong to (no temporary second copy), then
``commit`` fsyncs it and renames it into ``blobs/``: a rename is atomic, so a crash at any instant
leaves either no blob or a complete one. All of these calls block; ``cachenode.local`` runs them in
an executor.
"""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path

import psutil

from cachenode import crash
from cachenode.errors import StoreError


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.blob_dir = root / "blobs"
        self.partial_dir = root / "partial"
        try:
            self.blob_dir.mkdir(parents=True, exist_ok=True)
            self.partial_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create {root}: {exc.strerror}") from exc

    def path(self, image_id: str) -> Path:
        return self.blob_dir / image_id[:2] / image_id

    def create_partial(self, image_id: str, size: int) -> tuple[Path, int]:
        """A new partial file with ``size`` bytes reserved; StoreError if the disk has no room.

        Reserving the whole image up front (fallocate) turns a disk that would fill up halfway
        through a fill into an error before the first byte, when the caller can still be served
        by pass-through.
        """
        path = self.partial_dir / f"{image_id}.{secrets.token_hex(4)}"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            raise StoreError(f"cannot create {path}: {exc.strerror}") from exc
        try:
            if size:
                os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            os.close(fd)
            path.unlink(missing_ok=True)
            if exc.errno == errno.EOPNOTSUPP or exc.errno == errno.EINVAL:
                return self._create_unreserved(path)
            raise StoreError(f"no room for {size} bytes in {self.root}: {exc.strerror}") from exc
        return path, fd

    def _create_unreserved(self, path: Path) -> tuple[Path, int]:
        # Filesystems without fallocate (some tmpfs, NFS): write errors will surface instead.
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        return path, fd

    @staticmethod
    def write(fd: int, data: bytes | memoryview, offset: int) -> None:
        view = memoryview(data)
        try:
            while view:
                n = os.pwrite(fd, view, offset)
                view, offset = view[n:], offset + n
        except OSError as exc:
            raise StoreError(f"write failed: {exc.strerror}") from exc
        crash.point("fill.chunk")

    def commit(self, partial: Path, fd: int, image_id: str) -> Path:
        """Make the partial file the image's blob: fsync, rename, fsync the folder."""
        final = self.path(image_id)
        try:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)  # the commit owns the descriptor: closed once, whatever happens
            crash.point("commit.fsynced")
            final.parent.mkdir(exist_ok=True)
            os.rename(partial, final)
            _fsync_dir(final.parent)
            crash.point("commit.renamed")
        except OSError as exc:
            raise StoreError(f"cannot commit {image_id}: {exc.strerror}") from exc
        return final

    @staticmethod
    def discard(partial: Path | None, fds: list[int]) -> None:
        """Close the descriptors (each owned by the caller, closed once) and remove the file."""
        for fd in fds:
            os.close(fd)
        if partial is not None:
            partial.unlink(missing_ok=True)

    def remove(self, image_id: str) -> int:
        """Delete the blob; readers that hold it open keep reading until they close it."""
        path = self.path(image_id)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise StoreError(f"cannot remove {image_id}: {exc.strerror}") from exc
        return size

    def committed(self) -> dict[str, int]:
        """Every blob on disk and its size."""
        return {
            p.name: p.stat().st_size
            for sub in self.blob_dir.iterdir()
            if sub.is_dir()
            for p in sub.iterdir()
        }

    def disk_usage(self) -> tuple[int, int]:
        """(total, free) bytes of the filesystem under the cache; free as an unprivileged
        process may use it, which is what the cache's user gets."""
        usage = psutil.disk_usage(str(self.root))
        return usage.total, usage.free


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
