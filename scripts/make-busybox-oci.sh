#!/usr/bin/env bash
# Builds a small OCI image archive from Debian's busybox-static, for `ctr images import`.
#
#   make-busybox-oci.sh OUT.tar [IMAGE_NAME]
#
# IMAGE_NAME defaults to docker.io/kybernate/busybox:latest. The archive holds an OCI image
# layout: oci-layout, index.json (annotated with the image name, so ctr names the import),
# and sha256-addressed blobs for one uncompressed layer (the rootfs: /bin/busybox plus a
# symlink per applet, /tmp, /etc/passwd), the image config and the manifest. The output is
# reproducible: same busybox, same bytes. Needs busybox-static (installed with apt when
# missing and running as root), tar, sha256sum.
set -euo pipefail

log() { echo "make-busybox-oci: $*" >&2; }

[ $# -ge 1 ] && [ $# -le 2 ] || { log "usage: $0 OUT.tar [IMAGE_NAME]"; exit 2; }
out=$1
name=${2:-docker.io/kybernate/busybox:latest}
busybox=${BUSYBOX:-/bin/busybox}

# busybox-static's binary needs no libraries inside the image; Debian's plain busybox does.
if [ -z "${BUSYBOX:-}" ] && ! dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q "install ok installed"; then
  [ "$(id -u)" = 0 ] || { log "busybox-static is not installed (apt-get install busybox-static)"; exit 1; }
  log "installing busybox-static"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq busybox-static >/dev/null
fi
"$busybox" --list >/dev/null 2>&1 || { log "$busybox does not run"; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
rootfs=$work/rootfs
layout=$work/layout
mkdir -p "$rootfs/bin" "$rootfs/tmp" "$rootfs/etc" "$rootfs/proc" "$rootfs/sys" "$rootfs/dev" \
  "$layout/blobs/sha256"
chmod 1777 "$rootfs/tmp"
cp "$busybox" "$rootfs/bin/busybox"
for applet in $("$busybox" --list); do
  [ "$applet" = busybox ] || ln -sf busybox "$rootfs/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$rootfs/etc/passwd"
printf 'root:x:0:\n' >"$rootfs/etc/group"

layer=$work/layer.tar
tar --sort=name --mtime='@0' --owner=0 --group=0 --numeric-owner -C "$rootfs" -cf "$layer" .

# Moves a file into blobs/sha256 and prints its digest.
add_blob() {
  local digest
  digest=$(sha256sum "$1" | cut -d' ' -f1)
  mv "$1" "$layout/blobs/sha256/$digest"
  echo "$digest"
}
size_of() { stat -c %s "$layout/blobs/sha256/$1"; }

layer_digest=$(add_blob "$layer")
layer_size=$(size_of "$layer_digest")

printf '{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"Cmd":["/bin/sh"],"WorkingDir":"/"},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
  "$layer_digest" >"$work/config.json"
config_digest=$(add_blob "$work/config.json")
config_size=$(size_of "$config_digest")

printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}]}' \
  "$config_digest" "$config_size" "$layer_digest" "$layer_size" >"$work/manifest.json"
manifest_digest=$(add_blob "$work/manifest.json")
manifest_size=$(size_of "$manifest_digest")

tag=${name##*:}
case "$name" in *:*) ;; *) tag=latest ;; esac
printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"%s"}}]}' \
  "$manifest_digest" "$manifest_size" "$name" "$tag" >"$layout/index.json"
printf '{"imageLayoutVersion":"1.0.0"}' >"$layout/oci-layout"

tmp_out="$out.tmp.$$"
tar --sort=name --mtime='@0' --owner=0 --group=0 --numeric-owner -C "$layout" -cf "$tmp_out" oci-layout index.json blobs
mv "$tmp_out" "$out"
log "wrote $out ($name, manifest sha256:$manifest_digest)"
