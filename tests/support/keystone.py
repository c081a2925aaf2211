"""The Keystone-backed test bed: a real Keystone and a glance-api that checks real tokens with
keystonemiddleware (tests/testbed/start-keystone.sh, start-glance.sh with GLANCE_FLAVOR=keystone,
ks-setup.py). Users (password ``<name>pass``, all in the Default domain):

- alice: member, reader of projA (the owner of the images the tests create)
- rita: reader only of projA (may see an image, may not download it)
- bob: member, reader of projB (the other project)
- cachenode: service role in project service (the sidecar's own identity), with an application
  credential; glance: admin and service in project service (keystonemiddleware's user)
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import requests

from tests.support.glance import TESTBED, Glance

# Short-lived tokens: the renewal of the sidecar's own token is shown within minutes.
TOKEN_LIFETIME = 60
PROJECTS = {"alice": "projA", "rita": "projA", "bob": "projB", "cachenode": "service"}


def _env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        for item in line.removeprefix("export ").split():
            key, _, value = item.partition("=")
            env[key] = value
    return env


@dataclass
class KeystoneBed:
    base: Path
    url: str = ""  # Keystone's v3 URL
    glance: Glance = field(init=False)
    app_cred_id: str = ""
    app_cred_secret: str = ""
    _env: dict[str, str] = field(default_factory=dict)

    def start(self) -> KeystoneBed:
        env = {**os.environ, "KS_TOKEN_EXPIRATION": str(TOKEN_LIFETIME)}
        ks = self.base / "keystone"
        subprocess.run(
            [str(TESTBED / "start-keystone.sh"), str(ks)], check=True, env=env,
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        self._env = _env_file(ks / "env.sh")
        self.url = self._env["KS_URL"]
        self.glance = Glance(
            self.base / "glance",
            flavor="keystone",
            env={
                "GLANCE_SHOW_LOCATIONS": "False",
                "GLANCE_EXTRA_CONF": (ks / "glance-authtoken.conf").read_text(),
            },
        ).start()
        tb = Path(os.environ.get("CACHENODE_TESTBED", Path.home() / ".cache/cachenode-testbed"))
        out = subprocess.run(
            [str(tb / "venv/bin/python"), str(TESTBED / "ks-setup.py"), self.glance.url],
            check=True, env={**os.environ, **self._env}, capture_output=True, text=True,
        ).stdout  # fmt: skip
        for item in out.split():
            key, _, value = item.partition("=")
            if key == "APP_CRED_ID":
                self.app_cred_id = value
            elif key == "APP_CRED_SECRET":
                self.app_cred_secret = value
        return self

    def stop(self) -> None:
        self.glance.stop()
        subprocess.run([str(TESTBED / "stop-glance.sh"), str(self.base / "keystone")], check=False)

    def token(self, user: str, project: str | None = None) -> str:
        """A real token of ``user`` scoped to its project (or ``project``), fresh from Keystone."""
        return self._password_token(user, f"{user}pass", project or PROJECTS[user])

    def _password_token(self, user: str, password: str, project: str) -> str:
        body = {
            "auth": {
                "identity": {
                    "methods": ["password"],
                    "password": {
                        "user": {"name": user, "domain": {"id": "default"}, "password": password}
                    },
                },
                "scope": {"project": {"name": project, "domain": {"id": "default"}}},
            }
        }
        r = requests.post(self.url + "/auth/tokens", json=body, timeout=60)
        r.raise_for_status()
        return r.headers["X-Subject-Token"]

    def admin(self, method: str, path: str, **kw: object) -> requests.Response:
        """Keystone's API as its bootstrapped admin (to deactivate or delete users)."""
        token = self.token_of_admin()
        r = requests.request(
            method, self.url + path, headers={"X-Auth-Token": token}, timeout=60, **kw
        )  # type: ignore[arg-type]
        r.raise_for_status()
        return r

    def token_of_admin(self) -> str:
        return self._password_token("admin", self._env["OS_PASSWORD"], "admin")

    def project_id(self, name: str) -> str:
        r = self.admin("GET", f"/projects?name={name}")
        return str(r.json()["projects"][0]["id"])

    def create_user(self, name: str, project: str, roles: tuple[str, ...]) -> str:
        """A new user with ``roles`` on ``project`` (password ``<name>pass``): its id."""
        r = self.admin(
            "POST", "/users", json={"user": {"name": name, "password": f"{name}pass",
                                             "domain_id": "default"}},
        )  # fmt: skip
        user_id = str(r.json()["user"]["id"])
        project_id = self.project_id(project)
        for role in roles:
            role_id = self.admin("GET", f"/roles?name={role}").json()["roles"][0]["id"]
            self.admin("PUT", f"/projects/{project_id}/users/{user_id}/roles/{role_id}")
        return user_id

    def service_auth_password(self, workdir: Path) -> dict[str, str]:
        """``service_auth`` for the sidecar: the cachenode user's password, from a file."""
        secret = workdir / "cachenode.password"
        workdir.mkdir(parents=True, exist_ok=True)
        secret.write_text("cachenodepass\n")
        return {
            "auth_url": self.url, "auth_type": "password", "username": "cachenode",
            "password_file": str(secret), "project_name": "service",
            "user_domain_name": "Default", "project_domain_name": "Default",
        }  # fmt: skip

    def service_auth_app_cred(self, workdir: Path) -> dict[str, str]:
        """``service_auth`` for the sidecar: the cachenode user's application credential."""
        secret = workdir / "appcred.secret"
        workdir.mkdir(parents=True, exist_ok=True)
        secret.write_text(self.app_cred_secret + "\n")
        return {
            "auth_url": self.url, "auth_type": "v3applicationcredential",
            "application_credential_id": self.app_cred_id,
            "application_credential_secret_file": str(secret),
        }  # fmt: skip
