#!/usr/bin/env bash
# Sourced by the install scripts: prints the Debian archive this machine's own apt
# configuration uses, so that the private sid/trixie fetches and debootstrap go to the same
# mirror as apt itself (a user behind their own mirror is served by it). Reads deb822
# `/etc/apt/sources.list.d/*.sources` files and one-line `sources.list` entries, and takes
# the first URI that serves the Debian archive (suites named after a release, not the
# security archive). DEBIAN_MIRROR overrides it.

debian_mirror() {
  if [ -n "${DEBIAN_MIRROR:-}" ]; then
    echo "$DEBIAN_MIRROR"
    return 0
  fi
  local uri
  uri=$(
    {
      for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        # deb822 stanzas: print "URI SUITES" for every enabled deb stanza.
        awk 'BEGIN { RS=""; FS="\n" }
          {
            uris=""; suites=""; types=""; enabled="yes"
            for (i = 1; i <= NF; i++) {
              if ($i ~ /^URIs:/) { uris = substr($i, 6) }
              else if ($i ~ /^Suites:/) { suites = substr($i, 8) }
              else if ($i ~ /^Types:/) { types = substr($i, 7) }
              else if ($i ~ /^Enabled:/) { enabled = substr($i, 9) }
            }
            if (types ~ /deb([^-]|$)/ && enabled !~ /no/) {
              n = split(uris, u, " ")
              for (j = 1; j <= n; j++) print u[j], suites
            }
          }' "$f"
      done
      for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        # One-line style: deb [options] URI SUITE COMPONENTS...
        sed -e 's/\[[^]]*\]//' "$f" | awk '$1 == "deb" { print $2, $3 }'
      done
    } | awk '$0 !~ /security/ && $2 ~ /^(bookworm|trixie|sid|stable|testing|unstable)/ { print $1; exit }'
  )
  if [ -z "$uri" ]; then
    echo "apt-mirror: no Debian archive found in /etc/apt/sources.list or sources.list.d; set DEBIAN_MIRROR" >&2
    return 1
  fi
  echo "${uri%/}"
}
