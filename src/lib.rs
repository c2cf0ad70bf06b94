#![doc = include_str!("../README.md")]
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
mod leftovers;
mod lock;
pub mod owner;
pub mod plan;
pub mod validate;

pub use engine::{Outcome, Policy, Recovered, Status, Store, StoreOptions, SyncReport};
pub use error::{Error, Result};
pub use validate::{validate, Finding, FindingKind, Report};
