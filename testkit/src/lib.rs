//! ckptstore's test helpers, in one place for every test binary and bench
//! of the workspace:
//!
//! - [`daemon`]: the lock that keeps a test that kills the daemon apart
//!   from the other tests of its binary;
//! - [`support`]: throw-away libvirt domains with unique names and qcow2
//!   images with bitmaps, removed when dropped; connections to the real
//!   daemon (`qemu:///system`, which panics with the command that starts it)
//!   and to the test driver;
//! - [`sim`]: the simulated world of the crash tests on the fake backend —
//!   chains, journals in a temporary folder, stores that crash at the N-th
//!   crash point, the seeded random simulation and its generator;
//! - [`qemu`]: `qemu-img` helpers to make and inspect images;
//! - [`rng`]: the one seeded generator, and how a test gets its seed.

// A helper panics by design: a set-up that fails fails the test, which the
// helpers' docs say once here rather than under `# Panics` on each.
#![allow(clippy::missing_panics_doc)]

pub mod daemon;
pub mod qemu;
pub mod rng;
pub mod sim;
pub mod support;
