//! The library against the real daemon (`qemu:///system`), which these
//! tests share and never stop: the conformance of the fake, the test driver
//! and libvirt, `validate` on real images and running domains, libvirt's
//! crash leftovers planted in the daemon's folder, `REDEFINE_VALIDATE` on a
//! running domain. A test fails, never skips, when the daemon is not
//! running.

mod conformance;
mod ensure;
mod leftovers;
mod libvirt_running;
mod prune;
mod reclaim;
mod validate;
