"""cachenode itself, run as users run it: ``python -m cachenode serve -c FILE``, its own process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.systemd import Sockets


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Sidecar:
    """One sidecar's config and, once started, its process. With ``sockets`` it listens on the
    sockets a stand-in for systemd holds (``tests/support/systemd.py``), as under the socket
    unit; ``start`` after a stop is then a restart on the same sockets."""

    def __init__(
        self, workdir: Path, glance_url: str | None, sockets: Sockets | None = None, **config: Any
    ) -> None:
        """``glance_url`` None: no ``glance.url``, Glance is found in Keystone's catalog."""
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.sockets = sockets
        if sockets is not None:
            self.port, self.admin_port = sockets.port, sockets.admin_port
        else:
            self.port, self.admin_port = free_port(), free_port()
        self.cache_dir = workdir / "cache"
        doc: dict[str, Any] = {
            "listen": f"127.0.0.1:{self.port}",
            "glance": {"url": glance_url} if glance_url else {},
            "authz": {"ttl": "0s"},
            "cache": {"dir": str(self.cache_dir)},
            "admin": {"listen": f"127.0.0.1:{self.admin_port}"},
        }
        for key, value in config.items():
            if isinstance(value, dict) and isinstance(doc.get(key), dict):
                doc[key] = {**doc[key], **value}
            else:
                doc[key] = value
        self.cache_dir = Path(doc["cache"]["dir"])  # where the config really puts it
        self.port = int(str(doc["listen"]).rsplit(":", 1)[1])  # a successor's are its peer's
        self.admin_port = int(str(doc["admin"]["listen"]).rsplit(":", 1)[1])
        self.config_path = workdir / "cachenode.yaml"
        self.config_path.write_text(yaml.safe_dump(doc))
        self.log_path = workdir / "cachenode.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"

    def start(self, env: dict[str, str] | None = None, ready: bool = True) -> Sidecar:
        """Run it and wait for /readyz, unless ``ready`` is False: a successor taking the
        sockets of a running sidecar would see its peer answer."""
        command = [sys.executable, "-m", "cachenode", "serve", "-c", str(self.config_path)]
        fds: tuple[int, ...] = ()
        if self.sockets is not None:
            command, fds = self.sockets.command(command)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                command,
                stdout=log,
                stderr=log,
                pass_fds=fds,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            )
        if not ready:
            return self
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cachenode exited {self.proc.returncode}:\n{self.log()}")
            try:
                if requests.get(self.admin_url + "/readyz", timeout=1).status_code == 200:
                    return self
            except (requests.ConnectionError, requests.Timeout):
                pass  # on a held socket, a process still starting leaves the call in the backlog
            time.sleep(0.05)
        raise RuntimeError(f"cachenode did not become ready:\n{self.log()}")

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""

    def sigterm(self) -> float:
        """Send SIGTERM; the seconds until the process exited with status 0 (10 s at most)."""
        assert self.proc is not None
        asked = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(10) == 0
        return time.monotonic() - asked

    def stopped_before_serving(self, waiting_for: str) -> str:
        """Check the log of a start stopped while it waited: one line, naming what it waited
        for, and no traceback. The log."""
        log = self.log()
        said = [line for line in log.splitlines() if "stopping" in line]
        assert len(said) == 1, log
        assert said[0].endswith(
            f"stopping before serving: asked to stop while waiting for {waiting_for}"
        ), said[0]
        assert "Traceback" not in log
        return log

    # -- what it exposes
    def get(
        self, image_id: str, token: str | None, settle: bool = True, **kw: Any
    ) -> requests.Response:
        """One download, then ``settle()`` unless told not to: a caller's body ends when the bytes
        verified, before the fill's fsync and rename; tests that go on to expect a HIT wait."""
        headers = {"X-Auth-Token": token} if token else {}
        headers.update(kw.pop("headers", {}))
        url = f"{self.url}/v2/images/{image_id}/file"
        resp = requests.get(url, headers=headers, timeout=120, **kw)
        if settle:
            self.settle()
        return resp

    def settle(self, timeout: float = 30) -> None:
        """Wait until no fill is running (each has committed or failed)."""
        deadline = time.monotonic() + timeout
        while self.metric("cachenode_inflight_fills") > 0:
            if time.monotonic() > deadline:
                raise TimeoutError("fills still running")
            time.sleep(0.01)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = requests.get(self.admin_url + "/metrics", timeout=10).text
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def metric(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def blobs(self) -> list[Path]:
        assert (self.cache_dir / "blobs").is_dir(), f"no cache at {self.cache_dir}"
        return sorted(p for p in (self.cache_dir / "blobs").glob("*/*"))

    def partials(self) -> list[Path]:
        assert (self.cache_dir / "partial").is_dir(), f"no cache at {self.cache_dir}"
        return sorted((self.cache_dir / "partial").glob("*"))
