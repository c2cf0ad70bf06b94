//! The progress callback of one call. The library has one progress
//! function per store (`StoreOptions::progress`); the module's reads the
//! callable of the innermost call running on this thread, since `sync` and
//! `resync` run their transaction on the caller's thread (GIL released).
//! A callback that raises stops the transaction where it is, as a crash of
//! the agent would: the exception is kept here and raised again when the
//! library returns `Aborted`.

use std::cell::RefCell;
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use ckptstore::Progress;
use pyo3::prelude::*;

use crate::convert::{to_py, to_value};

/// One call in progress on this thread.
pub struct Slot {
    callback: Option<Py<PyAny>>,
    /// The exception the callback raised, if it did.
    pub error: Option<PyErr>,
    /// The module's own time with the GIL inside the progress function.
    pub held: Duration,
    /// Calls of the callback, and the time its code ran.
    pub callbacks: u64,
    /// Time in the caller's code.
    pub in_callbacks: Duration,
}

thread_local! {
    /// The calls running on this thread, innermost last (a callback may
    /// itself call the store).
    static SLOTS: RefCell<Vec<Slot>> = const { RefCell::new(Vec::new()) };
}

/// Start a call on this thread, with its callback (or none).
pub fn push(callback: Option<Py<PyAny>>) {
    SLOTS.with(|s| {
        s.borrow_mut().push(Slot {
            callback,
            error: None,
            held: Duration::ZERO,
            callbacks: 0,
            in_callbacks: Duration::ZERO,
        });
    });
}

/// End the innermost call on this thread.
pub fn pop() -> Option<Slot> {
    SLOTS.with(|s| s.borrow_mut().pop())
}

/// The store's progress function: call the innermost call's callback with
/// the progress as a dict, holding the GIL only for that.
pub fn report(p: &Progress) -> ControlFlow<()> {
    let wanted = SLOTS.with(|s| s.borrow().last().is_some_and(|s| s.callback.is_some()));
    if !wanted {
        return ControlFlow::Continue(());
    }
    Python::attach(|py| {
        let start = Instant::now();
        let callback = SLOTS.with(|s| {
            s.borrow()
                .last()
                .and_then(|s| s.callback.as_ref().map(|c| c.clone_ref(py)))
        });
        let Some(callback) = callback else {
            return ControlFlow::Continue(());
        };
        let arg = to_value(p)
            .map_err(pyo3::exceptions::PyRuntimeError::new_err)
            .and_then(|v| to_py(py, &v));
        let before_call = Instant::now();
        // The borrow of the slots is not held here: the callback may call
        // the store again.
        let result = arg.and_then(|arg| callback.call1(py, (arg,)));
        let after_call = Instant::now();
        let stop = result.err();
        let go_on = if stop.is_some() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        };
        SLOTS.with(|s| {
            if let Some(slot) = s.borrow_mut().last_mut() {
                slot.callbacks += 1;
                slot.in_callbacks += after_call - before_call;
                slot.held += (before_call - start) + after_call.elapsed();
                if slot.error.is_none() {
                    slot.error = stop;
                }
            }
        });
        go_on
    })
}
