"""The operator's CLI (SPEC §7) against a running sidecar, real Glance behind it."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import uuid
from pathlib import Path

import requests

from tests.support.glance import ADMIN, ALICE, Glance
from tests.support.sidecar import Sidecar


def operated(sidecar_factory, tmp_path: Path, **config: object) -> Sidecar:  # type: ignore[no-untyped-def]
    """A sidecar with an admin token and service credentials (Glance's admin)."""
    (tmp_path / "admin.token").write_text("s3cret-admin\n")
    (tmp_path / "service.token").write_text(ADMIN + "\n")
    return sidecar_factory(
        admin={"token_file": str(tmp_path / "admin.token")},
        service_auth={"token_file": str(tmp_path / "service.token")},
        **config,
    ).start()


def cli(sidecar: Sidecar, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cachenode", *args, "-c", str(sidecar.config_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def on_a_terminal(sidecar: Sidecar, *args: str) -> tuple[int, bytes]:
    """Run the CLI under a pseudo-terminal of 120 columns: its exit status and all it wrote."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "cachenode", *args, "-c", str(sidecar.config_path)],
        stdout=terminal,
        stderr=terminal,
        env={k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")},
    )
    os.close(terminal)
    output = b""
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:
            break
        if not chunk:
            break
        output += chunk
    os.close(controller)
    return proc.wait(60), output


def test_warm_ls_stats_pin_evict(glance: Glance, sidecar_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sidecar = operated(sidecar_factory, tmp_path)
    plain = glance.create_image(2 << 20)
    tag = f"golden-{uuid.uuid4().hex[:8]}"  # the session's Glance holds other tests' images
    golden = [glance.create_image(1 << 20, tags=[tag]) for _ in range(2)]
    cirros = glance.create_image(1 << 20, os_distro=f"cirros-{tag}")

    warmed = cli(sidecar, "warm", plain.id)
    assert warmed.returncode == 0, warmed.stderr
    assert (
        warmed.stdout.strip() == f"{plain.id}  2.0MiB  cached"
    )  # not a terminal: one line, no bar
    tagged = cli(sidecar, "warm", "--tag", tag)  # several at once, a line as each ends
    assert tagged.returncode == 0
    assert sorted(tagged.stdout.splitlines()) == sorted(f"{g.id}  1.0MiB  cached" for g in golden)
    assert cli(sidecar, "warm", "--property", f"os_distro=cirros-{tag}").returncode == 0
    wanted = {plain.id, cirros.id} | {g.id for g in golden}
    assert {b.name for b in sidecar.blobs()} == wanted
    for image in (plain, cirros, *golden):  # warmed bytes are served as hits, verified
        hit = sidecar.get(image.id, ALICE)
        assert hit.headers["X-Cachenode-Status"] == "HIT" and hit.content == image.data

    listed = json.loads(cli(sidecar, "ls", "--json").stdout)
    assert {i["id"] for i in listed} == wanted and all(i["state"] == "cached" for i in listed)
    table = cli(sidecar, "ls").stdout.splitlines()
    assert table[0].split()[:3] == ["IMAGE", "STATE", "SIZE"] and len(table) == 5
    stats = json.loads(cli(sidecar, "stats", "--json").stdout)
    assert stats["entries"] == 4 and stats["bytes"] == 5 << 20
    assert stats["requests"]["hit"] == 4 and stats["hit_ratio"] == 1.0
    assert "hit ratio:" in cli(sidecar, "stats").stdout

    assert cli(sidecar, "pin", plain.id).returncode == 0
    kept = cli(sidecar, "evict", plain.id, cirros.id)
    assert kept.returncode == 0
    assert f"{plain.id}  kept: pinned" in kept.stdout and f"{cirros.id}  evicted" in kept.stdout
    assert cli(sidecar, "evict", "--idle-for", "7d").stdout == ""  # nothing that old
    forced = cli(sidecar, "evict", "--force", plain.id)
    assert f"{plain.id}  evicted" in forced.stdout
    assert cli(sidecar, "unpin", plain.id).returncode == 0
    everything = cli(sidecar, "evict", "--all")
    assert everything.returncode == 0 and sidecar.blobs() == []
    assert sidecar.metric("cachenode_evictions_total", reason="requested") == 4
    assert sidecar.metric("cachenode_evicted_bytes_total") == 5 << 20


def test_warm_shows_a_bar_per_image_on_a_terminal(
    glance: Glance, sidecar_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """Under a pseudo-terminal of 120 columns: a bar per image, named, with its rate and time
    left, redrawn in place; each ends at 100% and cached.

    The tier's limits make the warms last a few polls: max_fills 2 lets one warm run at a time
    (the other slot is kept for callers), and at 3 MB/s the second image alone takes a second,
    so the third is still waiting for a slot when the CLI first looks.
    """
    tier = {"name": "regional", "kind": "glance", "url": glance.url,
            "max_fills": 2, "max_rate": "3MB"}  # fmt: skip
    sidecar = operated(sidecar_factory, tmp_path, tiers=[tier])
    names = ["ubuntu-golden", "cirros-golden", "debian-golden"]
    images = [glance.create_image(3 << 20, tags=["bars"], name=n) for n in names]
    status, output = on_a_terminal(sidecar, "warm", "--tag", "bars")
    assert status == 0
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output.decode())
    assert "\x1b[" in output.decode()  # drawn with cursor movements: a terminal's output
    assert "waiting for a slot" in text
    final = [line for line in text.replace("\r", "\n").splitlines() if line.strip()][-3:]
    for image, name in zip(images, names, strict=True):
        (line,) = [line for line in final if name in line]
        assert image.id[:8] in line and "100%" in line and "3.0/3.0 MiB" in line
        assert line.rstrip().endswith("cached") and re.search(r"\d MB/s", line)  # its rate
    assert {b.name for b in sidecar.blobs()} == {i.id for i in images}


def test_warm_bars_show_an_image_name_as_text(
    glance: Glance, sidecar_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """Any project names its images as it likes, and a shared image's name reaches the operator's
    terminal: markup in it is shown as written (never a crash of the CLI), and an escape sequence
    (here one that sets the terminal's title) is not passed to the terminal."""
    sidecar = operated(sidecar_factory, tmp_path)
    name = "[/oops] [link=http://x]ok \x1b]0;pwned\x07"
    image = glance.create_image(1 << 20, name=name)
    status, output = on_a_terminal(sidecar, "warm", image.id)
    text = output.decode()
    assert status == 0, text
    assert "\x1b]" not in text  # rich draws with CSI sequences only; no OSC got through
    assert f"[/oops] [link=http://x]ok ?]0;pwned?  {image.id[:8]}" in text
    assert {b.name for b in sidecar.blobs()} == {image.id}


def test_verify_evicts_what_fails_its_hash(glance: Glance, sidecar_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sidecar = operated(sidecar_factory, tmp_path)
    good, bad = glance.create_image(1 << 20), glance.create_image(1 << 20)
    assert cli(sidecar, "warm", good.id, bad.id).returncode == 0
    blob = sidecar.cache_dir / "blobs" / bad.id[:2] / bad.id
    data = bytearray(blob.read_bytes())
    data[12345] ^= 1  # bit rot
    blob.write_bytes(bytes(data))
    checked = cli(sidecar, "verify")
    assert checked.returncode == 1
    assert f"{bad.id}  failed its hash: evicted" in checked.stdout
    assert "2 entries checked, 1 failed" in checked.stdout
    assert [b.name for b in sidecar.blobs()] == [good.id]
    again = sidecar.get(bad.id, ALICE)  # refilled, correct
    assert again.headers["X-Cachenode-Status"] == "MISS" and again.content == bad.data
    assert cli(sidecar, "verify").returncode == 0


def test_exit_statuses(glance: Glance, sidecar_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sidecar = operated(sidecar_factory, tmp_path)
    unknown = "00000000-0000-4000-8000-000000000000"
    failed = cli(sidecar, "warm", unknown)
    assert failed.returncode == 1 and f"{unknown}  failed" in failed.stdout
    assert cli(sidecar, "evict").returncode == 2  # nothing said to evict
    assert cli(sidecar, "warm").returncode == 2
    assert cli(sidecar, "frobnicate").returncode == 2
    assert cli(sidecar, "warm", "--property", "novalue").returncode == 2
    # The API refuses a wrong token, and without one.
    assert requests.get(sidecar.admin_url + "/admin/v1/stats", timeout=5).status_code == 401
    wrong = requests.get(
        sidecar.admin_url + "/admin/v1/stats", timeout=5, headers={"Authorization": "Bearer guess"}
    )
    assert wrong.status_code == 401
    (tmp_path / "admin.token").write_text("not-the-token\n")  # the CLI now holds a wrong token
    refused = cli(sidecar, "ls")
    assert refused.returncode == 1 and "refused the admin token" in refused.stderr
    sidecar.stop()
    gone = subprocess.run(
        [sys.executable, "-m", "cachenode", "stats", "-c", str(sidecar.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert gone.returncode == 1 and "cannot reach the admin API" in gone.stderr
