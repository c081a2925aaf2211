"""The CLI facing an admin API that does not answer as it expects (an older sidecar during an
upgrade, an internal error): one clear line and exit 1, never a traceback. The admin API here is
a stand-in of our own that only injects those answers."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from cachenode import cli

ANSWERS = {
    "/admin/v1/images": (404, b'{"error": "no such path"}'),
    "/admin/v1/stats": (500, b"<html>internal error</html>"),
    "/admin/v1/fills": (200, b'{"something": []}'),
}


class Answers(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status, body = ANSWERS.get(self.path, (404, b"{}"))
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def config(tmp_path: Path) -> Iterator[Path]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Answers)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    (tmp_path / "admin.token").write_text("t\n")
    path = tmp_path / "cachenode.yaml"
    path.write_text(yaml.safe_dump({
        "glance": {"url": "http://127.0.0.1:9"}, "cache": {"dir": str(tmp_path / "c")},
        "admin": {"listen": f"127.0.0.1:{server.server_address[1]}",
                  "token_file": str(tmp_path / "admin.token")},
    }))  # fmt: skip
    yield path
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(
    ("command", "said"),
    [
        (["ls"], "the admin API answered 404 to GET /images: no such path"),
        (["stats"], "the admin API answered 500 to GET /stats: "),
    ],
)
def test_an_unexpected_answer_is_one_line_and_exit_1(
    config: Path, capsys: pytest.CaptureFixture[str], command: list[str], said: str
) -> None:
    assert cli.main([*command, "-c", str(config)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"cachenode: {said}") and err.count("\n") == 1
    assert "Traceback" not in err


def test_a_fills_answer_without_fills_is_an_error_too(config: Path) -> None:
    from cachenode import ctl
    from cachenode.config import load_config

    client = ctl.AdminClient(load_config(config))
    with pytest.raises(ctl.CtlError, match="answered 200 to GET /fills: no data"):
        client.get("/fills", "fills")
