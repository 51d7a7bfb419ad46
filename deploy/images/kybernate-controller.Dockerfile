# The controller image: kybernate-controller alone, on the C library and CA certificates
# of the bookworm slim base and nothing else (no shell, no package manager). It runs as
# uid 65532 and writes nothing to its root filesystem, so readOnlyRootFilesystem works.
#
# The build context is prepared by scripts/build-images.sh: bin/kybernate-controller.
ARG BASE_IMAGE=docker.io/library/debian:bookworm-slim
FROM ${BASE_IMAGE} AS base

# The Kubernetes client's TLS stack loads the system's CA bundle at start and refuses to run
# without one, so the image carries Debian's.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates \
 && mkdir -p /runtime/etc/ssl/certs \
 && cp -L /etc/ssl/certs/ca-certificates.crt /runtime/etc/ssl/certs/ca-certificates.crt
RUN mkdir -p /runtime/etc /runtime/lib/x86_64-linux-gnu /runtime/lib64 /runtime/tmp \
 && cp -L /lib/x86_64-linux-gnu/libc.so.6 /lib/x86_64-linux-gnu/libm.so.6 \
          /lib/x86_64-linux-gnu/libgcc_s.so.1 /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 \
          /runtime/lib/x86_64-linux-gnu/ \
 && ln -s /lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 /runtime/lib64/ld-linux-x86-64.so.2 \
 && echo 'nonroot:x:65532:65532:nonroot:/nonexistent:/usr/sbin/nologin' >/runtime/etc/passwd \
 && echo 'nonroot:x:65532:' >/runtime/etc/group \
 && chmod 1777 /runtime/tmp

FROM scratch
ARG VERSION=0.0.0-dev
ARG REVISION=unknown
LABEL org.opencontainers.image.title="kybernate-controller" \
      org.opencontainers.image.description="Kybernate operator: GpuCheckpoint, GpuRestore and GpuWorkload reconcilers" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://example.invalid/kybernate"
COPY --from=base /runtime/ /
COPY bin/kybernate-controller /usr/local/bin/kybernate-controller
ENV PATH=/usr/local/bin
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/kybernate-controller"]
