//! The real `ckptstore` binary against the test driver and the real daemon
//! (`qemu:///system`), which these tests share and never stop: whole-output
//! snapshots of every command and exit code (`cli`), hostile input and its
//! fuzzing (`hostile_cli`), file modes and credentials (`security`),
//! concurrent agents (`concurrent`), a real backup client
//! (`backup_client`) and `metrics` with its textfile (`metrics`).

use testkit::support;

#[path = "../rel/mod.rs"]
mod rel;
mod snap;
mod vnb;

mod backup_client;
mod cli;
mod concurrent;
mod ensure;
mod hostile_cli;
mod metrics;
mod prune_cli;
mod reclaim;
mod security;
