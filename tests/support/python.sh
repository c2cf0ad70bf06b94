#!/usr/bin/env bash
# The Python module (bindings/python): a venv with it, built by maturin
# through pip, and its pytest suite against the daemon of qemu:///system.
# Safe to run twice; run it after tests/support/libvirt.sh has installed
# libvirt (the module links the system's libvirt.so.0).
#
#   tests/support/python.sh install        # packages (needs root), the venv, pip install bindings/python
#   tests/support/python.sh test [ARGS]    # install, then pytest ARGS (default: the whole suite)
#
# The venv uses Debian's Python 3.11 (/usr/bin/python3) with its system
# packages, for Debian's python3-libvirt: the tests define their domains
# with libvirt-python, and that one is built for the libvirt installed.
# The venv lives in $CKPTSTORE_VENV (default target/python-venv).
set -euo pipefail
cd "$(dirname "$0")/../.."

VENV=${CKPTSTORE_VENV:-$PWD/target/python-venv}
PYTHON=/usr/bin/python3
PACKAGES=(python3 python3-venv python3-libvirt)

log() { echo "python.sh: $*" >&2; }

have_packages() {
  [ -x "$PYTHON" ] || return 1
  "$PYTHON" -c 'import venv, ensurepip, libvirt' >/dev/null 2>&1
}

install_packages() {
  if have_packages; then
    return 0
  fi
  [ "$(id -u)" = 0 ] || { log "installing ${PACKAGES[*]} needs root"; exit 1; }
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-cache policy python3-libvirt 2>/dev/null | grep -q 'Candidate: [0-9]'; then
    apt-get update -qq >&2
  fi
  # Nothing the rest of the suite runs on may move, and nothing may go.
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
  have_packages || { log "Python 3 with venv and libvirt still missing after installing"; exit 1; }
}

install_module() {
  install_packages
  if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import libvirt' >/dev/null 2>&1; then
    rm -rf "$VENV"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  fi
  # What the README tells an agent's developer to run: maturin (from PyPI,
  # in pip's isolated build) builds the extension with cargo, in release.
  log "pip install bindings/python (built by maturin)"
  local start=$SECONDS
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "./bindings/python[test]" >&2
  log "installed ckptstore $("$VENV/bin/python" -c 'import ckptstore; print(ckptstore.__version__)') in $((SECONDS - start)) s"
}

run_tests() {
  install_module
  # The command the parity tests compare with (cargo test has built it).
  [ -x target/debug/ckptstore ] || cargo build --locked -p ckptstore-cli
  export CKPTSTORE_BIN=${CKPTSTORE_BIN:-$PWD/target/debug/ckptstore}
  cd bindings/python
  "$VENV/bin/python" -m pytest -p no:cacheprovider -ra "$@"
}

case "${1:-test}" in
  install) install_module ;;
  test) shift || true; run_tests "$@" ;;
  *) echo "usage: $0 install|test [PYTEST ARGS]" >&2; exit 2 ;;
esac
