# The README's commands. Each does its own set-up on a fresh Debian 12 machine.
.PHONY: demo test

# Install libvirt's client library, build, and run the demo on libvirt's
# embedded test driver (no daemon needed).
demo:
	bash tests/support/libvirt.sh install
	cargo build --release --locked -p ckptstore-cli
	./target/release/ckptstore demo

# Install libvirt and QEMU, start a private libvirtd, run every check and
# test against it, stop the daemon.
test:
	bash tests/support/run-tests.sh
