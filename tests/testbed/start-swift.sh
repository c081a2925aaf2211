#!/usr/bin/env bash
# Start a one-node Swift on 127.0.0.1 (swift 2.38.3 from PyPI in the test bed's swift venv):
# account, container, object and proxy servers, tempauth + tempurl, one replica on a plain
# folder, a private memcached (Debian's `memcached`, which tempauth keeps tokens in), and a
# Keystone-v3 shim (keystone_shim.py) for glance_store, whose swift driver only speaks Keystone v3.
#
#   tests/testbed/start-swift.sh BASE      writes BASE/env.sh; stop-swift.sh BASE
#
# Accounts (tempauth): glance:glance / glancepass (.admin, the account Glance stores images in),
#                      test:tester / testing (.admin)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TB="${CACHENODE_TESTBED:-$HOME/.cache/cachenode-testbed}"
V="$TB/swiftvenv"
BASE="$(realpath -m "${1:?usage: start-swift.sh BASE}")"
command -v memcached >/dev/null || { echo "start-swift.sh: needs memcached (apt-get install memcached)" >&2; exit 1; }
freeport() { "$V/bin/python" -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
PPORT=${SWIFT_PORT:-$(freeport)}; APORT=$(freeport); CPORT=$(freeport); OPORT=$(freeport); MPORT=$(freeport); KPORT=$(freeport)

rm -rf "$BASE"; mkdir -p "$BASE"/{etc,srv/d1,cache,log}
cat > "$BASE/etc/swift.conf" <<CONF
[swift-hash]
swift_hash_path_suffix = cachenode-testbed
swift_hash_path_prefix = cachenode-testbed

[storage-policy:0]
name = gold
default = yes
CONF

server_conf() {  # name port
  cat <<CONF
[DEFAULT]
bind_ip = 127.0.0.1
bind_port = $2
workers = 0
user = $(id -un)
swift_dir = $BASE/etc
devices = $BASE/srv
mount_check = false
disable_fallocate = true
log_name = $1
log_level = INFO
CONF
}
for s in account:$APORT container:$CPORT object:$OPORT; do
  n=${s%%:*}; p=${s##*:}
  { server_conf "$n" "$p"; cat <<CONF

[pipeline:main]
pipeline = healthcheck $n-server

[app:$n-server]
use = egg:swift#$n

[filter:healthcheck]
use = egg:swift#healthcheck
CONF
  } > "$BASE/etc/$n-server.conf"
done
{ server_conf proxy "$PPORT"; cat <<CONF

[pipeline:main]
pipeline = catch_errors gatekeeper healthcheck proxy-logging cache listing_formats tempurl tempauth copy slo dlo proxy-logging proxy-server

[app:proxy-server]
use = egg:swift#proxy
account_autocreate = true
allow_account_management = true

[filter:tempauth]
use = egg:swift#tempauth
user_glance_glance = glancepass .admin
user_test_tester = testing .admin

[filter:tempurl]
use = egg:swift#tempurl

[filter:cache]
use = egg:swift#memcache
memcache_servers = 127.0.0.1:$MPORT

[filter:catch_errors]
use = egg:swift#catch_errors
[filter:gatekeeper]
use = egg:swift#gatekeeper
[filter:healthcheck]
use = egg:swift#healthcheck
[filter:proxy-logging]
use = egg:swift#proxy_logging
[filter:listing_formats]
use = egg:swift#listing_formats
[filter:copy]
use = egg:swift#copy
[filter:slo]
use = egg:swift#slo
[filter:dlo]
use = egg:swift#dlo
CONF
} > "$BASE/etc/proxy-server.conf"

cd "$BASE/etc"
for r in account:$APORT container:$CPORT object:$OPORT; do
  n=${r%%:*}; p=${r##*:}
  "$V/bin/swift-ring-builder" $n.builder create 6 1 1 >/dev/null
  "$V/bin/swift-ring-builder" $n.builder add --region 1 --zone 1 --ip 127.0.0.1 --port $p --device d1 --weight 100 >/dev/null
  "$V/bin/swift-ring-builder" $n.builder rebalance >/dev/null
done

: > "$BASE/pids"
memcached -l 127.0.0.1 -p "$MPORT" -U 0 -m 64 -u "$(id -un)" > "$BASE/log/memcached.log" 2>&1 &
echo $! >> "$BASE/pids"
for n in account container object proxy; do
  "$V/bin/swift-$n-server" "$BASE/etc/$n-server.conf" -v > "$BASE/log/$n.log" 2>&1 &
  echo $! >> "$BASE/pids"
done
"$V/bin/python" "$HERE/keystone_shim.py" "$KPORT" "http://127.0.0.1:$PPORT" > "$BASE/log/keystone_shim.log" 2>&1 &
echo $! >> "$BASE/pids"

URL="http://127.0.0.1:$PPORT"
token="" storage=""
for _ in $(seq 1 150); do
  headers=$(curl -s -D - -o /dev/null -H 'X-Storage-User: glance:glance' -H 'X-Storage-Pass: glancepass' "$URL/auth/v1.0" | tr -d '\r' || true)
  token=$(awk -F': ' 'tolower($1)=="x-auth-token"{print $2}' <<< "$headers")
  storage=$(awk -F': ' 'tolower($1)=="x-storage-url"{print $2}' <<< "$headers")
  if [ -n "$token" ] && [ "$(curl -s -o /dev/null -w '%{http_code}' -H "X-Auth-Token: $token" "$storage")" = 204 ]; then
    break
  fi
  token=""
  sleep 0.1
done
if [ -z "$token" ]; then
  echo "swift did not come up; logs in $BASE/log" >&2; tail -20 "$BASE"/log/*.log >&2; exit 1
fi
cat > "$BASE/env.sh" <<ENV
export SWIFT_URL=$URL
export SWIFT_STORAGE_URL=$storage
export SWIFT_KEYSTONE=http://127.0.0.1:$KPORT/v3
export SWIFT_BASE=$BASE
ENV
echo "swift up at $URL (glance's account: $storage)"
