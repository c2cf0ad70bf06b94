//! The exceptions: `ckptstore.Error` and one subclass per kind of the
//! library's `ErrorKind`, each carrying the library's `ErrorDoc` — the
//! same kind, exit code, message and hint as the command's `error`
//! document.

use ckptstore::{ErrorDoc, ErrorKind};
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::PyType;
use serde_json::Value;

use crate::convert::{to_py, to_value};

pyo3::create_exception!(
    ckptstore,
    Error,
    PyException,
    "A ckptstore operation failed. `.kind`, `.exit_code`, `.message` and `.hint` are the \
     command's `error` document (also whole in `.doc`); `.txn` is the transaction it left open \
     or rolled back, if any; `.report` the report that came with it (a rolled-back sync's)."
);
pyo3::create_exception!(
    ckptstore,
    RolledBack,
    Error,
    "libvirt refused a step and the transaction was rolled back: libvirt's checkpoints are as \
     they were (exit code 1). `.report` is the rolled-back sync's report."
);
pyo3::create_exception!(
    ckptstore,
    BadInput,
    Error,
    "Bad input (a malformed chain, a cycle, a duplicate id, a disk target the domain lacks, an \
     unknown option): nothing was changed anywhere (exit code 2)."
);
pyo3::create_exception!(
    ckptstore,
    Busy,
    Error,
    "A live process or thread works on this domain or holds its open transaction (exit code 3)."
);
pyo3::create_exception!(
    ckptstore,
    Unreachable,
    Error,
    "libvirt is unreachable or the domain does not exist, or a failure left a transaction open \
     for `recover` (exit code 4)."
);
pyo3::create_exception!(
    ckptstore,
    JournalError,
    Error,
    "The journal cannot be used: corrupt, from a newer schema (left untouched), unwritable, \
     full or locked (exit code 5)."
);

/// The exception class of a kind.
fn class(py: Python<'_>, kind: ErrorKind) -> Bound<'_, PyType> {
    match kind {
        ErrorKind::RolledBack => py.get_type::<RolledBack>(),
        ErrorKind::BadInput => py.get_type::<BadInput>(),
        ErrorKind::Busy => py.get_type::<Busy>(),
        ErrorKind::Unreachable => py.get_type::<Unreachable>(),
        ErrorKind::Journal => py.get_type::<JournalError>(),
        // Not an error of an operation (validate's findings are in its
        // report); the base class if it ever comes here.
        ErrorKind::Findings => py.get_type::<Error>(),
    }
}

/// The kind's name in the documents (`bad_input`, ...).
fn kind_name(kind: ErrorKind) -> String {
    match serde_json::to_value(kind) {
        Ok(Value::String(s)) => s,
        _ => format!("{kind:?}"),
    }
}

/// The exception of a failure: its class from the kind, its message as
/// the exception's text, and the document's fields as attributes.
pub fn exception(
    py: Python<'_>,
    doc: &ErrorDoc,
    txn: Option<String>,
    report: Option<&Value>,
) -> PyErr {
    let err = PyErr::from_type(class(py, doc.kind), doc.message.clone());
    match decorate(py, &err, doc, txn, report) {
        Ok(()) => err,
        Err(e) => e,
    }
}

fn decorate(
    py: Python<'_>,
    err: &PyErr,
    doc: &ErrorDoc,
    txn: Option<String>,
    report: Option<&Value>,
) -> PyResult<()> {
    let value = err.value(py);
    value.setattr("kind", kind_name(doc.kind))?;
    value.setattr("exit_code", doc.exit_code)?;
    value.setattr("message", &doc.message)?;
    value.setattr("hint", &doc.hint)?;
    let whole = to_value(doc).map_err(pyo3::exceptions::PyRuntimeError::new_err)?;
    value.setattr("doc", to_py(py, &whole)?)?;
    value.setattr("txn", txn)?;
    match report {
        Some(r) => value.setattr("report", to_py(py, r)?)?,
        None => value.setattr("report", py.None())?,
    }
    Ok(())
}

/// A library error as its exception.
pub fn from_library(py: Python<'_>, e: &ckptstore::Error) -> PyErr {
    let report = e.report().and_then(|r| to_value(r).ok());
    exception(
        py,
        &ErrorDoc::from(e),
        e.txn().map(|t| t.to_string()),
        report.as_ref(),
    )
}

/// Bad input found by the module itself (a chain serde refused, an
/// unknown policy): nothing was changed.
pub fn bad_input(py: Python<'_>, message: String, hint: &str) -> PyErr {
    exception(
        py,
        &ErrorDoc::new(ErrorKind::BadInput, message, hint),
        None,
        None,
    )
}

/// Add the classes to the module, each subclass with its `kind` and
/// `exit_code` as class attributes.
pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("Error", py.get_type::<Error>())?;
    for kind in [
        ErrorKind::RolledBack,
        ErrorKind::BadInput,
        ErrorKind::Busy,
        ErrorKind::Unreachable,
        ErrorKind::Journal,
    ] {
        let cls = class(py, kind);
        cls.setattr("kind", kind_name(kind))?;
        cls.setattr("exit_code", kind.exit_code())?;
        m.add(cls.name()?.to_string(), cls)?;
    }
    Ok(())
}
