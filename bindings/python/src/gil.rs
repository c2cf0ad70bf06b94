//! How long the module holds the GIL: every operation adds the time it
//! spent holding it (converting arguments and results, building the
//! progress dicts) apart from the caller's own progress callback, and the
//! time it ran with the GIL released. `ckptstore._native._gil_stats()`
//! reads the totals (the figures in TESTING.md).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

static CALLS: AtomicU64 = AtomicU64::new(0);
static HELD_NS: AtomicU64 = AtomicU64::new(0);
static MAX_HELD_NS: AtomicU64 = AtomicU64::new(0);
static RELEASED_NS: AtomicU64 = AtomicU64::new(0);
static CALLBACKS: AtomicU64 = AtomicU64::new(0);
static CALLBACK_NS: AtomicU64 = AtomicU64::new(0);

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// One operation: `held` with the GIL (the module's own work), `released`
/// without it; `callbacks` progress calls that ran the caller's code for
/// `in_callbacks`.
pub fn record(held: Duration, released: Duration, callbacks: u64, in_callbacks: Duration) {
    CALLS.fetch_add(1, Relaxed);
    HELD_NS.fetch_add(ns(held), Relaxed);
    MAX_HELD_NS.fetch_max(ns(held), Relaxed);
    RELEASED_NS.fetch_add(ns(released), Relaxed);
    CALLBACKS.fetch_add(callbacks, Relaxed);
    CALLBACK_NS.fetch_add(ns(in_callbacks), Relaxed);
}

/// The totals, in order: calls, GIL held (ns), the longest hold of one
/// call (ns), GIL released (ns), progress callbacks, time in them (ns).
pub fn totals(reset: bool) -> [(&'static str, u64); 6] {
    let read = |a: &AtomicU64| {
        if reset {
            a.swap(0, Relaxed)
        } else {
            a.load(Relaxed)
        }
    };
    [
        ("calls", read(&CALLS)),
        ("held_ns", read(&HELD_NS)),
        ("max_held_ns", read(&MAX_HELD_NS)),
        ("released_ns", read(&RELEASED_NS)),
        ("callbacks", read(&CALLBACKS)),
        ("callback_ns", read(&CALLBACK_NS)),
    ]
}
