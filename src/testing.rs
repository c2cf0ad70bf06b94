//! Test seams, compiled only with the `testing` feature (the workspace's
//! test crates enable it; an agent never does): crash hooks, owner identity
//! and liveness ([`Seams`]), fault injection in the fake backend, the
//! planner, the XML codec, the journal itself and validation with another
//! image reader.

pub use crate::backend::fake::FakeBackend;
pub use crate::backend::fake::{Fault, Op, Phase};
pub use crate::bitmaps::remove::{ImageEditError, ImageEditor, QemuImg, Removed};
pub use crate::chain::is_valid_checkpoint_name;
pub use crate::chain::{leaf_of, root_of, xml_safe_text};
pub use crate::engine::{Hook, Liveness, Seams, CRASH_POINTS};
pub use crate::journal::{
    Begin, Journal, Migration, NewStep, NewTxn, StepOp, StepRecord, TxnRecord, TxnSummary,
    MIGRATIONS, SCHEMA_VERSION,
};
pub use crate::journal::{CommittedSize, Counter, MetricsSnapshot, Validation};
pub use crate::journal::{JournalError, JournalOptions, StepPhase, TxnKind, TxnState};
pub use crate::plan::{plan, plan_with, same_content, Plan, Step};
pub use crate::validate::{
    validate_with, DiskChain, ImageError, ImageReader, Layer, LayerBitmap, Qcow2Reader,
};
pub use crate::xml::{parse_checkpoint, parse_domain, render_checkpoint, XmlError};

/// The qcow2 reader under its own names (the public face renames them:
/// `Qcow2Image`, `read_qcow2`, ...).
pub mod qcow2 {
    pub use crate::qcow2::*;
}
