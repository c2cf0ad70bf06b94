//! # ckptstore
//!
//! Crash-safe redefinition and validation of libvirt checkpoint chains, for
//! host agents that keep the chain themselves (oVirt's engine, KubeVirt,
//! backup tools) and must put it back into libvirt after a domain was
//! recreated, migrated or libvirt reinstalled.
//!
//! A local SQLite journal records the intended chain and the progress of the
//! redefine loop, so an interrupted loop resumes or rolls back against
//! libvirt; agents ask it at start-up what is left to recover. See
//! `ARCHITECTURE.md` for the code map and the invariants.
#![deny(missing_docs)]
#![deny(unsafe_code)]

pub mod backend;
pub mod chain;
pub mod qcow2;
pub mod xml;

pub use backend::libvirt::LibvirtBackend;
pub use backend::{Backend, BackendError, BackendErrorKind};
pub use chain::{Chain, ChainError, Checkpoint, CheckpointDef, ValidChain};
pub mod engine;
pub mod error;
pub mod journal;
pub mod owner;
pub mod plan;
pub mod validate;

pub use engine::{Outcome, Policy, Recovered, Status, Store, StoreOptions, SyncReport};
pub use error::{Error, Result};
pub use validate::{validate, Finding, FindingKind, Report};
