#!/usr/bin/env bash
# Start a real glance-api whose store is the test bed's Swift (started by start-swift.sh):
# glance_store's single-tenant swift driver, container "glance", object name = image id, its
# credentials in a reference file, Keystone v3 through the shim.
#
#   tests/testbed/start-glance-swift.sh GLANCE_BASE SWIFT_BASE     stop with stop-glance.sh
#
# GLANCE_SWIFT_LARGE_OBJECT_MB: images at least this large are written as segments plus a
# manifest (default 5120 as in glance_store; the tests lower it to exercise manifests).
# GLANCE_SWIFT_CONTAINERS_SEED: glance_store's swift_store_multiple_containers_seed (default 0:
# one container); with N, an image lives in container "glance_<first N characters of its id>".
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
GBASE="$(realpath -m "${1:?usage: start-glance-swift.sh GLANCE_BASE SWIFT_BASE}")"
SBASE="$(realpath -m "${2:?usage: start-glance-swift.sh GLANCE_BASE SWIFT_BASE}")"
# shellcheck disable=SC1091
. "$SBASE/env.sh"
mkdir -p "$GBASE.conf"
REF="$GBASE.conf/swift-refs.conf"
cat > "$REF" <<CONF
[ref1]
auth_version = 3
auth_address = $SWIFT_KEYSTONE
user = glance:glance
key = glancepass
user_domain_id = default
project_domain_id = default
CONF
export GLANCE_STORE_CONF="[DEFAULT]
enabled_backends = swift1:swift

[glance_store]
default_backend = swift1

[swift1]
swift_store_config_file = $REF
default_swift_reference = ref1
swift_store_container = glance
swift_store_create_container_on_put = True
swift_store_large_object_size = ${GLANCE_SWIFT_LARGE_OBJECT_MB:-5120}
swift_store_large_object_chunk_size = ${GLANCE_SWIFT_CHUNK_MB:-200}
swift_store_multiple_containers_seed = ${GLANCE_SWIFT_CONTAINERS_SEED:-0}
"
exec "$HERE/start-glance.sh" "$GBASE"
