#!/usr/bin/env bash
# Installs the two containerd versions Kybernate's tests run against, idempotently, as root.
#
# - containerd 1.6 and runc 1.1 from Debian 12 (bookworm) through apt: /usr/bin/containerd,
#   /usr/bin/ctr, /usr/bin/containerd-shim-runc-v2, /usr/bin/runc.
# - containerd 2.1 from Debian sid, unpacked with `dpkg -x` into a private prefix
#   ($KYBERNATE_CONTAINERD2_PREFIX, default /opt/kybernate/containerd2) so the system's
#   containerd 1.6 stays as it is. Its binaries need only glibc 2.34 and run unchanged from
#   $PREFIX/usr/bin. The .deb is fetched with a private apt sources list and lists directory,
#   like scripts/install-deps.sh does for CRIU.
#
# Which runc containerd uses: containerd-shim-runc-v2 runs the runtime option `BinaryName`,
# or else the first `runc` on containerd's PATH: bookworm's /usr/bin/runc 1.1.5. (A runc
# started through a private loader, as CRIU is, cannot re-exec /proc/self/exe for
# `runc init`, so sid's runc is not used.) CRIU 4.2 for checkpoints comes from the
# /usr/local/bin/criu wrapper that scripts/install-deps.sh installs.
set -euo pipefail

PREFIX=${KYBERNATE_CONTAINERD2_PREFIX:-/opt/kybernate/containerd2}
APT_STATE=$PREFIX/apt

source "$(dirname "$0")/apt-mirror.sh"

log() { echo "install-containerd: $*" >&2; }

[ "$(id -u)" = 0 ] || { log "must run as root"; exit 1; }

bookworm_packages=(containerd runc)
missing=()
for p in "${bookworm_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing from bookworm: ${missing[*]}"
  apt-get update -qq
  # Without systemd (CI, this VM) the package's postinst starts no daemon; tests start
  # their own private containerd.
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

containerd2_works() {
  [ -x "$PREFIX/usr/bin/containerd" ] &&
    "$PREFIX/usr/bin/containerd" --version 2>/dev/null | grep -q ' v\?2\.[1-9]'
}

private_apt() {
  apt-get -q -o APT::Sandbox::User=root -o Dir::Etc::SourceList="$APT_STATE/sources.list" \
    -o Dir::Etc::SourceParts=/dev/null -o Dir::State::Lists="$APT_STATE/lists" \
    -o Dir::Cache::Archives="$APT_STATE/archives" "$@"
}

if ! containerd2_works; then
  log "fetching containerd 2.x from Debian sid into $PREFIX"
  mkdir -p "$APT_STATE/lists/partial" "$APT_STATE/archives/partial" "$APT_STATE/debs"
  MIRROR=$(debian_mirror)
  cat >"$APT_STATE/sources.list" <<SOURCES
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $MIRROR sid main
SOURCES
  private_apt update -qq
  (
    cd "$APT_STATE/debs"
    rm -f ./*.deb
    private_apt download -qq containerd/sid
  )
  rm -rf "$PREFIX/root.new"
  mkdir -p "$PREFIX/root.new"
  for deb in "$APT_STATE"/debs/*.deb; do dpkg -x "$deb" "$PREFIX/root.new"; done
  rm -rf "$PREFIX/usr"
  mv "$PREFIX/root.new/usr" "$PREFIX/usr"
  rm -rf "$PREFIX/root.new"
fi

/usr/bin/containerd --version >/dev/null || { log "bookworm containerd does not run"; exit 1; }
containerd2_works || {
  log "containerd 2.x is not usable after install: $("$PREFIX/usr/bin/containerd" --version 2>&1 | head -1)"
  exit 1
}
log "containerd 1.x: $(/usr/bin/containerd --version)"
log "containerd 2.x: $("$PREFIX/usr/bin/containerd" --version) (in $PREFIX/usr/bin)"
log "runc for containerd: /usr/bin/runc $(/usr/bin/runc --version | head -1) (start containerd with /usr/bin before /usr/local/bin on PATH)"
