#!/bin/sh
# `criu` in the agent image: CRIU 4.2 from the image's private prefix, started through that
# prefix's loader with the C library it was built for.
#
# CRIU checkpoints a process relative to its own namespaces: a process whose mount, network,
# UTS, IPC or cgroup namespace differs from CRIU's is taken to own that namespace, so from
# the agent's container CRIU would dump the host's whole mount table and network. In the
# DaemonSet (hostPID, the pod's own other namespaces) CRIU therefore runs in the host's
# namespaces: those of the nearest ancestor in another mount namespace (the container
# runtime's shim; PID 1 is not used, some hosts hide its namespaces even from root), loading
# this image's CRIU through /proc/<agent>/root. Image and log paths are then host paths,
# which is why the agent's state, tier and socket directories are host mounts at the same
# paths (the agent checks that at start).
P=/opt/kybernate/deps/root
LIB=usr/lib/x86_64-linux-gnu
own=$(readlink /proc/self/ns/mnt)
host=
pid=$PPID
while [ -z "$KYBERNATE_CRIU_SAME_NS" ] && [ "${pid:-0}" -gt 1 ]; do
  if [ "$(readlink "/proc/$pid/ns/mnt")" != "$own" ]; then host=$pid; break; fi
  pid=$(sed -n 's/^PPid:[[:space:]]*//p' "/proc/$pid/status" 2>/dev/null)
done
if [ -n "$host" ]; then
  R=/proc/$PPID/root$P
  exec nsenter --target "$host" --mount --uts --ipc --net --cgroup -- \
    "$R/$LIB/ld-linux-x86-64.so.2" --library-path "$R/$LIB" "$R/usr/sbin/criu" "$@"
fi
exec "$P/$LIB/ld-linux-x86-64.so.2" --library-path "$P/$LIB" "$P/usr/sbin/criu" "$@"
