//! The library's in-process tests, in one binary: the engine and the crash
//! simulations on the fake backend, hostile input and fuzzing, the journal
//! file, `metrics` read back as Prometheus text, the qcow2 reader against `qemu-img`, the fake against libvirt's
//! in-process test driver, the wire format, and the tidy test of the code
//! map. None needs the daemon; they run side by side.

mod engine;
mod ensure;
mod fake_vs_libvirt;
mod hostile;
mod journal;
mod metrics;
mod prune;
mod qcow2;
mod qcow2_fuzz;
mod reclaim;
mod simulation;
mod tidy;
mod wire;
