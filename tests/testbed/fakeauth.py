"""Keystone stand-in for the test bed's real glance-api: tokens are ``user:project:role[,role]``.

It only turns a token into the identity headers keystonemiddleware would set; Glance itself then
decides everything (policy, visibility, membership) as it does in a real cloud.

- The token is %-decoded first: python-glanceclient quotes ``:`` and ``,`` in X-Auth-Token.
- Identity headers sent by the client are dropped, as keystonemiddleware does.
- A malformed token, or one listed in the optional ``revoked_tokens_file``, gets 401.
- No token: no identity, and Glance's context middleware answers 401.
"""

import os
import urllib.parse

import webob.dec
import webob.exc

IDENTITY_HEADERS = (
    "X-Identity-Status",
    "X-User-Id",
    "X-User",
    "X-User-Name",
    "X-Project-Id",
    "X-Tenant-Id",
    "X-Tenant",
    "X-Project-Name",
    "X-Roles",
    "X-Role",
    "X-Service-Catalog",
    "X-Domain-Id",
    "X-User-Domain-Id",
    "X-Project-Domain-Id",
    "X-Is-Admin-Project",
    "X-Service-Identity-Status",
    "X-Service-Roles",
    "X-System-Scope",
)


class FakeAuth:
    def __init__(self, app, revoked_tokens_file=None):
        self.app = app
        self.revoked_tokens_file = revoked_tokens_file

    def revoked(self, token):
        path = self.revoked_tokens_file
        if not path or not os.path.exists(path):
            return False
        with open(path) as f:
            return token in {line.strip() for line in f}

    @webob.dec.wsgify
    def __call__(self, req):
        for name in IDENTITY_HEADERS:
            req.headers.pop(name, None)
        raw = req.headers.get("X-Auth-Token")
        if raw:
            token = urllib.parse.unquote(raw)
            parts = token.split(":")
            if len(parts) != 3 or not all(parts) or self.revoked(token):
                return webob.exc.HTTPUnauthorized(explanation="fakeauth: invalid or revoked token")
            user, project, roles = parts
            req.headers.update(
                {
                    "X-Identity-Status": "Confirmed",
                    "X-User-Id": user,
                    "X-Project-Id": project,
                    "X-Tenant-Id": project,
                    "X-Roles": roles,
                }
            )
        return req.get_response(self.app)


def filter_factory(global_conf, **local_conf):
    revoked = local_conf.get("revoked_tokens_file") or None
    return lambda app: FakeAuth(app, revoked_tokens_file=revoked)
