#!/usr/bin/env bash
# Install virtnbdbackup (Debian 12's 1.9.15) and python3-libnbd, the real
# backup client that cli/tests/command/backup_client.rs runs next to ckptstore. Safe to
# run twice; run it after tests/support/libvirt.sh has installed libvirt and
# QEMU from bookworm-backports: this script refuses to install when apt would
# replace, upgrade or remove any libvirt, QEMU or SeaBIOS package.
#
#   tests/support/virtnbdbackup.sh install   # packages only (needs root)
#   tests/support/virtnbdbackup.sh check     # exit 0 when installed
set -euo pipefail

PACKAGES=(virtnbdbackup python3-libnbd)
# What the client needs at run time: its two commands, and libnbd's and
# libvirt's modules for the system's Python, which its scripts name
# (#!/usr/bin/python3), whatever python3 comes first in PATH.
installed() {
  command -v virtnbdbackup >/dev/null 2>&1 || return 1
  command -v virtnbdrestore >/dev/null 2>&1 || return 1
  /usr/bin/python3 -c 'import nbd, libvirt' >/dev/null 2>&1 || return 1
}

log() { echo "virtnbdbackup.sh: $*" >&2; }

install_packages() {
  if installed; then
    log "virtnbdbackup $(virtnbdbackup -V 2>&1) already installed"
    return 0
  fi
  [ "$(id -u)" = 0 ] || { log "installing packages needs root"; exit 1; }
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-cache policy virtnbdbackup 2>/dev/null | grep -q 'Candidate: [0-9]'; then
    apt-get update -qq >&2
  fi
  # Look before installing: nothing the rest of the suite runs on may move,
  # and nothing may be removed.
  local touched
  touched=$(apt-get -s install --no-install-recommends "${PACKAGES[@]}" |
    awk '$1 == "Remv" || ($1 == "Inst" && $2 ~ /^(libvirt|qemu|seabios)/)')
  if [ -n "$touched" ]; then
    log "refusing to install ${PACKAGES[*]}: apt would change these packages:"
    printf '%s\n' "$touched" >&2
    exit 1
  fi
  apt-get install -y -qq --no-install-recommends \
    -o Dpkg::Options::=--force-confold "${PACKAGES[@]}" >&2
  installed || { log "virtnbdbackup still unusable after installing"; exit 1; }
  log "installed virtnbdbackup $(virtnbdbackup -V 2>&1)"
}

case "${1:-install}" in
  install) install_packages ;;
  check) installed ;;
  *) echo "usage: $0 install|check" >&2; exit 2 ;;
esac
