"""A real reverse proxy in front of the test bed's glance-api: Debian's nginx, with its defaults.

In real clouds glance-api sits behind nginx, HAProxy or Apache, and those answer some requests
themselves: a header too large for their buffers (400), a redirect, a maintenance page, a 502 when
Glance drops the connection. ``FrontProxy`` is such an nginx on 127.0.0.1, with a private prefix,
config and logs, and Debian's limits written out (``client_header_buffer_size 1k``,
``large_client_header_buffers 4 8k``, ``gzip on``). Its locations:

    /              proxied to the target (the glance-api)
    /slow/         proxied to the target at ``limit_rate`` (a slow link, for joined fills)
    /norange/      proxied to the target without the caller's Range header
    /redirect/     302 to /caught/ (what a proxy sends when Glance has moved)
    /caught/       200 "followed": whoever follows the redirect ends up here
    /maintenance/  200 with an HTML maintenance page
    /__target      the target URL, to know when a reload took effect

The access log has one line per request: the connection's serial number (so tests can count the
TCP connections it accepted), the request's number on it, method, URI, status, the Range asked,
body bytes sent and whether an X-Auth-Token came (never its value).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.support.glance import Glance
from tests.support.sidecar import free_port

NGINX = shutil.which("nginx", path=os.environ.get("PATH", "") + ":/usr/sbin") or "nginx"

_CONFIG = """\
worker_processes 1;
pid {base}/nginx.pid;
error_log {base}/error.log;
events {{ worker_connections 768; }}
http {{
    sendfile on;
    tcp_nopush on;
    gzip on;
    default_type application/octet-stream;
    client_header_buffer_size 1k;
    large_client_header_buffers 4 8k;
    client_body_temp_path {base}/tmp/body;
    proxy_temp_path {base}/tmp/proxy;
    fastcgi_temp_path {base}/tmp/fastcgi;
    uwsgi_temp_path {base}/tmp/uwsgi;
    scgi_temp_path {base}/tmp/scgi;
    proxy_max_temp_file_size 0;
    map $http_x_auth_token $token {{ "" "-"; default "token"; }}
    log_format probe '$connection\\t$connection_requests\\t$request_method\\t$uri\\t$status\\t'
                     '$http_range\\t$body_bytes_sent\\t$token';
    access_log {base}/access.log probe;
    server {{
        listen 127.0.0.1:{port};
        location / {{ proxy_pass {target}; }}
        location /slow/ {{ proxy_pass {target}/; limit_rate {rate}; }}
        location /norange/ {{ proxy_pass {target}/; proxy_set_header Range ""; }}
        location /redirect/ {{ return 302 http://127.0.0.1:{port}/caught$request_uri; }}
        location /caught/ {{ return 200 "followed\\n"; }}
        location /maintenance/ {{
            default_type text/html;
            return 200 "<html><body><h1>Down for maintenance</h1></body></html>\\n";
        }}
        location = /__target {{ return 200 "{target}"; }}
    }}
}}
"""


@dataclass(frozen=True)
class Logged:
    connection: int
    number: int  # the request's number on its connection
    method: str
    uri: str
    status: int
    range: str
    bytes: int
    token: bool


class FrontProxy:
    def __init__(self, base: Path, target: str, rate: str = "2m") -> None:
        self.base = base
        self.target = target
        self.rate = rate
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> FrontProxy:
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.base / "tmp" / sub).mkdir(parents=True, exist_ok=True)
        self._write_config()
        self.proc = subprocess.Popen(
            [NGINX, "-p", str(self.base), "-c", str(self.base / "nginx.conf"),
             "-e", str(self.base / "error.log"), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self._wait_for_target()
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: let answers in flight finish
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def retarget(self, target: str) -> None:
        """Proxy to ``target`` from now on. A restart, not a reload: after a reload, nginx's old
        workers keep serving the keep-alive connections made before it, with the old target."""
        self.target = target
        self.stop()
        self.start()

    def log(self) -> list[Logged]:
        path = self.base / "access.log"
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            conn, number, method, uri, status, rng, sent, token = line.split("\t")
            out.append(Logged(int(conn), int(number), method, uri, int(status),
                              "" if rng == "-" else rng, int(sent), token == "token"))  # fmt: skip
        return out

    def _write_config(self) -> None:
        text = _CONFIG.format(base=self.base, port=self.port, target=self.target, rate=self.rate)
        (self.base / "nginx.conf").write_text(text)

    def _wait_for_target(self) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited {self.proc.returncode}: {self._errors()}")
            try:
                if requests.get(self.url + "/__target", timeout=1).text == self.target:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"nginx did not start: {self._errors()}")

    def _errors(self) -> str:
        path = self.base / "error.log"
        return path.read_text() if path.exists() else ""


@pytest.fixture(scope="session")
def front_proxy(tmp_path_factory: pytest.TempPathFactory, glance: Glance) -> Iterator[FrontProxy]:
    """nginx in front of the session's glance-api; tests read its access log, never change it."""
    proxy = FrontProxy(tmp_path_factory.mktemp("frontproxy"), glance.url).start()
    yield proxy
    proxy.stop()
