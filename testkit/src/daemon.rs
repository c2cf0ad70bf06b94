//! One lock per test process on the real daemon (`qemu:///system`).
//!
//! The tests of one binary run side by side in threads. A test that stops
//! or kills the daemon, or must be its only client in this process, holds
//! it [`exclusive`]ly; a test of the same binary that needs the daemon up
//! throughout holds it [`shared`]. `cargo test` runs one test binary at a
//! time, so the lock is needed only within a binary.

use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

static DAEMON: RwLock<()> = RwLock::new(());

/// For a test that needs the daemon up throughout.
pub fn shared() -> RwLockReadGuard<'static, ()> {
    DAEMON
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// For a test that stops the daemon, or must be its only client in this
/// process.
pub fn exclusive() -> RwLockWriteGuard<'static, ()> {
    DAEMON
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
