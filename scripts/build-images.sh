#!/usr/bin/env bash
# Builds the agent and controller images from already-built binaries, with buildah (no
# daemon needed) or docker when a Docker engine answers.
#
#   scripts/build-images.sh BIN_DIR [TAG]
#
# BIN_DIR holds kybernate-agent, kybernatectl, containerd-shim-kybernate-v1,
# kybernate-installer and kybernate-controller (target/release for `make images`); they are
# copied into the build contexts stripped. The base image comes from $BASE_IMAGE (default
# docker.io/library/debian:bookworm-slim); when it is the default and no engine has it,
# scripts/build-base-image.sh builds it locally. Images are named
# $IMAGE_PREFIX/kybernate-agent:TAG and $IMAGE_PREFIX/kybernate-controller:TAG
# (IMAGE_PREFIX defaults to kybernate, TAG to the workspace version). IMAGES limits the
# build to some of them (default "kybernate-agent kybernate-controller").
set -euo pipefail
cd "$(dirname "$0")/.."

BIN_DIR=${1:?usage: build-images.sh BIN_DIR [TAG]}
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
TAG=${2:-$VERSION}
PREFIX=${IMAGE_PREFIX:-kybernate}
BASE_IMAGE=${BASE_IMAGE:-docker.io/library/debian:bookworm-slim}
CRIU_PREFIX=${KYBERNATE_DEPS_PREFIX:-/opt/kybernate/deps}/root
REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)
WORK=${IMAGES_WORK_DIR:-target/images}

log() { echo "build-images: $*" >&2; }

if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
  engine=docker
elif command -v buildah >/dev/null; then
  engine=buildah
  [ "$BASE_IMAGE" != docker.io/library/debian:bookworm-slim ] || bash scripts/build-base-image.sh
else
  log "neither a Docker engine nor buildah is available; run scripts/install-image-tools.sh"
  exit 1
fi

read -r -a images <<<"${IMAGES:-kybernate-agent kybernate-controller}"
agent_bins=(kybernate-agent kybernatectl containerd-shim-kybernate-v1 kybernate-installer)
for b in "${agent_bins[@]}" kybernate-controller; do
  [ -x "$BIN_DIR/$b" ] || { log "$BIN_DIR/$b is missing; build it first (make build)"; exit 1; }
done
[ -x "$CRIU_PREFIX/usr/sbin/criu" ] || { log "CRIU prefix $CRIU_PREFIX is missing; run scripts/install-deps.sh"; exit 1; }

rm -rf "$WORK/agent" "$WORK/controller"
mkdir -p "$WORK/agent/bin" "$WORK/controller/bin"
for b in "${agent_bins[@]}"; do strip -o "$WORK/agent/bin/$b" "$BIN_DIR/$b"; done
strip -o "$WORK/controller/bin/kybernate-controller" "$BIN_DIR/kybernate-controller"
# CRIU's private prefix: criu and the libraries it loads, without the other tools that
# share the prefix, documentation or gconv modules.
cp -a "$CRIU_PREFIX" "$WORK/agent/criu"
c=$WORK/agent/criu
find "$c/usr/sbin" -mindepth 1 ! -name criu -exec rm -rf {} +
rm -rf "$c/usr/bin" "$c/usr/share" "$c/usr/lib/x86_64-linux-gnu/gconv" "$c/usr/lib/x86_64-linux-gnu/compel"
cp deploy/images/criu-wrapper.sh "$WORK/agent/criu-wrapper.sh"

build() {
  local name=$1
  local image=$PREFIX/$name:$TAG
  local args=(--build-arg "BASE_IMAGE=$BASE_IMAGE" --build-arg "VERSION=$VERSION" --build-arg "REVISION=$REVISION"
    -f "deploy/images/$name.Dockerfile" -t "$image")
  log "$engine: $image"
  if [ $engine = docker ]; then
    docker build "${args[@]}" "$WORK/${name#kybernate-}"
  else
    buildah bud --quiet --pull=never --isolation=chroot --network=host --layers=false "${args[@]}" \
      "$WORK/${name#kybernate-}" >/dev/null
  fi
}
for name in "${images[@]}"; do build "$name"; done

for name in "${images[@]}"; do
  if [ $engine = docker ]; then
    size=$(docker image inspect -f '{{.Size}}' "$PREFIX/$name:$TAG")
  else
    size=$(buildah images --format '{{.Size}}' "$PREFIX/$name:$TAG")
  fi
  log "$PREFIX/$name:$TAG size $size"
done
