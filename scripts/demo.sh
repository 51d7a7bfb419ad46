#!/usr/bin/env bash
# Installs what Kybernate needs, builds it, and runs the local checkpoint -> restore demo
# on the built-in default config. Run as root on Debian 12.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo build -p kybernate-agent --bins
target=${CARGO_TARGET_DIR:-target}
exec "$target/debug/kybernatectl" demo "$@"
