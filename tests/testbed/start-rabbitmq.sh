#!/usr/bin/env bash
# Start a private RabbitMQ (Debian's rabbitmq-server) on 127.0.0.1: its own node name, ports and
# data dir, so it never meets the packaged service (which .ci/run stops) or another test run's.
#
#   tests/testbed/start-rabbitmq.sh BASE [PORT]   writes BASE/env.sh (TRANSPORT_URL, RABBITMQ_*)
#   tests/testbed/stop-rabbitmq.sh BASE
#
# Starting again with the same PORT is a restarted bus (fresh data: nothing survives, as after a
# broker lost its non-durable queues). Ready in about 3-5 s.
# What it needs, found the hard way:
# - run as root, rabbitmq-server drops to the user rabbitmq: its data must be owned by it, or
#   "failed to open log file ... permission denied", and every parent must let it through (pytest's
#   tmp dirs are 0700): "failed_to_create_feature_flags_file_directory". So its data goes in a
#   directory of its own under /tmp (BASE/data links to it; stop-rabbitmq.sh removes it);
# - guest may log in only from loopback unless loopback_users = none;
# - each instance needs its own node name and distribution port (ERL_EPMD_ADDRESS keeps epmd local).
set -euo pipefail
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
BASE="$(realpath -m "${1:?usage: start-rabbitmq.sh BASE [PORT]}")"
PORT="${2:-$(free_port)}"
DIST="$(free_port)"
if [ -f "$BASE/env.sh" ]; then "$(dirname "${BASH_SOURCE[0]}")/stop-rabbitmq.sh" "$BASE" >/dev/null; fi
rm -rf "$BASE"
mkdir -p "$BASE"
D="$(mktemp -d /tmp/cachenode-rabbitmq.XXXXXX)"
chmod 755 "$D"
ln -s "$D" "$BASE/data"
mkdir -p "$D"/{mnesia,log}
echo "[]." > "$D/enabled_plugins"
printf 'loopback_users = none\nlisteners.tcp.default = 127.0.0.1:%s\n' "$PORT" > "$D/rabbitmq.conf"
NODE="cn$PORT@localhost"
cat > "$BASE/env.sh" <<ENV
export RABBITMQ_NODENAME=$NODE RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 RABBITMQ_NODE_PORT=$PORT
export RABBITMQ_DIST_PORT=$DIST RABBITMQ_MNESIA_BASE=$D/mnesia RABBITMQ_LOG_BASE=$D/log
export RABBITMQ_CONFIG_FILE=$D/rabbitmq RABBITMQ_ENABLED_PLUGINS_FILE=$D/enabled_plugins
export ERL_EPMD_ADDRESS=127.0.0.1 RABBITMQ_DATA=$D
export TRANSPORT_URL=rabbit://guest:guest@127.0.0.1:$PORT/
ENV
if id rabbitmq >/dev/null 2>&1; then chown -R rabbitmq:rabbitmq "$D"; fi
# shellcheck disable=SC1091
. "$BASE/env.sh"
setsid rabbitmq-server > "$BASE/server.out" 2>&1 < /dev/null &
echo $! > "$BASE/launcher.pid"
for _ in $(seq 120); do
  rabbitmqctl -q status >/dev/null 2>&1 && break
  kill -0 "$(cat "$BASE/launcher.pid")" 2>/dev/null || break  # it died: no point waiting
  sleep 0.5
done
if ! rabbitmqctl -q status >/dev/null 2>&1; then tail -20 "$BASE/server.out" >&2; exit 1; fi
echo "rabbitmq up: $TRANSPORT_URL (node $NODE)"
