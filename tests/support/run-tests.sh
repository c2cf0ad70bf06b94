#!/usr/bin/env bash
# The whole test suite, with its own set-up: install libvirt and QEMU if
# needed, start a private libvirtd for qemu:///system, check formatting and
# lints, run every test against the real daemon, and stop the daemon again
# if this script started it (by its pid, never by name); the Python module's
# pytest suite (tests/support/python.sh) runs against it too. Then the libvirt
# tests once more against libvirt 9.0, Debian 12's own, unpacked beside the
# installed one and run in a private mount namespace (libvirt9.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."

lv=tests/support/libvirt.sh
started=0
if ! bash "$lv" pid >/dev/null 2>&1; then
  started=1
fi
bash "$lv" start
stop() { if [ "$started" = 1 ]; then bash "$lv" stop; fi; }
trap stop EXIT
# The real backup client of cli/tests/command/backup_client.rs (after
# libvirt: it must not move the libvirt and QEMU just installed).
bash tests/support/virtnbdbackup.sh install

export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}
# The daemon's version, printed with each part of the tests that uses it.
lv_version=$(virsh -c qemu:///system version --daemon | awk '/daemon/ {print $NF}')
echo "== cargo fmt --check" >&2
cargo fmt --all -- --check
# Clippy with the workspace's lints (Cargo.toml: [workspace.lints], the
# pedantic group with a short allow-list).
echo "== cargo clippy --workspace --all-targets -- -D warnings" >&2
cargo clippy --workspace --all-targets --locked -- -D warnings
# The tidy test first (ARCHITECTURE.md's code map against the code, `unsafe`
# only in the FFI file): cheap, and it names what is out of place.
echo "== tidy (cargo test --test fast tidy::)" >&2
cargo test --locked --test fast tidy:: -- --nocapture 2>&1 | tee target/test-output.txt
# One binary at a time: the library's fast, daemon and kills tests, the
# command's command and kills tests (tests that kill the daemon are in the
# kills binaries, each holding the daemon exclusively).
echo "== cargo test --workspace (libvirt $lv_version)" >&2
cargo test --workspace --locked --lib --bins --tests -- --nocapture 2>&1 | tee -a target/test-output.txt
# The real binary killed at every named crash point needs the failpoints
# build (never a release build); it replaces target/debug/ckptstore.
echo "== cargo clippy --workspace --all-targets --features failpoints -- -D warnings" >&2
cargo clippy --workspace --all-targets --locked --features ckptstore-cli/failpoints -- -D warnings
echo "== cargo test -p ckptstore-cli --features failpoints --test kill_points --test kill_points_prune (libvirt $lv_version)" >&2
cargo test --locked -p ckptstore-cli --features failpoints --test kill_points --test kill_points_prune -- --nocapture 2>&1 | tee -a target/test-output.txt
echo "== cargo test --doc" >&2
cargo test --workspace --locked --doc
# The Python module: a venv, `pip install bindings/python` (maturin builds
# it in release), and its pytest suite against this daemon (one of its
# tests kills the daemon and starts it again with libvirt.sh).
echo "== pytest bindings/python (libvirt $lv_version)" >&2
bash tests/support/python.sh test 2>&1 | tee -a target/test-output.txt
# The tests of libvirt's checkpoint API, of ckptstore on it and of daemon
# deaths, again against libvirt 9.0 (Debian 12's own): its daemon, client
# library and virsh, in a private mount namespace with its own
# /run/libvirt, /var/lib/libvirt and /etc/libvirt.
# The same tests as before the binaries were grouped: the modules
# conformance, libvirt_running (daemon binary), e2e_libvirt and
# libvirt_reconnect (kills binary).
lv9=(--test daemon --test kills)
lv9_filter=(conformance:: libvirt_running:: e2e_libvirt:: libvirt_reconnect::)
cargo test --locked --no-run "${lv9[@]}"
echo "== cargo test ${lv9[*]} -- ${lv9_filter[*]} (libvirt $(bash tests/support/libvirt9.sh version))" >&2
bash tests/support/libvirt9.sh run -- \
  cargo test --locked "${lv9[@]}" -- "${lv9_filter[@]}" --nocapture 2>&1 | tee -a target/test-output.txt
