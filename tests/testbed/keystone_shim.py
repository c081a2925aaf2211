"""A Keystone v3 stand-in for glance_store's swift driver, in front of Swift's tempauth.

glance_store's single-tenant swift driver always authenticates with keystoneauth's V3Password
(POST <auth_address>/auth/tokens) and takes Swift's endpoint from the token's catalog, so it
cannot use tempauth directly. This shim turns that POST into tempauth's GET /auth/v1.0 with
``project:user`` and the password, and answers with the tempauth token as X-Subject-Token and
a catalog whose object-store endpoint is the tempauth storage URL. Test bed use only.

    python keystone_shim.py PORT SWIFT_URL
"""

import datetime
import json
import sys
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PORT, SWIFT = int(sys.argv[1]), sys.argv[2].rstrip("/")
ME = f"http://127.0.0.1:{PORT}"
VERSION = {
    "id": "v3.14",
    "status": "stable",
    "updated": "2020-04-07T00:00:00Z",
    "links": [{"rel": "self", "href": ME + "/v3/"}],
    "media-types": [
        {"base": "application/json", "type": "application/vnd.openstack.identity-v3+json"}
    ],
}


class Shim(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def reply(self, status, doc, headers=()):
        body = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        path = self.path.rstrip("/")
        if path == "":
            self.reply(300, {"versions": {"values": [VERSION]}})
        elif path == "/v3":
            self.reply(200, {"version": VERSION})
        else:
            self.reply(404, {"error": {"code": 404, "message": "not found"}})

    def do_POST(self):
        if not self.path.rstrip("/").endswith("/auth/tokens"):
            return self.reply(404, {"error": {"code": 404, "message": "not found"}})
        length = int(self.headers.get("Content-Length", 0))
        try:
            auth = json.loads(self.rfile.read(length) or b"{}")["auth"]
            user = auth["identity"]["password"]["user"]
            name, password = user.get("name") or user["id"], user["password"]
            project = auth["scope"]["project"]
            project_name = project.get("name") or project["id"]
        except (KeyError, TypeError, ValueError):
            return self.reply(
                400, {"error": {"code": 400, "message": "password auth, project scope"}}
            )
        request = urllib.request.Request(
            SWIFT + "/auth/v1.0",
            headers={"X-Storage-User": f"{project_name}:{name}", "X-Storage-Pass": password},
        )
        try:
            with urllib.request.urlopen(request) as resp:
                token, storage = resp.headers["X-Auth-Token"], resp.headers["X-Storage-Url"]
        except urllib.error.HTTPError as exc:
            return self.reply(401, {"error": {"code": 401, "message": f"tempauth: {exc.code}"}})
        now = datetime.datetime.now(datetime.UTC)
        stamp = "%Y-%m-%dT%H:%M:%S.000000Z"
        domain = {"id": "default", "name": "Default"}
        endpoints = [
            {
                "id": f"swift-{i}",
                "interface": i,
                "region": "RegionOne",
                "region_id": "RegionOne",
                "url": storage,
            }
            for i in ("public", "internal", "admin")
        ]
        self.reply(
            201,
            {
                "token": {
                    "methods": ["password"],
                    "issued_at": now.strftime(stamp),
                    "expires_at": (now + datetime.timedelta(hours=12)).strftime(stamp),
                    "user": {"id": name, "name": name, "domain": domain},
                    "project": {"id": project_name, "name": project_name, "domain": domain},
                    "roles": [{"id": "admin", "name": "admin"}],
                    "catalog": [
                        {
                            "type": "object-store",
                            "name": "swift",
                            "id": "swift",
                            "endpoints": endpoints,
                        }
                    ],
                }
            },
            [("X-Subject-Token", token)],
        )

    def log_message(self, fmt, *args):
        sys.stdout.write("keystone_shim: " + fmt % args + "\n")
        sys.stdout.flush()


ThreadingHTTPServer(("127.0.0.1", PORT), Shim).serve_forever()
