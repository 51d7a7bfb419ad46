#!/usr/bin/env bash
# Installs what the agent and the demo need on a Debian 12 machine, idempotently, as root.
# The test command adds what only the tests use (scripts/install-test-deps.sh).
#
# - bookworm packages: iptables (CRIU's network lock), protobuf-compiler (protoc: the
#   containerd-client crate generates containerd's API in its build.rs; our own proto/ crate
#   uses protox);
# - CRIU 4.2.1 from Debian sid, unpacked with the trixie C library it needs into a private
#   prefix (bookworm's glibc 2.36 is too old and must not be upgraded), with a wrapper script
#   on PATH that starts it through that prefix's loader;
set -euo pipefail

PREFIX=${KYBERNATE_DEPS_PREFIX:-/opt/kybernate/deps}
BIN_DIR=${KYBERNATE_BIN_DIR:-/usr/local/bin}
APT_STATE=$PREFIX/apt

source "$(dirname "$0")/apt-mirror.sh"

log() { echo "install-deps: $*" >&2; }

[ "$(id -u)" = 0 ] || { log "must run as root"; exit 1; }

bookworm_packages=(iptables ca-certificates util-linux protobuf-compiler)
missing=()
for p in "${bookworm_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing from bookworm: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

sid_packages=(criu libcompel1 libnet9 libnl-3-200)
trixie_packages=(libc6 libprotobuf-c1 libnftables1 libgnutls30t64 libbsd0 libunistring5
  libidn2-0 libtasn1-6 libnettle8t64 libhogweed6t64 libgmp10 libp11-kit0 libnftnl11
  libxtables12 libjansson4 libmnl0 libffi8 libuuid1 libmd0 libseccomp2)

private_apt() {
  apt-get -q -o APT::Sandbox::User=root -o Dir::Etc::SourceList="$APT_STATE/sources.list" \
    -o Dir::Etc::SourceParts=/dev/null -o Dir::State::Lists="$APT_STATE/lists" \
    -o Dir::Cache::Archives="$APT_STATE/archives" "$@"
}

criu_works() {
  [ -x "$BIN_DIR/criu" ] && "$BIN_DIR/criu" --version 2>/dev/null | grep -q 'Version: 4\.[2-9]'
}

# Earlier versions of this script wrapped sid's runc the same way; that wrapper breaks
# `runc create`, so it is removed.
if [ -f "$BIN_DIR/runc" ] && grep -q "Kybernate's private prefix" "$BIN_DIR/runc"; then
  rm -f "$BIN_DIR/runc"
fi

if ! criu_works; then
  log "fetching CRIU 4.2 from Debian sid into $PREFIX"
  mkdir -p "$APT_STATE/lists/partial" "$APT_STATE/archives/partial" "$APT_STATE/debs"
  MIRROR=$(debian_mirror)
  cat >"$APT_STATE/sources.list" <<SOURCES
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR sid main
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR trixie main
SOURCES
  private_apt update -qq
  (
    cd "$APT_STATE/debs"
    rm -f ./*.deb
    for p in "${sid_packages[@]}"; do private_apt download -qq "$p/sid"; done
    for p in "${trixie_packages[@]}"; do private_apt download -qq "$p/trixie"; done
  )
  rm -rf "$PREFIX/root.new"
  mkdir -p "$PREFIX/root.new"
  for deb in "$APT_STATE"/debs/*.deb; do dpkg -x "$deb" "$PREFIX/root.new"; done
  rm -rf "$PREFIX/root"
  mv "$PREFIX/root.new" "$PREFIX/root"
  root=$PREFIX/root
  cat >"$BIN_DIR/criu" <<WRAPPER
#!/bin/sh
# Runs criu from Kybernate's private CRIU prefix with the C library it was built for.
exec $root/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 --library-path $root/usr/lib/x86_64-linux-gnu $root/usr/sbin/criu "\$@"
WRAPPER
  chmod 0755 "$BIN_DIR/criu"
fi

criu_works || { log "CRIU 4.2+ is not usable after install: $("$BIN_DIR/criu" --version 2>&1 | head -1)"; exit 1; }
log "criu: $("$BIN_DIR/criu" --version | head -1)"

