//! `ckptstore._native`, the extension module behind the Python package
//! `ckptstore`: the library's `Store` for Python agents.
//!
//! One public face and one wire format: every method returns the
//! library's own document (`SyncReport`, `PlanReport`, `RecoverReport`,
//! `Status`, `History`, `Report`) converted through serde into a dict, the
//! same document the command prints with `--json`; every failure raises
//! the exception of its `ErrorKind`, carrying the library's `ErrorDoc`.
//! The GIL is released while the library works (libvirt calls, journal
//! writes) and taken again only to call the progress callback.
//!
//! The code map: `store.rs` (the `Store` class, one method per operation,
//! and the call path: GIL, panics, answers), `progress.rs` (the progress
//! callback of a call), `errors.rs` (the exceptions), `convert.rs`
//! (documents to Python objects and chains from them), `gil.rs` (how long
//! the GIL is held).

#![deny(missing_docs)]
#![deny(unsafe_code)]

mod convert;
mod errors;
mod gil;
mod progress;
mod store;

use pyo3::prelude::*;
use pyo3::types::PyDict;

/// How long the module has held the GIL, over every call since the last
/// reset: `calls`, `held_ns` (the module's own work with the GIL, not the
/// progress callback's code), `max_held_ns` (the longest of one call),
/// `released_ns` (the library's work without it), `callbacks` and
/// `callback_ns` (the caller's progress callbacks).
#[pyfunction]
#[pyo3(signature = (reset = false))]
fn _gil_stats(py: Python<'_>, reset: bool) -> PyResult<Bound<'_, PyDict>> {
    let d = PyDict::new(py);
    for (k, v) in gil::totals(reset) {
        d.set_item(k, v)?;
    }
    Ok(d)
}

/// The module: `Store`, the exceptions, and the GIL figures.
#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<store::Store>()?;
    errors::register(m)?;
    m.add_function(wrap_pyfunction!(_gil_stats, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
