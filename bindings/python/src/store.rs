//! `ckptstore.Store`: the library's `Store` and a libvirt connection, one
//! method per operation. Every method is a few lines: take the arguments
//! (with the GIL), then [`Store::call`] runs the library with the GIL
//! released and turns its answer into the same document the command
//! prints, or into the exception of its kind.

use std::fs::DirBuilder;
use std::os::unix::fs::DirBuilderExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use ckptstore::{
    redact_uri, BitmapPolicy, Chain, ErrorDoc, ErrorKind, LibvirtBackend, Policy, Retention,
    StoreOptions,
};
use pyo3::prelude::*;
use serde::Serialize;

use crate::convert::{self, Input};
use crate::{errors, gil, progress};

/// The hint of a chain the module could not read (the command's, for a
/// chain file it could not read).
const CHAIN_HINT: &str = "fix the chain (its form: `ckptstore sync --help`); nothing was changed";

/// Why an operation did not answer.
enum Failure {
    /// The library's error.
    Library(ckptstore::Error),
    /// A failure the module finds itself (a chain serde refused, a folder
    /// it cannot create), as its document.
    Doc(ErrorDoc),
    /// Anything else (a document that does not serialise: a bug).
    Internal(String),
}

impl From<ckptstore::Error> for Failure {
    fn from(e: ckptstore::Error) -> Failure {
        Failure::Library(e)
    }
}

/// A journal and the libvirt it keeps checkpoints for. Share one between
/// threads: the GIL is released while an operation runs, and a second
/// writer of the same domain gets `Busy`.
#[pyclass(module = "ckptstore", name = "Store", frozen)]
pub struct Store {
    inner: ckptstore::Store,
    backend: LibvirtBackend,
    path: PathBuf,
    uri: String,
}

/// The clock of one call: when it started, and how long it let the GIL go.
struct Clock {
    start: Instant,
}

impl Clock {
    fn start() -> Clock {
        Clock {
            start: Instant::now(),
        }
    }
}

#[pymethods]
impl Store {
    /// Open (or create) the journal at `path` for the libvirt at `connect`.
    /// A missing folder is created with mode 0700; libvirt is connected on
    /// the first operation that needs it.
    #[new]
    #[pyo3(signature = (path, connect = "qemu:///system", bitmaps = None))]
    fn new(
        py: Python<'_>,
        path: PathBuf,
        connect: &str,
        bitmaps: Option<String>,
    ) -> PyResult<Store> {
        let uri = connect.to_string();
        // As the command: the argument, else $CKPTSTORE_BITMAPS, else degrade.
        let bitmaps = bitmaps
            .or_else(|| std::env::var("CKPTSTORE_BITMAPS").ok())
            .unwrap_or_else(|| "degrade".into());
        let policy = match bitmaps.as_str() {
            "degrade" => BitmapPolicy::Degrade,
            "strict" => BitmapPolicy::Strict,
            "ignore" => BitmapPolicy::Ignore,
            other => {
                return Err(errors::bad_input(
                    py,
                    format!("bitmaps={other:?} is not a policy"),
                    "give \"degrade\", \"strict\" or \"ignore\"",
                ))
            }
        };
        let opened = py.detach(|| open(&path, policy));
        match opened {
            Ok(inner) => Ok(Store {
                inner,
                backend: LibvirtBackend::new(&uri),
                uri: redact_uri(&uri),
                path,
            }),
            Err(f) => Err(raise(py, f)),
        }
    }

    /// The journal's path, as given.
    #[getter]
    fn path(&self) -> PathBuf {
        self.path.clone()
    }

    /// The libvirt URI, without credentials.
    #[getter]
    fn uri(&self) -> &str {
        &self.uri
    }

    fn __repr__(&self) -> String {
        format!(
            "ckptstore.Store({:?}, connect={:?})",
            self.path.display().to_string(),
            self.uri
        )
    }

    /// Make the domain's libvirt checkpoints exactly `chain`, all or
    /// nothing (the `sync` document). `chain` is the chain as a dict, or
    /// its JSON text. `progress(dict)` is called before the first libvirt
    /// call of a round and after each call; if it raises, the transaction
    /// stops there, open for `recover`, and its exception is raised.
    #[pyo3(signature = (chain, progress = None))]
    fn sync(
        &self,
        py: Python<'_>,
        chain: &Bound<'_, PyAny>,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let clock = Clock::start();
        let input = take_chain(py, chain)?;
        self.call(py, clock, progress, move |s, b| {
            Ok(s.sync(b, parse_chain(input)?)?)
        })
    }

    /// The steps `sync` would take and every warning; nothing changes (the
    /// `plan` document).
    fn plan(&self, py: Python<'_>, chain: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
        let clock = Clock::start();
        let input = take_chain(py, chain)?;
        self.call(py, clock, None, move |s, b| {
            Ok(s.plan(b, parse_chain(input)?)?)
        })
    }

    /// What `resync(domain)` would do; nothing changes (the `plan`
    /// document, as `plan` gives it for the committed chain).
    fn plan_resync(&self, py: Python<'_>, domain: String) -> PyResult<Py<PyAny>> {
        let clock = Clock::start();
        self.call(py, clock, None, move |s, b| Ok(s.plan_resync(b, &domain)?))
    }

    /// The domain's committed chain as a chain dict, the one `sync` takes
    /// (what `ckptstore export --domain D` prints).
    fn export(&self, py: Python<'_>, domain: String) -> PyResult<Py<PyAny>> {
        let clock = Clock::start();
        self.call(py, clock, None, move |s, b| Ok(s.export(b, &domain)?))
    }

    /// Re-apply the domain's last committed chain (the `sync` document).
    #[pyo3(signature = (domain, progress = None))]
    fn resync(
        &self,
        py: Python<'_>,
        domain: String,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let clock = Clock::start();
        self.call(py, clock, progress, move |s, b| Ok(s.resync(b, &domain)?))
    }

    /// Make `checkpoint`, the base of the next incremental backup, usable
    /// in libvirt on exactly the disks whose bitmap is usable (the
    /// `ensure` document: each disk `incremental` or `full`). Its
    /// definition comes from `chain` (a dict or JSON text), or else from
    /// the domain's committed chain.
    #[pyo3(signature = (domain, checkpoint, chain = None))]
    fn ensure(
        &self,
        py: Python<'_>,
        domain: String,
        checkpoint: String,
        chain: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Py<PyAny>> {
        let clock = Clock::start();
        let input = chain.map(|c| take_chain(py, c)).transpose()?;
        self.call(py, clock, None, move |s, b| {
            let chain = input.map(parse_chain).transpose()?;
            Ok(s.ensure(b, &domain, &checkpoint, chain)?)
        })
    }

    /// Finish (`policy="resume"`) or undo (`"rollback"`) every open
    /// transaction whose owner is dead (the `recover` document; failures
    /// are in its `failed`, not raised).
    #[pyo3(signature = (domain = None, policy = "resume"))]
    fn recover(&self, py: Python<'_>, domain: Option<String>, policy: &str) -> PyResult<Py<PyAny>> {
        let clock = Clock::start();
        let policy = match policy {
            "resume" => Policy::Resume,
            "rollback" => Policy::Rollback,
            other => {
                return Err(errors::bad_input(
                    py,
                    format!("unknown recover policy {other:?}"),
                    "give policy=\"resume\" or policy=\"rollback\"; nothing was changed",
                ))
            }
        };
        self.call(py, clock, None, move |s, b| {
            Ok(s.recover(b, policy, domain.as_deref())?)
        })
    }

    /// Open transactions and each domain's committed chain (the `status`
    /// document).
    #[pyo3(signature = (domain = None))]
    fn status(&self, py: Python<'_>, domain: Option<String>) -> PyResult<Py<PyAny>> {
        let clock = Clock::start();
        self.call(
            py,
            clock,
            None,
            move |s, _| Ok(s.status(domain.as_deref())?),
        )
    }

    /// The domain's transactions, newest first, at most `limit` (all when
    /// `None`; the `history` document).
    #[pyo3(signature = (domain, limit = None))]
    fn history(&self, py: Python<'_>, domain: String, limit: Option<i64>) -> PyResult<Py<PyAny>> {
        let clock = Clock::start();
        let limit = match limit {
            None => i64::MAX,
            Some(n) if n >= 0 => n,
            Some(n) => {
                return Err(errors::bad_input(
                    py,
                    format!("history limit {n} is negative"),
                    "give a limit of 0 or more, or None for all; nothing was changed",
                ))
            }
        };
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        self.call(py, clock, None, move |s, _| Ok(s.history(&domain, limit)?))
    }

    /// The three-way check of the journal, libvirt's checkpoints and the
    /// qcow2 bitmaps (the `validate` document; findings are in it, with
    /// `ok` false, not raised).
    fn validate(&self, py: Python<'_>, domain: String) -> PyResult<Py<PyAny>> {
        let clock = Clock::start();
        self.call(py, clock, None, move |s, b| {
            Ok(ckptstore::validate(s, b, &domain)?)
        })
    }

    /// Find the domain's orphan and inconsistent bitmaps and the
    /// checkpoints they leave unusable; with `apply=True` remove them in one
    /// journaled transaction (the `reclaim` document).
    #[pyo3(signature = (domain, apply = false))]
    fn reclaim(&self, py: Python<'_>, domain: String, apply: bool) -> PyResult<Py<PyAny>> {
        let clock = Clock::start();
        self.call(py, clock, None, move |s, b| {
            Ok(s.reclaim(b, &domain, apply)?)
        })
    }

    /// Adopt the domain's current libvirt checkpoints as its committed
    /// chain (the `import` document).
    fn import_domain(&self, py: Python<'_>, domain: String) -> PyResult<Py<PyAny>> {
        let clock = Clock::start();
        self.call(py, clock, None, move |s, b| Ok(s.import(b, &domain)?))
    }

    /// Every domain's figures from the journal (the `metrics` document;
    /// libvirt is not asked).
    fn metrics(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let clock = Clock::start();
        self.call(py, clock, None, move |s, _| Ok(s.metrics()?))
    }

    /// The same figures in Prometheus' text exposition format 0.0.4 (what
    /// `ckptstore metrics` prints).
    fn metrics_text(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let clock = Clock::start();
        self.call(py, clock, None, move |s, _| {
            Ok(s.metrics()?.to_prometheus())
        })
    }

    /// Retention: delete the domain's oldest checkpoints, bitmaps included
    /// (the `prune` document). Give exactly one of `keep` (the N newest
    /// stay, N at least 1) and `older_than` (a duration like `"7d"`,
    /// `"12h"`, `"30m"`); without `apply`, a dry run that changes nothing.
    #[pyo3(signature = (domain, keep = None, older_than = None, apply = false))]
    fn prune(
        &self,
        py: Python<'_>,
        domain: String,
        keep: Option<usize>,
        older_than: Option<String>,
        apply: bool,
    ) -> PyResult<Py<PyAny>> {
        let clock = Clock::start();
        let hint = "give keep=N (N at least 1) or older_than=\"7d\" (units s, m, h, d, w), not both; nothing was changed";
        let retention = match (keep, older_than) {
            (Some(n), None) => Retention::Keep(n),
            (None, Some(text)) => match Retention::parse_age(&text) {
                Some(age) => Retention::OlderThan(age),
                None => {
                    return Err(errors::bad_input(
                        py,
                        format!("older_than {text:?} is not a duration"),
                        hint,
                    ))
                }
            },
            _ => {
                return Err(errors::bad_input(
                    py,
                    "prune takes exactly one of keep and older_than".into(),
                    hint,
                ))
            }
        };
        self.call(py, clock, None, move |s, b| {
            Ok(s.prune(b, &domain, retention, apply)?)
        })
    }

    /// A panic inside an operation's call path, for the tests: it must come
    /// out as an exception, and the store must stay usable.
    fn _panic(&self, py: Python<'_>, message: String) -> PyResult<Py<PyAny>> {
        let clock = Clock::start();
        self.call(py, clock, None, move |_, _| -> Result<(), Failure> {
            panic!("{message}")
        })
    }
}

impl Store {
    /// Run `op` with the GIL released, with `progress` as this call's
    /// callback; its answer as a document, or its failure as an exception.
    fn call<T: Serialize>(
        &self,
        py: Python<'_>,
        clock: Clock,
        progress: Option<Py<PyAny>>,
        op: impl FnOnce(&ckptstore::Store, &LibvirtBackend) -> Result<T, Failure> + Send,
    ) -> PyResult<Py<PyAny>> {
        progress::push(progress);
        let detached = Instant::now();
        let outcome = py.detach(|| {
            catch_unwind(AssertUnwindSafe(|| {
                op(&self.inner, &self.backend)
                    .and_then(|doc| convert::to_value(&doc).map_err(Failure::Internal))
            }))
        });
        let attached = Instant::now();
        let slot = progress::pop();
        let result = match outcome {
            Ok(Ok(doc)) => convert::to_py(py, &doc).map(Bound::unbind),
            Ok(Err(Failure::Library(e))) => {
                // A stop asked by the callback: raise the callback's own
                // exception.
                let theirs = slot.as_ref().and_then(|s| s.error.as_ref());
                match (&e, theirs) {
                    (ckptstore::Error::Aborted { .. }, Some(theirs)) => Err(theirs.clone_ref(py)),
                    _ => Err(errors::from_library(py, &e)),
                }
            }
            Ok(Err(f)) => Err(raise(py, f)),
            Err(panic) => Err(raise(py, Failure::Internal(panic_message(&*panic)))),
        };
        let (held, callbacks, in_callbacks) = slot
            .map(|s| (s.held, s.callbacks, s.in_callbacks))
            .unwrap_or_default();
        gil::record(
            (detached - clock.start) + attached.elapsed() + held,
            attached - detached,
            callbacks,
            in_callbacks,
        );
        result
    }
}

/// Open the journal, creating its folder (mode 0700) when it is missing,
/// as the command does.
fn open(path: &Path, bitmaps: BitmapPolicy) -> Result<ckptstore::Store, Failure> {
    if let Some(dir) = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty() && !d.exists())
    {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| {
                Failure::Doc(ErrorDoc::new(
                    ErrorKind::Journal,
                    format!("cannot create the journal's folder {}: {e}", dir.display()),
                    "create it (mode 0700) or give another path",
                ))
            })?;
    }
    let opts = StoreOptions {
        progress: Some(Arc::new(progress::report)),
        bitmaps,
        ..StoreOptions::default()
    };
    Ok(ckptstore::Store::open_with(path, opts)?)
}

/// Take a chain argument with the GIL (the walk of a dict); bad input is
/// raised at once.
fn take_chain(py: Python<'_>, chain: &Bound<'_, PyAny>) -> PyResult<Input> {
    convert::input(chain).map_err(|e| {
        raise(
            py,
            Failure::Doc(bad_chain(format!("the chain is not valid: {e}"))),
        )
    })
}

/// Deserialise a chain (without the GIL), as the command reads a chain
/// file.
fn parse_chain(input: Input) -> Result<Chain, Failure> {
    convert::deserialize(input)
        .map_err(|e| Failure::Doc(bad_chain(format!("the chain is not valid: {e}"))))
}

/// A chain the module could not read: bad input.
fn bad_chain(message: String) -> ErrorDoc {
    ErrorDoc::new(ErrorKind::BadInput, message, CHAIN_HINT)
}

/// A failure as its exception.
fn raise(py: Python<'_>, f: Failure) -> PyErr {
    match f {
        Failure::Library(e) => errors::from_library(py, &e),
        Failure::Doc(doc) => errors::exception(py, &doc, None, None),
        Failure::Internal(message) => errors::exception(
            py,
            &ErrorDoc::new(
                ErrorKind::Unreachable,
                format!("ckptstore failed inside: {message}; a transaction it had open is left for recover"),
                "run `recover`, then retry; this is a bug in ckptstore: please report it",
            ),
            None,
            None,
        ),
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        format!("panic: {s}")
    } else if let Some(s) = payload.downcast_ref::<String>() {
        format!("panic: {s}")
    } else {
        "panic".into()
    }
}
