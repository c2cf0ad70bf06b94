//! How a [`crate::Store`] is opened: [`StoreOptions`], the progress
//! callback, and — with the `testing` feature only — the test seams: the
//! owner identity, owner liveness and a hook at every named crash point.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use super::report::Progress;
#[cfg(feature = "testing")]
use crate::bitmaps::images::ImageReader;
#[cfg(feature = "testing")]
use crate::bitmaps::remove::ImageEditor;
use crate::bitmaps::BitmapPolicy;
use crate::journal::JournalOptions;
#[cfg(feature = "testing")]
use crate::owner::Owner;

/// A progress callback (see [`StoreOptions::progress`]). It returns
/// [`ControlFlow::Break`] to stop the transaction where it is: no further
/// libvirt call is made, the transaction stays open exactly as if the
/// caller had been killed there (for `recover`), and the operation returns
/// [`crate::Error::Aborted`].
pub type ProgressFn = Arc<dyn Fn(&Progress) -> ControlFlow<()> + Send + Sync>;

/// A hook called at every named crash point (see [`CRASH_POINTS`]).
#[cfg(feature = "testing")]
pub type Hook = Arc<dyn Fn(&'static str) + Send + Sync>;

/// A liveness test for transaction owners.
#[cfg(feature = "testing")]
pub type Liveness = Arc<dyn Fn(&Owner) -> bool + Send + Sync>;

/// Every named point where a process may die, in the order one
/// transaction passes them. Simulation tests crash at each; the
/// `failpoints` feature exposes them to the real binary through the `fail`
/// crate.
pub const CRASH_POINTS: &[&str] = &[
    "txn.intent_committed",
    "step.before_call",
    "step.after_call",
    "step.recorded",
    "phase.verified",
    "txn.rollback_begun",
    "txn.finished",
    "recover.taken_over",
];

/// Options of [`crate::Store::open_with`]. Construct them with
/// `..StoreOptions::default()`: the `testing` feature adds a field.
#[derive(Clone)]
pub struct StoreOptions {
    /// Finished transactions kept per domain.
    pub history: usize,
    /// How many times a lost connection is waited for before a transaction
    /// is left open for `recover`.
    pub reconnect_attempts: u32,
    /// Delay between those attempts.
    pub reconnect_delay: Duration,
    /// Journal tunables.
    pub journal: JournalOptions,
    /// What a sync does about the bitmaps of the checkpoints it defines
    /// (default: [`BitmapPolicy::Degrade`]).
    pub bitmaps: BitmapPolicy,
    /// A re-apply deletes the checkpoints libvirt has that the committed
    /// chain does not and does not adopt (`foreign`), within the chain's
    /// scope (default: kept).
    pub prune_foreign: bool,
    /// Threads that work on different domains at once (recover, resync of
    /// many domains). Calls within one domain are always sequential.
    pub workers: usize,
    /// Called before the first libvirt call of a round and after each call
    /// that succeeded (for a progress bar; must be quick). It may stop the
    /// transaction (see [`ProgressFn`]).
    pub progress: Option<ProgressFn>,
    /// Test seams.
    #[cfg(feature = "testing")]
    pub seams: Seams,
}

/// Test seams of a store (the `testing` feature).
#[cfg(feature = "testing")]
#[derive(Clone, Default)]
pub struct Seams {
    /// The identity this store writes as owner (default: this process).
    pub owner: Option<Owner>,
    /// How owners are judged alive (default: [`Owner::is_alive`]); a held
    /// domain lock still counts as alive.
    pub liveness: Option<Liveness>,
    /// Called at every crash point.
    pub hook: Option<Hook>,
    /// Where a shut-off domain's images are read from (default: the
    /// in-process qcow2 reader).
    pub images: Option<Arc<dyn ImageReader + Send + Sync>>,
    /// Where a shut-off domain's bitmaps are removed (default:
    /// `qemu-img bitmap --remove`).
    pub editor: Option<Arc<dyn ImageEditor + Send + Sync>>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            history: 100,
            reconnect_attempts: 10,
            reconnect_delay: Duration::from_millis(500),
            journal: JournalOptions::default(),
            bitmaps: BitmapPolicy::default(),
            prune_foreign: false,
            workers: 4,
            progress: None,
            #[cfg(feature = "testing")]
            seams: Seams::default(),
        }
    }
}

impl std::fmt::Debug for StoreOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreOptions")
            .field("history", &self.history)
            .field("reconnect_attempts", &self.reconnect_attempts)
            .field("reconnect_delay", &self.reconnect_delay)
            .field("bitmaps", &self.bitmaps)
            .field("prune_foreign", &self.prune_foreign)
            .field("workers", &self.workers)
            .finish_non_exhaustive()
    }
}
