//! The real `ckptstore` binary killed, and its daemon killed under it:
//! SIGKILL of the command (`kill_cli`), `kill -9` of `libvirtd` during a
//! `sync` or a `recover` (`daemon_kill`) and while it writes checkpoint
//! metadata (`daemon_leftovers`).
//!
//! A test that kills the daemon holds [`testkit::daemon::exclusive`]; the
//! others hold [`testkit::daemon::shared`], so none meets a dead daemon.
//! Other test binaries are not run at the same time by `cargo test`.

use testkit::support;

#[path = "../rel/mod.rs"]
mod rel;

mod daemon_kill;
mod daemon_leftovers;
mod kill_cli;
