#!/usr/bin/env bash
# Install the real services the integration tests and the demo run against, into venvs of their
# own (Glance's and Swift's pins must not meet cachenode's): glance-api 33 under uWSGI,
# python-glanceclient and openstacksdk in one, Swift 2.38 in another, Keystone 30 (+ uWSGI) in a
# third (its oslo pins differ from Glance's; keystonemiddleware is already in Glance's). Idempotent: a second run
# with everything present returns at once. memcached (for Swift) comes from Debian: `.ci/run`
# installs it.
#
#   tests/testbed/install.sh   -> $CACHENODE_TESTBED/{venv,swiftvenv,ksvenv}  (default ~/.cache/cachenode-testbed)
#
# uWSGI has no wheel on PyPI and compiles from its sdist (~25 s): it needs gcc and the Python headers.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TB="${CACHENODE_TESTBED:-$HOME/.cache/cachenode-testbed}"
PY="${PYTHON:-python3}"
V="$TB/venv"
SV="$TB/swiftvenv"
KV="$TB/ksvenv"
stamp="$TB/.installed-$(cat "$HERE"/constraints-*.txt "$HERE/install.sh" | sha1sum | cut -c1-12)"
if [ -f "$stamp" ] && [ -x "$V/bin/uwsgi" ] && [ -x "$SV/bin/swift-proxy-server" ] \
    && [ -x "$KV/bin/keystone-manage" ] && [ -x "$KV/bin/uwsgi" ]; then
  exit 0
fi
mkdir -p "$TB"
t0=$(date +%s)
[ -x "$V/bin/python" ] || "$PY" -m venv "$V"
"$V/bin/pip" install -q -U pip 2>&1 | grep -v '^WARNING: Location' || true
"$V/bin/pip" install -q -c "$HERE/constraints-glance.txt" \
    glance==33.0.0 python-glanceclient==4.13.0 openstacksdk==4.22.0 uwsgi python-swiftclient 2>&1 \
    | grep -v '^WARNING: Location' || true
"$V/bin/python" -c 'import glance, glanceclient, openstack, swiftclient' >/dev/null
[ -x "$V/bin/uwsgi" ]

[ -x "$SV/bin/python" ] || "$PY" -m venv "$SV"
"$SV/bin/pip" install -q -U pip 2>&1 | grep -v '^WARNING: Location' || true
# PyECLib's wheel bundles liberasurecode; Swift's xattrs work on ext4.
"$SV/bin/pip" install -q -c "$HERE/constraints-swift.txt" swift==2.38.3 python-swiftclient 2>&1 \
    | grep -v '^WARNING: Location' || true
[ -x "$SV/bin/swift-proxy-server" ]

[ -x "$KV/bin/python" ] || "$PY" -m venv "$KV"
"$KV/bin/pip" install -q -U pip 2>&1 | grep -v '^WARNING: Location' || true
"$KV/bin/pip" install -q -c "$HERE/constraints-keystone.txt" keystone==30.0.0 uwsgi 2>&1 \
    | grep -v '^WARNING: Location' || true
[ -x "$KV/bin/keystone-manage" ] && [ -x "$KV/bin/uwsgi" ]

rm -f "$TB"/.installed-*
touch "$stamp"
echo "testbed: glance, swift and keystone venvs ready in $(( $(date +%s) - t0 ))s in $TB"
