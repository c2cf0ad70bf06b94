#!/usr/bin/env bash
# libvirt 9.0, Debian 12's own, beside the installed libvirt (11.3), without
# installing it: its packages are downloaded and unpacked into a cache
# folder, and a command runs in a private mount namespace where that 9.0 is
# the host's libvirt — daemon, client library and virsh — with its own
# /run/libvirt, /var/lib/libvirt, /var/cache/libvirt, /var/log/libvirt and
# /etc/libvirt. The host's files and its own libvirtd are never touched.
#
#   tests/support/libvirt9.sh fetch          # download + unpack (reused when present; needs root)
#   tests/support/libvirt9.sh run -- CMD...  # CMD with a 9.0 libvirtd for qemu:///system (needs root)
#   tests/support/libvirt9.sh version        # the unpacked daemon's version
#
# For example:
#   bash tests/support/libvirt9.sh run -- cargo test --locked --test daemon --test kills -- conformance:: e2e_libvirt::
#
# `run` starts the daemon with tests/support/libvirt.sh (so a test that
# restarts it through that script restarts this one), passes CMD's exit
# code through, destroys whatever domain CMD left running and stops the
# daemon by the pid in its own pid file, never by name. Each run has its
# own folders under $CKPTSTORE_LIBVIRT9_DIR/run.*, removed after a
# successful run and kept after a failed one (the daemon's log is there).
#
# The cache lives in $CKPTSTORE_LIBVIRT9_DIR (default /var/tmp/ckptstore-libvirt9).
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
CACHE=${CKPTSTORE_LIBVIRT9_DIR:-/var/tmp/ckptstore-libvirt9}
ROOT="$CACHE/root"
STAMP="$ROOT/.ckptstore-packages"
SUITE=bookworm
# The daemon with its qemu driver, the client library and virsh; libyajl2
# and libpcap0.8 are libraries 9.0 needs that 11.3 does not.
PACKAGES=(libvirt0 libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
  libyajl2 libpcap0.8)
LIB=usr/lib/x86_64-linux-gnu

log() { echo "libvirt9.sh: $*" >&2; }

need_root() {
  [ "$(id -u)" = 0 ] || { log "$1 needs root"; exit 1; }
}

fetch() {
  if [ -s "$STAMP" ]; then
    return 0
  fi
  need_root "downloading libvirt 9.0"
  mkdir -p "$CACHE"
  local tmp
  tmp=$(mktemp -d "$CACHE/fetch.XXXXXX")
  local args=()
  for p in "${PACKAGES[@]}"; do args+=("$p/$SUITE"); done
  # `apt-get download` writes into the current folder; as root it would
  # hand the download to the _apt user, who cannot write there.
  if ! (cd "$tmp" && apt-get -qq -o APT::Sandbox::User=root download "${args[@]}" >&2); then
    log "package lists missing or stale: apt-get update"
    apt-get update -qq >&2
    (cd "$tmp" && apt-get -qq -o APT::Sandbox::User=root download "${args[@]}" >&2)
  fi
  mkdir "$tmp/root"
  local deb
  for deb in "$tmp"/*.deb; do
    dpkg-deb -x "$deb" "$tmp/root"
    dpkg-deb --show --showformat '${Package}=${Version}\n' "$deb" >>"$tmp/root/.ckptstore-packages"
  done
  local missing
  missing=$(LD_LIBRARY_PATH="$tmp/root/$LIB" ldd "$tmp/root/usr/sbin/libvirtd" \
    "$tmp/root/$LIB"/libvirt/connection-driver/libvirt_driver_qemu.so | grep 'not found' || true)
  if [ -n "$missing" ]; then
    log "the unpacked libvirt 9.0 lacks libraries:"
    echo "$missing" >&2
    rm -rf "$tmp"
    exit 1
  fi
  # Another run may have unpacked it meanwhile: first one wins.
  if mv -T "$tmp/root" "$ROOT" 2>/dev/null; then
    log "unpacked $(paste -sd' ' "$STAMP") into $ROOT"
  fi
  rm -rf "$tmp"
}

version() {
  LD_LIBRARY_PATH="$ROOT/$LIB" "$ROOT/usr/sbin/libvirtd" --version | awk '{print $NF}'
}

# Inside the private mount namespace: mount the private folders, make the
# unpacked 9.0 the libvirt of every process started from here, start the
# daemon, run the command, clean up.
inside() {
  local run=$1
  shift
  local d
  for d in run lib cache log etc; do mkdir -p "$run/$d"; done
  cp -a "$ROOT/etc/libvirt/." "$run/etc/"
  # Mount points must exist; on a host with libvirt installed they do.
  mkdir -p /run/libvirt /var/lib/libvirt /var/cache/libvirt /var/log/libvirt \
    /etc/libvirt /usr/share/libvirt /usr/lib/libvirt
  mount --bind "$run/run" /run/libvirt
  mount --bind "$run/lib" /var/lib/libvirt
  mount --bind "$run/cache" /var/cache/libvirt
  mount --bind "$run/log" /var/log/libvirt
  mount --bind "$run/etc" /etc/libvirt
  mount --bind "$ROOT/usr/share/libvirt" /usr/share/libvirt
  mount --bind "$ROOT/usr/lib/libvirt" /usr/lib/libvirt
  export PATH="$ROOT/usr/sbin:$ROOT/usr/bin:$PATH"
  export LD_LIBRARY_PATH="$ROOT/$LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export LIBVIRT_DRIVER_DIR="$ROOT/$LIB/libvirt/connection-driver"
  export LIBVIRT_STORAGE_BACKEND_DIR="$ROOT/$LIB/libvirt/storage-backend"
  export LIBVIRT_STORAGE_FILE_DIR="$ROOT/$LIB/libvirt/storage-file"
  export LIBVIRT_LOCK_MANAGER_PLUGIN_DIR="$ROOT/$LIB/libvirt/lock-driver"
  export CKPTSTORE_LIBVIRT_DIR="$run/daemon"
  case "$(libvirtd --version)" in
    *" 9.0."*) ;;
    *) log "libvirtd in the namespace is $(libvirtd --version), not 9.0"; exit 1 ;;
  esac
  trap cleanup EXIT
  bash "$HERE/libvirt.sh" start
  log "libvirt $(version) runs for qemu:///system in this namespace (pid $(cat "$run/daemon/libvirtd.pid"))"
  "$@"
}

# Every domain of the namespace's daemon is ours: destroy what the command
# left running, so that no QEMU outlives the run; then stop the daemon by
# its pid.
cleanup() {
  local rc=$? dom
  for dom in $(virsh -q -c qemu:///system list --name 2>/dev/null || true); do
    log "destroying domain $dom, left running"
    virsh -q -c qemu:///system destroy "$dom" >/dev/null 2>&1 || true
  done
  bash "$HERE/libvirt.sh" stop || true
  exit "$rc"
}

run() {
  [ "${1:-}" = -- ] && shift
  [ $# -gt 0 ] || { echo "usage: $0 run -- CMD..." >&2; exit 2; }
  need_root "a private mount namespace"
  fetch
  local run rc=0
  run=$(mktemp -d "$CACHE/run.XXXXXX")
  unshare -m --propagation private bash "$0" __inside "$run" "$@" || rc=$?
  if [ "$rc" = 0 ]; then
    rm -rf "$run"
  else
    log "exit code $rc; the daemon's log and folders are kept in $run"
  fi
  return "$rc"
}

case "${1:-}" in
  fetch) fetch ;;
  version) fetch && version ;;
  run) shift && run "$@" ;;
  __inside) shift && inside "$@" ;;
  *) echo "usage: $0 fetch|version|run -- CMD..." >&2; exit 2 ;;
esac
