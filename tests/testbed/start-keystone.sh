#!/usr/bin/env bash
# Start a real Keystone (keystone 30 from PyPI under uWSGI: sqlite, fernet tokens, bootstrapped
# admin) on 127.0.0.1; ks-setup.py then adds the users, projects, roles and image endpoints.
#
#   tests/testbed/start-keystone.sh BASE    writes BASE/env.sh (KS_URL, OS_* of the admin) and
#                                           BASE/glance-authtoken.conf; stop-glance.sh BASE stops it
# Environment (all optional):
#   KS_PORT              port (default: a free one)
#   KS_TOKEN_EXPIRATION  token lifetime in seconds (default 7200; the renewal tests use 60)
#
# What the real service needs, found the hard way:
# - sqlite: ONE uWSGI process with ONE thread. With more, authenticate() hits 'database is locked'
#   and uWSGI drops the connection (clients see RemoteDisconnected).
# - the fernet and credential key directories must be 0700, or every token operation warns.
# - password_hash_rounds = 4 (bcrypt cost 4, not 12): each login costs ms, not 0.3 s (test bed only).
set -euo pipefail
TB="${CACHENODE_TESTBED:-$HOME/.cache/cachenode-testbed}"
V="$TB/ksvenv"
B="$(realpath -m "${1:?usage: start-keystone.sh BASE}")"
PORT="${KS_PORT:-$("$V/bin/python" -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')}"
PASS=adminpass
if [ -f "$B/uwsgi.pid" ] && kill -0 "$(cat "$B/uwsgi.pid")" 2>/dev/null; then
  echo "keystone already running in $B" >&2; exit 1
fi
rm -rf "$B"; mkdir -p "$B"/{etc,log,fernet-keys,credential-keys}
cat > "$B/etc/keystone.conf" <<CONF
[DEFAULT]
log_file = $B/log/keystone.log
[database]
connection = sqlite:///$B/keystone.sqlite
[token]
provider = fernet
expiration = ${KS_TOKEN_EXPIRATION:-7200}
[fernet_tokens]
key_repository = $B/fernet-keys
[fernet_receipts]
key_repository = $B/fernet-keys
[credential]
key_repository = $B/credential-keys
[identity]
password_hash_rounds = 4
[oslo_policy]
enforce_new_defaults = True
enforce_scope = True
CONF
KM="$V/bin/keystone-manage --config-file $B/etc/keystone.conf"
$KM db_sync > "$B/log/db_sync.log" 2>&1
$KM fernet_setup --keystone-user "$(id -un)" --keystone-group "$(id -gn)" >> "$B/log/db_sync.log" 2>&1
$KM credential_setup --keystone-user "$(id -un)" --keystone-group "$(id -gn)" >> "$B/log/db_sync.log" 2>&1
chmod 700 "$B/fernet-keys" "$B/credential-keys"
URL="http://127.0.0.1:$PORT"
$KM bootstrap --bootstrap-password "$PASS" --bootstrap-username admin \
   --bootstrap-project-name admin --bootstrap-role-name admin \
   --bootstrap-service-name keystone --bootstrap-region-id RegionOne \
   --bootstrap-admin-url "$URL/v3" --bootstrap-internal-url "$URL/v3" \
   --bootstrap-public-url "$URL/v3" >> "$B/log/db_sync.log" 2>&1
cat > "$B/etc/uwsgi.ini" <<INI
[uwsgi]
http-socket = 127.0.0.1:$PORT
add-header = Connection: close
module = keystone.wsgi.api:application
env = OS_KEYSTONE_CONFIG_FILES=$B/etc/keystone.conf
master = true
processes = 1
threads = 1
enable-threads = true
lazy-apps = true
need-app = true
die-on-term = true
buffer-size = 65535
pidfile = $B/uwsgi.pid
INI
"$V/bin/uwsgi" --ini "$B/etc/uwsgi.ini" --daemonize2 "$B/log/uwsgi.log" > "$B/log/uwsgi-start.log" 2>&1
code=000
for _ in $(seq 1 300); do
  code=$(curl -s -o /dev/null -w '%{http_code}' "$URL/v3" || true); [ "$code" = 200 ] && break; sleep 0.1
done
if [ "$code" != 200 ]; then
  echo "keystone did not come up; see $B/log/" >&2; tail -30 "$B/log/uwsgi.log" >&2 || true; exit 1
fi
cat > "$B/env.sh" <<ENV
export KS_URL=$URL/v3 KS_PID=$(cat "$B/uwsgi.pid")
export OS_AUTH_URL=$URL/v3 OS_USERNAME=admin OS_PASSWORD=$PASS OS_PROJECT_NAME=admin
export OS_USER_DOMAIN_ID=default OS_PROJECT_DOMAIN_ID=default OS_IDENTITY_API_VERSION=3 OS_REGION_NAME=RegionOne OS_INTERFACE=public
ENV
# What glance-api needs to check tokens with this Keystone (ks-setup.py creates the glance user).
cat > "$B/glance-authtoken.conf" <<CONF
[keystone_authtoken]
www_authenticate_uri = $URL
auth_url = $URL
auth_type = password
project_domain_name = Default
user_domain_name = Default
project_name = service
username = glance
password = glancepass
service_token_roles_required = true
# no token cache: a revoked token (a disabled or deleted user) is refused at once, not in 5 min
token_cache_time = -1
CONF
echo "keystone up at $URL/v3 (pid $(cat "$B/uwsgi.pid"))"
