#!/usr/bin/env bash
# Stop what start-swift.sh BASE started (the PIDs it recorded, nothing else).
set -u
BASE="$(realpath -m "${1:?usage: stop-swift.sh BASE}")"
[ -f "$BASE/pids" ] || exit 0
PIDS=$(cat "$BASE/pids")
kill -TERM $PIDS 2>/dev/null || true
for _ in $(seq 1 50); do
  alive=0; for p in $PIDS; do kill -0 "$p" 2>/dev/null && alive=1; done
  [ $alive = 0 ] && break; sleep 0.1
done
for p in $PIDS; do kill -0 "$p" 2>/dev/null && kill -KILL "$p"; done
rm -f "$BASE/pids"
