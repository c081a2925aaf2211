"""What deploy/ ships is valid as shipped: configs pass check-config, the unit verifies and is
hardened, the DaemonSet wires probes, scraping and the cache path, nova points at the sidecar."""

from __future__ import annotations

import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def check_config(text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """check-config on ``text`` with every /etc/cachenode/... file made to exist under tmp_path."""
    for name in set(re.findall(r"/etc/cachenode/([\w./-]+)", text)):
        target = tmp_path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        url = name.endswith(".url")  # notifications.transport_url_file holds a URL
        target.write_text("rabbit://cachenode:secret@bus:5672/\n" if url else "secret\n")
    config = tmp_path / "cachenode.yaml"
    config.write_text(text.replace("/etc/cachenode/", f"{tmp_path}/"))
    return subprocess.run(
        [sys.executable, "-m", "cachenode", "check-config", "-c", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_example_config_passes_check_config(tmp_path: Path) -> None:
    result = check_config((DEPLOY / "cachenode.yaml").read_text(), tmp_path)
    assert result.returncode == 0, result.stderr
    assert "tiers regional (glance), objectstore (swift)" in result.stdout


def test_regional_example_passes_check_config(tmp_path: Path) -> None:
    result = check_config((DEPLOY / "regional.yaml").read_text(), tmp_path)
    assert result.returncode == 0, result.stderr
    assert "listen 0.0.0.0:9393" in result.stdout
    assert "tiers objectstore (swift), glance (glance)" in result.stdout


def test_daemonset_wiring(tmp_path: Path) -> None:
    docs = list(yaml.safe_load_all((DEPLOY / "daemonset.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    pod = kinds["DaemonSet"]["spec"]["template"]
    spec, container = pod["spec"], pod["spec"]["containers"][0]
    config = yaml.safe_load(kinds["ConfigMap"]["data"]["cachenode.yaml"])
    admin_port = int(config["admin"]["listen"].rsplit(":", 1)[1])
    data_port = int(config["listen"].rsplit(":", 1)[1])
    assert spec["hostNetwork"] is True  # nova-compute reaches it on 127.0.0.1
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert int(pod["metadata"]["annotations"]["prometheus.io/port"]) == admin_port
    assert container["readinessProbe"]["httpGet"] == {
        "path": "/readyz",
        "port": admin_port,
        "host": "127.0.0.1",
    }
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert data_port != admin_port
    # Updates: the new pod starts next to the old one and takes its sockets (cachenode.handover),
    # so no port may be declared (a hostPort on the host network) or the surge pod never fits.
    assert kinds["DaemonSet"]["spec"]["updateStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    assert "ports" not in container
    handover_dir = config["handover"]["path"].rsplit("/", 1)[0]
    handover_volume = next(v for v in spec["volumes"] if v["name"] == "handover")
    assert handover_volume["hostPath"]["path"] == handover_dir
    cache_volume = next(v for v in spec["volumes"] if v["name"] == "cache")
    assert cache_volume["hostPath"]["path"] == config["cache"]["dir"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["cache"] == config["cache"]["dir"]
    assert mounts["handover"] == handover_dir
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    url_file = config["notifications"]["transport_url_file"]  # the bus's password: a secret
    assert url_file.startswith(mounts["secrets"] + "/")
    assert url_file.rsplit("/", 1)[1] in kinds["Secret"]["stringData"]
    result = check_config(kinds["ConfigMap"]["data"]["cachenode.yaml"], tmp_path)
    assert result.returncode == 0, result.stderr


def test_nova_points_at_the_sidecar() -> None:
    nova = configparser.ConfigParser()
    nova.read(DEPLOY / "nova.conf")
    listen = yaml.safe_load((DEPLOY / "cachenode.yaml").read_text())["listen"]
    assert nova["glance"]["endpoint_override"] == f"http://{listen}"


def test_systemd_unit_verifies_and_is_hardened(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    unit = tmp_path / "cachenode.service"
    cachenode = Path(sys.executable).parent / "cachenode"
    unit.write_text(
        (DEPLOY / "cachenode.service")
        .read_text()
        .replace("/usr/local/bin/cachenode", str(cachenode))
    )
    socket_unit = tmp_path / "cachenode.socket"
    socket_unit.write_text((DEPLOY / "cachenode.socket").read_text())
    verified = subprocess.run(
        [analyze, "verify", str(socket_unit), str(unit)], capture_output=True, text=True
    )
    assert verified.returncode == 0 and not verified.stderr.strip(), verified.stderr
    security = subprocess.run(
        [analyze, "security", "--offline=yes", str(unit)], capture_output=True, text=True
    )
    score = re.search(r"Overall exposure level for cachenode.service: ([\d.]+)", security.stdout)
    assert score is not None, security.stdout + security.stderr
    assert float(score.group(1)) <= 2.0  # systemd calls <= 2 "OK"; an unhardened service is ~9.6


def test_socket_unit_listens_where_the_config_does() -> None:
    """cachenode matches each inherited socket to listen or admin.listen by address, and refuses
    to start on one that matches neither: the shipped socket unit and config agree."""
    text = (DEPLOY / "cachenode.socket").read_text()
    streams = re.findall(r"^ListenStream=(\S+)$", text, re.MULTILINE)
    config = yaml.safe_load((DEPLOY / "cachenode.yaml").read_text())
    assert sorted(streams) == sorted([config["listen"], config["admin"]["listen"]])
    assert "Requires=cachenode.socket" in (DEPLOY / "cachenode.service").read_text()
