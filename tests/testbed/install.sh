#!/usr/bin/env bash
# Install the real services the integration tests and the demo run against, into a venv of their
# own (Glance's pins must not meet cachenode's): glance-api 33 under uWSGI, python-glanceclient,
# openstacksdk. Idempotent: a second run with everything present returns at once.
#
#   tests/testbed/install.sh        -> $CACHENODE_TESTBED/venv   (default ~/.cache/cachenode-testbed)
#
# uWSGI has no wheel on PyPI and compiles from its sdist (~25 s): it needs gcc and the Python headers.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TB="${CACHENODE_TESTBED:-$HOME/.cache/cachenode-testbed}"
PY="${PYTHON:-python3}"
V="$TB/venv"
stamp="$V/.cachenode-testbed-$(cat "$HERE/constraints-glance.txt" "$HERE/install.sh" | sha1sum | cut -c1-12)"
if [ -f "$stamp" ] && [ -x "$V/bin/uwsgi" ]; then
  exit 0
fi
mkdir -p "$TB"
t0=$(date +%s)
[ -x "$V/bin/python" ] || "$PY" -m venv "$V"
"$V/bin/pip" install -q -U pip 2>&1 | grep -v '^WARNING: Location' || true
"$V/bin/pip" install -q -c "$HERE/constraints-glance.txt" \
    glance==33.0.0 python-glanceclient==4.13.0 openstacksdk==4.22.0 uwsgi 2>&1 \
    | grep -v '^WARNING: Location' || true
"$V/bin/python" -c 'import glance, glanceclient, openstack' >/dev/null
[ -x "$V/bin/uwsgi" ]
rm -f "$V"/.cachenode-testbed-*
touch "$stamp"
echo "testbed: glance venv ready in $(( $(date +%s) - t0 ))s at $V"
