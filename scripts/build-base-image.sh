#!/usr/bin/env bash
# Builds the Debian bookworm slim base image locally, for machines without a registry:
# `debootstrap --variant=minbase bookworm` from Debian's package mirror, trimmed the way
# debian:bookworm-slim is (no docs, man pages, locales or apt lists), committed with buildah
# as docker.io/library/debian:bookworm-slim so that Dockerfiles build with --pull=never.
#
# The rootfs tarball is cached (KYBERNATE_BASE_CACHE), so only the first run needs the
# mirror; the image itself is rebuilt from the cache when buildah's storage lacks it.
# Idempotent; run as root.
set -euo pipefail

IMAGE=${BASE_IMAGE:-docker.io/library/debian:bookworm-slim}
CACHE=${KYBERNATE_BASE_CACHE:-/var/cache/kybernate/debian-bookworm-minbase.tar}

source "$(dirname "$0")/apt-mirror.sh"

log() { echo "build-base-image: $*" >&2; }

[ "$(id -u)" = 0 ] || { log "must run as root"; exit 1; }
for tool in buildah debootstrap; do
  command -v "$tool" >/dev/null || { log "$tool is missing; run scripts/install-image-tools.sh"; exit 1; }
done

if buildah inspect --type image "$IMAGE" >/dev/null 2>&1; then
  log "$IMAGE already present"
  exit 0
fi

if [ ! -s "$CACHE" ]; then
  work=$(mktemp -d /var/tmp/kybernate-base.XXXXXX)
  trap 'rm -rf "$work"' EXIT
  MIRROR=$(debian_mirror)
  log "debootstrap --variant=minbase bookworm from $MIRROR"
  debootstrap --variant=minbase bookworm "$work/rootfs" "$MIRROR" >"$work/debootstrap.log" 2>&1 \
    || { tail -20 "$work/debootstrap.log" >&2; log "debootstrap failed"; exit 1; }
  r=$work/rootfs
  # What debian:bookworm-slim leaves out.
  rm -rf "$r"/var/cache/apt/archives/*.deb "$r"/var/cache/apt/*.bin "$r"/var/lib/apt/lists/* \
    "$r"/usr/share/doc/* "$r"/usr/share/man/* "$r"/usr/share/info/* "$r"/var/log/*.log \
    "$r"/var/cache/debconf/*-old "$r"/var/lib/dpkg/*-old
  find "$r/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
  mkdir -p "$r/etc/dpkg/dpkg.cfg.d"
  printf 'path-exclude /usr/share/doc/*\npath-exclude /usr/share/man/*\npath-exclude /usr/share/locale/*\npath-include /usr/share/locale/locale.alias\n' \
    >"$r/etc/dpkg/dpkg.cfg.d/docker"
  : >"$r/etc/hostname"
  : >"$r/etc/resolv.conf"
  mkdir -p "$(dirname "$CACHE")"
  tar --numeric-owner -C "$r" -cf "$CACHE.tmp" .
  mv "$CACHE.tmp" "$CACHE"
  log "cached the rootfs at $CACHE ($(du -h "$CACHE" | cut -f1))"
fi

ctr=$(buildah from scratch)
trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
buildah add "$ctr" "$CACHE" / >/dev/null
buildah config --cmd bash --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$ctr"
buildah commit --quiet "$ctr" "$IMAGE" >/dev/null
log "committed $IMAGE"
