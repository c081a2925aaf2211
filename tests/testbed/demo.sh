#!/usr/bin/env bash
# The main job, end to end on this machine: a real glance-api (with its image cache, as a regional
# L2), cachenode in front of it, an image uploaded through cachenode with the real glance CLI, then
# downloaded twice: the first download is a MISS filled from Glance, the second a HIT from local disk.
# Leaves nothing running. Run it through `make demo`, which installs everything first.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TB="${CACHENODE_TESTBED:-$HOME/.cache/cachenode-testbed}"
WORK="$(mktemp -d /tmp/cachenode-demo.XXXXXX)"
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
PORT=$(free_port); ADMIN=$(free_port)
TOKEN='alice:projA:reader,member'

cleanup() {
  [ -n "${CN_PID:-}" ] && kill "$CN_PID" 2>/dev/null && wait "$CN_PID" 2>/dev/null
  "$HERE/stop-glance.sh" "$WORK/glance"
  rm -rf "$WORK"
}
trap cleanup EXIT

echo "== starting a real glance-api (Glance 33, uWSGI, image cache on)"
"$HERE/start-glance.sh" "$WORK/glance"
. "$WORK/glance/env.sh"

cat > "$WORK/cachenode.yaml" <<YAML
listen: 127.0.0.1:$PORT
glance:
  url: $GLANCE_URL
cache:
  dir: $WORK/cache
admin:
  listen: 127.0.0.1:$ADMIN
YAML
echo "== starting cachenode on 127.0.0.1:$PORT in front of it"
cachenode check-config -c "$WORK/cachenode.yaml"
cachenode serve -c "$WORK/cachenode.yaml" 2> "$WORK/cachenode.log" &
CN_PID=$!
for _ in $(seq 1 100); do curl -sf -o /dev/null "http://127.0.0.1:$ADMIN/readyz" && break; sleep 0.1; done

echo "== uploading a 64 MiB image with the glance CLI, through cachenode"
head -c $((64 << 20)) /dev/urandom > "$WORK/image.raw"
"$TB/venv/bin/glance" --os-image-url "http://127.0.0.1:$PORT" --os-auth-token "$TOKEN" \
  image-create --name cachenode-demo --disk-format raw --container-format bare \
  --file "$WORK/image.raw" > "$WORK/create.txt"
ID=$(awk '$2 == "id" {print $4}' "$WORK/create.txt")
echo "   image $ID, sha512 $(sha512sum "$WORK/image.raw" | cut -c1-16)..."

for n in 1 2; do
  echo "== download $n"
  curl -s -o "$WORK/out.raw" -D "$WORK/headers" -w '   %{size_download} bytes in %{time_total}s\n' \
    -H "X-Auth-Token: $TOKEN" "http://127.0.0.1:$PORT/v2/images/$ID/file"
  tr -d '\r' < "$WORK/headers" | grep -i '^x-cachenode' | sed 's/^/   /'
  cmp -s "$WORK/out.raw" "$WORK/image.raw" && echo "   bytes identical to the upload"
done

echo "== the glance CLI downloads through cachenode and checks the hash itself"
"$TB/venv/bin/glance" --os-image-url "http://127.0.0.1:$PORT" --os-auth-token "$TOKEN" \
  image-download --file "$WORK/cli.raw" "$ID"
cmp -s "$WORK/cli.raw" "$WORK/image.raw" && echo "   glance image-download: ok"

echo "== a few of cachenode's metrics (http://127.0.0.1:$ADMIN/metrics)"
curl -s "http://127.0.0.1:$ADMIN/metrics" \
  | grep -E '^cachenode_(requests_total|fills_total|served_bytes_total|upstream_bytes_total|cache_bytes)[{ ]' | grep -v ' 0.0$'
