#!/usr/bin/env bash
# Stop a glance-api started by start-glance.sh BASE (by its pidfile only).
set -u
BASE="$(realpath -m "${1:?usage: stop-glance.sh BASE}")"
[ -f "$BASE/uwsgi.pid" ] || exit 0
PID="$(cat "$BASE/uwsgi.pid")"
if kill -0 "$PID" 2>/dev/null; then
  kill -INT "$PID"
  for _ in $(seq 1 50); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$PID" 2>/dev/null && kill -KILL "$PID"
fi
rm -f "$BASE/uwsgi.pid"
