#!/usr/bin/env bash
# Start a real glance-api (Glance 33 under uWSGI, sqlite, fake-auth tokens) on 127.0.0.1.
#
#   tests/testbed/start-glance.sh BASE        writes BASE/env.sh (GLANCE_URL, GLANCE_PID); stop-glance.sh BASE
#
# Environment (all optional):
#   GLANCE_PORT      port (default: a free one)
#   GLANCE_FLAVOR    fakeauth+caching (default: Glance's image cache on, as a regional L2) | fakeauth
#                    | keystone (keystonemiddleware; its [keystone_authtoken] in GLANCE_EXTRA_CONF,
#                    written by start-keystone.sh as BASE/glance-authtoken.conf)
#   GLANCE_SHOW_LOCATIONS  show_image_direct_url/show_multiple_locations (default True; a real
#                    cloud hides them: the keystone bed says False)
#   GLANCE_STORE_CONF  replaces the file store sections (the Swift test bed uses it)
#   GLANCE_DB        sqlite file to use (default BASE/glance.sqlite): two glance-apis sharing one
#                    database and one store are a central Glance and a regional one
#   GLANCE_EXTRA_CONF  appended to glance-api.conf
#   GLANCE_TRANSPORT_URL  rabbit://user:pass@host:port/ : publish notifications there (messagingv2,
#                    exchange glance, routing key notifications.info); default: none sent.
#                    retry = 1: with the bus down, Glance's API answers anyway (a lost notice).
#
# What the real service needs, found the hard way:
# - Glance 33 has no standalone server any more: it runs as glance.wsgi.api:application in uWSGI.
# - uWSGI --http-socket closes every connection without saying so: "Connection: close" is added,
#   or clients that reuse the socket get resets.
# - glanceclient uploads with chunked encoding; uWSGI's 1 MiB chunk limit is too small for that.
# - the cache middleware (centralized_db driver) requires worker_self_reference_url.
# - paths must be absolute: a relative filesystem_store_datadir yields file://relative URLs.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TB="${CACHENODE_TESTBED:-$HOME/.cache/cachenode-testbed}"
V="$TB/venv"
BASE="$(realpath -m "${1:?usage: start-glance.sh BASE}")"
FLAVOR="${GLANCE_FLAVOR:-fakeauth+caching}"
PORT="${GLANCE_PORT:-$("$V/bin/python" -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])')}"

if [ -f "$BASE/uwsgi.pid" ] && kill -0 "$(cat "$BASE/uwsgi.pid")" 2>/dev/null; then
  echo "glance already running in $BASE" >&2; exit 1
fi
rm -rf "$BASE"
mkdir -p "$BASE"/{etc,log,locks,data/{images,staging,tasks,cache}}

STORE_CONF="${GLANCE_STORE_CONF:-[DEFAULT]
enabled_backends = local:file

[glance_store]
default_backend = local

[local]
filesystem_store_datadir = $BASE/data/images
}"

cat > "$BASE/etc/glance-api.conf" <<CONF
[DEFAULT]
log_file = $BASE/log/glance-api.log
show_image_direct_url = ${GLANCE_SHOW_LOCATIONS:-True}
show_multiple_locations = ${GLANCE_SHOW_LOCATIONS:-True}
image_cache_dir = $BASE/data/cache
image_cache_max_size = 10737418240
worker_self_reference_url = http://127.0.0.1:$PORT

[database]
connection = sqlite:///${GLANCE_DB:-$BASE/glance.sqlite}

[os_glance_staging_store]
filesystem_store_datadir = $BASE/data/staging

[os_glance_tasks_store]
filesystem_store_datadir = $BASE/data/tasks

[paste_deploy]
flavor = $FLAVOR
config_file = $BASE/etc/glance-api-paste.ini

[oslo_policy]
enforce_new_defaults = True

[oslo_concurrency]
lock_path = $BASE/locks

$STORE_CONF
${GLANCE_EXTRA_CONF:-}
CONF
if [ -n "${GLANCE_TRANSPORT_URL:-}" ]; then
  printf '\n[DEFAULT]\ntransport_url = %s\n\n[oslo_messaging_notifications]\ndriver = messagingv2\nretry = 1\n' \
    "$GLANCE_TRANSPORT_URL" >> "$BASE/etc/glance-api.conf"
fi

cat > "$BASE/etc/glance-api-paste.ini" <<PASTE
[composite:glance-api-$FLAVOR]
paste.composite_factory = glance.api:root_app_factory
/: api

[composite:api]
paste.composite_factory = glance.api:pipeline_factory
fakeauth = versionnegotiation fakeauth context rootapp
fakeauth+caching = versionnegotiation fakeauth context cache rootapp
fakeauth+cachemanagement = versionnegotiation fakeauth context cache cachemanage rootapp
keystone = versionnegotiation authtoken context rootapp

[composite:rootapp]
paste.composite_factory = glance.api:root_app_factory
/: apiversions
/v2: apiv2app

[app:apiversions]
paste.app_factory = glance.api.versions:create_resource

[app:apiv2app]
paste.app_factory = glance.api.v2.router:API.factory

[filter:versionnegotiation]
paste.filter_factory = glance.api.middleware.version_negotiation:VersionNegotiationFilter.factory

[filter:fakeauth]
paste.filter_factory = fakeauth:filter_factory
revoked_tokens_file = $BASE/revoked_tokens

[filter:authtoken]
paste.filter_factory = keystonemiddleware.auth_token:filter_factory
# false: an invalid X-Service-Token is refused here (401), so tests see what reached Glance
delay_auth_decision = false

[filter:context]
paste.filter_factory = glance.api.middleware.context:ContextMiddleware.factory

[filter:cache]
paste.filter_factory = glance.api.middleware.cache:CacheFilter.factory

[filter:cachemanage]
paste.filter_factory = glance.api.middleware.cache_manage:CacheManageFilter.factory
PASTE

cat > "$BASE/etc/uwsgi.ini" <<INI
[uwsgi]
http-socket = 127.0.0.1:$PORT
add-header = Connection: close
module = glance.wsgi.api:application
pythonpath = $HERE
env = OS_GLANCE_CONFIG_DIR=$BASE/etc
master = true
processes = 1
threads = 8
enable-threads = true
lazy-apps = true
need-app = true
die-on-term = true
buffer-size = 65535
chunked-input-limit = 16777216
pidfile = $BASE/uwsgi.pid
INI

"$V/bin/glance-manage" --config-file "$BASE/etc/glance-api.conf" db_sync > "$BASE/log/db_sync.log" 2>&1
"$V/bin/uwsgi" --ini "$BASE/etc/uwsgi.ini" --daemonize2 "$BASE/log/uwsgi.log" > "$BASE/log/uwsgi-start.log" 2>&1
URL="http://127.0.0.1:$PORT"
code=000
for _ in $(seq 1 300); do
  code=$(curl -s -o /dev/null -w '%{http_code}' "$URL/versions" || true)
  [ "$code" = 200 ] && break
  sleep 0.1
done
if [ "$code" != 200 ]; then
  echo "glance-api did not come up; see $BASE/log/" >&2
  tail -30 "$BASE/log/uwsgi.log" >&2 || true
  exit 1
fi
printf 'export GLANCE_URL=%s\nexport GLANCE_PID=%s\nexport GLANCE_BASE=%s\n' \
  "$URL" "$(cat "$BASE/uwsgi.pid")" "$BASE" > "$BASE/env.sh"
echo "glance-api up at $URL (pid $(cat "$BASE/uwsgi.pid"), flavor $FLAVOR)"
