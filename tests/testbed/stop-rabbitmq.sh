#!/usr/bin/env bash
# Stop the RabbitMQ that start-rabbitmq.sh BASE started (by its node name, nothing else).
set -uo pipefail
BASE="$(realpath -m "${1:?usage: stop-rabbitmq.sh BASE}")"
[ -f "$BASE/env.sh" ] || exit 0
# shellcheck disable=SC1091
. "$BASE/env.sh"
rabbitmqctl -q stop >/dev/null 2>&1 || true
case "${RABBITMQ_DATA:-}" in /tmp/cachenode-rabbitmq.*) rm -rf "$RABBITMQ_DATA" ;; esac
echo "stopped rabbitmq $RABBITMQ_NODENAME"
