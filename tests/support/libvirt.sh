#!/usr/bin/env bash
# Install libvirt 11.3 + QEMU 10.0.2 from bookworm-backports and run a private
# libvirtd for the test suite.  Safe to run twice.
#
# A libvirt already installed at or above the supported floor (6.10, for
# REDEFINE_VALIDATE) is kept: on a Debian 12 host with its own 9.0, only the
# pieces missing are added, from 9.0's release, and QEMU from backports
# (Debian 12's own qemu-system-x86 would remove qemu-utils 10.0.2).
#
#   tests/support/libvirt.sh install   # packages only (needs root)
#   tests/support/libvirt.sh start     # install if needed, configure, start, wait
#   tests/support/libvirt.sh stop      # stop the daemon this script started (by pid)
#   tests/support/libvirt.sh pid       # print the daemon's pid
#
# State lives in $CKPTSTORE_LIBVIRT_DIR (default /var/tmp/ckptstore-libvirtd).
set -euo pipefail

STATE_DIR=${CKPTSTORE_LIBVIRT_DIR:-/var/tmp/ckptstore-libvirtd}
PID_FILE="$STATE_DIR/libvirtd.pid"
CONF="$STATE_DIR/libvirtd.conf"
LOG="$STATE_DIR/libvirtd.log"
BPO=bookworm-backports
# The oldest libvirt ckptstore supports (README, "Supported libvirt versions").
FLOOR=6.10
# pkg-config comes from bookworm itself; everything else is pinned to backports.
PACKAGES=(libvirt-dev libvirt0 libvirt-common libvirt-clients
  libvirt-daemon libvirt-daemon-common libvirt-daemon-log
  libvirt-daemon-driver-qemu qemu-system-x86 qemu-system-common
  qemu-system-data qemu-utils seabios)
# What the tests need of a libvirt kept as installed, and of QEMU beside it.
LIBVIRT_PIECES=(libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev)
QEMU_PACKAGES=(qemu-system-x86 qemu-system-common qemu-system-data qemu-utils seabios)

log() { echo "libvirt.sh: $*" >&2; }

need_install() {
  command -v libvirtd >/dev/null 2>&1 || return 0
  command -v virsh >/dev/null 2>&1 || return 0
  command -v qemu-system-x86_64 >/dev/null 2>&1 || return 0
  command -v qemu-img >/dev/null 2>&1 || return 0
  pkg-config --exists libvirt 2>/dev/null || return 0
  [ -n "$(installed libvirt-daemon-driver-qemu)" ] || return 0
  at_floor "$(libvirtd --version 2>/dev/null | awk '{print $NF}')" || return 0
  return 1
}

# The installed version of a package, or nothing (also for a package dpkg
# has never heard of, where dpkg-query fails: pipefail must not end the script).
installed() {
  { dpkg-query -W -f '${db:Status-Abbrev} ${Version}\n' "$1" 2>/dev/null || true; } | awk '$1 == "ii" {print $2}'
}

at_floor() {
  [ -n "$1" ] && dpkg --compare-versions "$1" ge "$FLOOR"
}

add_backports() {
  local src=/etc/apt/sources.list.d/ckptstore-bookworm-backports.sources
  if ! grep -rqs "$BPO" /etc/apt/sources.list.d/ /etc/apt/sources.list; then
    cat >"$src" <<SRC
Types: deb
URIs: http://deb.debian.org/debian
Suites: $BPO
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  fi
}

install_packages() {
  if ! need_install; then
    log "libvirt $(libvirtd --version | awk '{print $NF}') already installed (supported: $FLOOR or newer)"
    return 0
  fi
  [ "$(id -u)" = 0 ] || { log "installing packages needs root"; exit 1; }
  add_backports
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  local pinned=() own p
  own=$(installed libvirt0)
  if at_floor "$own" && [[ $own != *~bpo* ]]; then
    # The host's own libvirt (Debian 12's 9.0): add what is missing at
    # exactly its version, never upgrade it; QEMU from backports.
    log "keeping the installed libvirt $own"
    for p in "${LIBVIRT_PIECES[@]}"; do pinned+=("$p=$own"); done
    if ! command -v qemu-system-x86_64 >/dev/null 2>&1 || ! command -v qemu-img >/dev/null 2>&1; then
      for p in "${QEMU_PACKAGES[@]}"; do pinned+=("$p/$BPO"); done
    fi
  else
    for p in "${PACKAGES[@]}"; do pinned+=("$p/$BPO"); done
  fi
  apt-get install -y -qq --no-install-recommends \
    -o Dpkg::Options::=--force-confold pkg-config "${pinned[@]}" >&2
  log "installed $(libvirtd --version)"
}

write_config() {
  mkdir -p "$STATE_DIR"
  chmod 0700 "$STATE_DIR"
  cat >/etc/libvirt/qemu.conf <<'QCONF'
# written by ckptstore tests/support/libvirt.sh: a container without cgroups,
# namespaces, virtlogd or a security driver
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
QCONF
  cat >"$CONF" <<LCONF
listen_tls = 0
listen_tcp = 0
unix_sock_group = "root"
unix_sock_rw_perms = "0770"
auth_unix_rw = "none"
auth_unix_ro = "none"
log_outputs = "3:file:$LOG"
LCONF
}

# Is the process alive? A killed process stays a zombie until its parent
# (init, for a daemon) reaps it, which some container inits do late: a
# zombie is not running.
running() {
  local state
  state=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
  [ -n "$state" ] && [ "$state" != Z ] && [ "$state" != X ]
}

daemon_pid() {
  [ -s "$PID_FILE" ] || return 1
  local pid
  pid=$(cat "$PID_FILE")
  running "$pid" || return 1
  # the pid must still be a libvirtd (guards against a reused pid)
  case "$(cat /proc/$pid/comm 2>/dev/null)" in libvirtd) echo "$pid" ;; *) return 1 ;; esac
}

wait_ready() {
  local i
  for i in $(seq 1 120); do
    if virsh -c qemu:///system version >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  log "libvirtd did not answer on qemu:///system within 60 s; see $LOG"
  tail -n 20 "$LOG" >&2 || true
  return 1
}

start_daemon() {
  install_packages
  if pid=$(daemon_pid); then
    log "libvirtd already running (pid $pid)"
    wait_ready
    return 0
  fi
  write_config
  mkdir -p /run/libvirt /var/lib/libvirt/qemu /var/log/libvirt/qemu /var/cache/libvirt/qemu
  rm -f "$PID_FILE"
  libvirtd -d --config "$CONF" --pid-file "$PID_FILE"
  for _ in $(seq 1 50); do [ -s "$PID_FILE" ] && break; sleep 0.1; done
  wait_ready
  log "libvirtd running (pid $(cat "$PID_FILE")), qemu:///system answers"
}

stop_daemon() {
  local pid
  if ! pid=$(daemon_pid); then
    log "no libvirtd started by this script is running"
    return 0
  fi
  kill -TERM "$pid"
  for _ in $(seq 1 100); do running "$pid" || break; sleep 0.1; done
  if running "$pid"; then kill -KILL "$pid"; fi
  rm -f "$PID_FILE"
  log "libvirtd (pid $pid) stopped"
}

case "${1:-start}" in
  install) install_packages ;;
  start) start_daemon ;;
  stop) stop_daemon ;;
  pid) daemon_pid ;;
  *) echo "usage: $0 install|start|stop|pid" >&2; exit 2 ;;
esac
