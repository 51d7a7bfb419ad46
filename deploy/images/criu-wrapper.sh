#!/bin/sh
# `criu` in the agent image: CRIU 4.2 from the image's private prefix, started through that
# prefix's loader with the C library it was built for.
#
# CRIU reads the mount table of its own mount namespace and fails on processes in another
# one, so in the DaemonSet (hostPID, own mount namespace) it must run in the host's mount
# namespace: it enters PID 1's and loads this image's CRIU through /proc/<agent>/root. Image
# and log paths are then host paths, which is why the agent's state and tier directories
# are host mounts at the same paths (the agent checks that at start).
P=/opt/kybernate/deps/root
LIB=usr/lib/x86_64-linux-gnu
if [ -z "$KYBERNATE_CRIU_SAME_NS" ] && [ -r /proc/1/ns/mnt ] &&
  [ "$(readlink /proc/1/ns/mnt)" != "$(readlink /proc/self/ns/mnt)" ]; then
  R=/proc/$PPID/root$P
  exec nsenter --target 1 --mount -- "$R/$LIB/ld-linux-x86-64.so.2" --library-path "$R/$LIB" "$R/usr/sbin/criu" "$@"
fi
exec "$P/$LIB/ld-linux-x86-64.so.2" --library-path "$P/$LIB" "$P/usr/sbin/criu" "$@"
