//! Crash tests of the real binary, compiled only with the `failpoints`
//! cargo feature (release builds never enable it).
//!
//! The store passes a named crash point (`ckptstore::CRASH_POINTS`)
//! between any two journal writes or libvirt calls. In a `failpoints`
//! build the `fail` crate's `FAILPOINTS` variable arms them, for example
//!
//! ```text
//! FAILPOINTS='step.recorded=2*off->panic' ckptstore sync --chain chain.json
//! ```
//!
//! lets the first two passes of `step.recorded` go and stops the process at
//! the third. A point armed with `panic` does not unwind: the process
//! aborts on the spot (SIGABRT), as if it had been killed — no destructor
//! runs, no journal write or libvirt call follows, and the one line
//! `ckptstore: killed at crash point NAME` on stderr says where it died.

/// Arm the crash points named in `FAILPOINTS`; keep the value alive for
/// the whole run.
///
/// # Panics
///
/// When `FAILPOINTS` is malformed (the `fail` crate's own check).
pub fn arm() -> fail::FailScenario<'static> {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied());
        // The fail crate's message for a `panic` action without argument.
        match msg
            .and_then(|m| m.strip_prefix("failpoint "))
            .and_then(|m| m.strip_suffix(" panic"))
        {
            Some(point) => {
                eprintln!("ckptstore: killed at crash point {point}");
                std::process::abort();
            }
            None => default(info),
        }
    }));
    fail::FailScenario::setup()
}
