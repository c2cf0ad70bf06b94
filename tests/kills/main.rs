//! The library against a daemon that dies or drops it: `kill -9` of
//! `libvirtd` during a sync and a restart that recomputes the current
//! checkpoint (`e2e_libvirt`, with the store's end-to-end tests on the real
//! daemon), and a connection the daemon drops (`libvirt_reconnect`, which
//! must be the only client of this process while it counts its
//! connections).
//!
//! A test that stops the daemon, or must be its only client here, holds
//! [`testkit::daemon::exclusive`]; every other test of this binary holds
//! [`testkit::daemon::shared`], so none meets a dead daemon. Other test
//! binaries are not run at the same time by `cargo test`.

mod e2e_libvirt;
mod libvirt_reconnect;
