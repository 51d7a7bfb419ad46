# The node agent image: kybernate-agent, kybernatectl, the containerd shim and the installer
# (the DaemonSet's init container), CRIU 4.2 in its private prefix, iptables for CRIU's
# network lock, nsenter (util-linux, in the base) for the installer and for CRIU.
#
# The build context is prepared by scripts/build-images.sh: bin/ holds the four release
# binaries, criu/ the private CRIU prefix that scripts/install-deps.sh installs
# (/opt/kybernate/deps/root: CRIU 4.2.1 from sid with the trixie C library it needs).
ARG BASE_IMAGE=docker.io/library/debian:bookworm-slim
FROM ${BASE_IMAGE}

ARG VERSION=0.0.0-dev
ARG REVISION=unknown
LABEL org.opencontainers.image.title="kybernate-agent" \
      org.opencontainers.image.description="Kybernate node agent: GPU-aware checkpoint/restore of containers with CRIU" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://example.invalid/kybernate"

RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends iptables ca-certificates \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log

COPY criu/ /opt/kybernate/deps/root/
COPY criu-wrapper.sh /usr/local/bin/criu
COPY bin/kybernate-agent bin/kybernatectl bin/containerd-shim-kybernate-v1 bin/kybernate-installer /usr/local/bin/

# The installer copies the shim that sits beside it onto the host.
CMD ["kybernate-agent"]
