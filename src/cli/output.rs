//! Rendering: the human form (concise, stable, one fact per line) and the
//! JSON form (one document on stdout; the keys scripts rely on are listed
//! in `docs-cli.md`) of every command's result.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::io::Write as _;

use ckptstore::engine::RecoverReport;
use ckptstore::engine::{Incomplete, PlanReport};
use ckptstore::journal::TxnSummary;
use ckptstore::plan::Step;
use ckptstore::{Error, Status, Store, SyncReport};
use serde::Serialize;
use serde_json::{json, Map, Value};

/// Where results go: human text or one JSON document, on stdout.
#[derive(Debug)]
pub struct Out {
    json: bool,
    /// The document a failing command had begun (the `sync` document of a
    /// rolled-back transaction); the error is added to it.
    failure_doc: RefCell<Option<Map<String, Value>>>,
}

impl Out {
    pub fn new(json: bool) -> Out {
        Out {
            json,
            failure_doc: RefCell::new(None),
        }
    }

    pub fn json(&self) -> bool {
        self.json
    }

    /// Write `text` (human mode) or `doc` (JSON mode) to stdout.
    pub fn emit(&self, doc: &impl Serialize, text: impl FnOnce() -> String) -> anyhow::Result<()> {
        if self.json {
            let mut s = serde_json::to_string_pretty(doc)?;
            s.push('\n');
            write_stdout(&s)
        } else {
            write_stdout(&text())
        }
    }

    /// Write a line of human text (nothing in JSON mode).
    pub fn say(&self, line: impl AsRef<str>) -> anyhow::Result<()> {
        if self.json {
            return Ok(());
        }
        let mut s = line.as_ref().to_string();
        s.push('\n');
        write_stdout(&s)
    }

    /// Keep the `sync` document of a transaction libvirt refused and that
    /// was rolled back, so JSON mode still reports `outcome: rolled_back`.
    pub fn note_sync_error(&self, store: &Store, e: Error) -> anyhow::Error {
        if let Error::Refused {
            domain,
            txn,
            checkpoint,
            rolled_back: true,
            ..
        } = &e
        {
            let calls = store
                .journal()
                .txn(*txn)
                .map(|t| t.libvirt_calls)
                .unwrap_or(0);
            let doc = json!({
                "txn": txn,
                "domain": domain,
                "outcome": "rolled_back",
                "redefined": [],
                "deleted": [],
                "unchanged": [],
                "libvirt_calls": calls,
                "refused": checkpoint,
            });
            if let Value::Object(map) = doc {
                *self.failure_doc.borrow_mut() = Some(map);
            }
        }
        e.into()
    }

    /// The failure document: the one a command had begun, or an empty one,
    /// with `error` added.
    pub fn failure(&self, error: Value) -> anyhow::Result<()> {
        let mut doc = self.failure_doc.borrow_mut().take().unwrap_or_default();
        doc.insert("error".into(), error);
        self.emit(&doc, String::new)
    }

    /// A clean validation report.
    pub fn validate(&self, r: &ckptstore::validate::Report) -> anyhow::Result<()> {
        self.emit(r, || validate_text(r))
    }

    /// A validation report with findings: printed now in human mode; in
    /// JSON mode it becomes the failure document (with `error` added).
    pub fn validate_findings(&self, r: &ckptstore::validate::Report) -> anyhow::Result<()> {
        if self.json {
            if let Value::Object(map) = serde_json::to_value(r)? {
                *self.failure_doc.borrow_mut() = Some(map);
            }
            return Ok(());
        }
        write_stdout(&validate_text(r))
    }

    pub fn sync(&self, r: &SyncReport) -> anyhow::Result<()> {
        self.emit(r, || sync_text(r))
    }

    pub fn import(&self, r: &SyncReport) -> anyhow::Result<()> {
        self.emit(r, || {
            let mut s = format!(
                "domain {}: imported {} checkpoint{} as its committed chain (transaction {})\n",
                r.domain,
                r.unchanged.len(),
                plural(r.unchanged.len() as u64),
                r.txn
            );
            warnings(&mut s, &r.warnings);
            s
        })
    }

    pub fn plan(&self, r: &PlanReport) -> anyhow::Result<()> {
        let steps: Vec<Value> = r
            .plan
            .steps
            .iter()
            .map(|s| match s {
                Step::Delete { before } => {
                    json!({"op": "delete", "checkpoint": before.name, "parent": before.parent})
                }
                Step::Redefine {
                    def,
                    before,
                    forced,
                } => json!({
                    "op": "redefine",
                    "checkpoint": def.name,
                    "parent": def.parent,
                    "replaces": before.is_some(),
                    "forced": forced,
                }),
            })
            .collect();
        let doc = json!({
            "domain": r.domain,
            "steps": steps,
            "unchanged": r.plan.unchanged,
            "warnings": r.warnings,
        });
        self.emit(&doc, || {
            let n = r.plan.steps.len() as u64;
            let mut s = format!(
                "domain {}: {n} step{}, {} unchanged",
                r.domain,
                plural(n),
                r.plan.unchanged.len()
            );
            s.push_str(if n == 0 { " (nothing to do)\n" } else { "\n" });
            for step in &r.plan.steps {
                let _ = match step {
                    Step::Delete { before } => writeln!(s, "  delete    {}", before.name),
                    Step::Redefine {
                        def, forced: true, ..
                    } => {
                        writeln!(
                            s,
                            "  redefine  {}  (same content: moves libvirt's current checkpoint)",
                            def.name
                        )
                    }
                    Step::Redefine {
                        def,
                        before: Some(_),
                        ..
                    } => {
                        writeln!(
                            s,
                            "  redefine  {}  (replaces a different definition)",
                            def.name
                        )
                    }
                    Step::Redefine { def, .. } => writeln!(s, "  redefine  {}", def.name),
                };
            }
            warnings(&mut s, &r.warnings);
            s
        })
    }

    /// The `recover` document; `failed` holds each failure's `error`
    /// object. With failures, in JSON mode it becomes the failure document
    /// (the error line is added to it).
    pub fn recover(&self, r: &RecoverReport, failed: &[Value]) -> anyhow::Result<()> {
        let left_doc: Vec<Value> = r.left_open.iter().map(incomplete_doc).collect();
        let failed_doc: Vec<Value> = r
            .failed
            .iter()
            .zip(failed)
            .map(|(f, e)| json!({"txn": f.txn, "domain": f.domain, "error": e}))
            .collect();
        let doc = json!({"recovered": r.recovered, "failed": failed_doc, "left_open": left_doc});
        if self.json && !r.failed.is_empty() {
            if let Value::Object(map) = doc {
                *self.failure_doc.borrow_mut() = Some(map);
            }
            return Ok(());
        }
        self.emit(&doc, || recover_text(r, failed))
    }

    pub fn status(&self, st: &Status) -> anyhow::Result<()> {
        self.emit(&status_doc(st), || status_text(st))
    }

    pub fn history(&self, domain: &str, txns: &[TxnSummary]) -> anyhow::Result<()> {
        let list: Vec<Value> = txns
            .iter()
            .map(|t| {
                json!({
                    "txn": t.id,
                    "kind": t.kind,
                    "state": t.state,
                    "started_at": t.started_at,
                    "finished_at": t.finished_at,
                    "checkpoints": t.target_len,
                    "done": t.done,
                    "total": t.total,
                    "libvirt_calls": t.libvirt_calls,
                    "error": t.error,
                })
            })
            .collect();
        let doc = json!({"domain": domain, "transactions": list});
        self.emit(&doc, || {
            if txns.is_empty() {
                return format!("no transactions for domain {domain}\n");
            }
            let mut s = String::new();
            for t in txns {
                let _ = write!(
                    s,
                    "{}  {}  {:<6}  {:<12}  {} checkpoint{}  {} libvirt call{}",
                    t.id,
                    t.started_at,
                    name(&t.kind),
                    name(&t.state),
                    t.target_len,
                    plural(t.target_len),
                    t.libvirt_calls,
                    plural(t.libvirt_calls)
                );
                if let Some(e) = &t.error {
                    let _ = write!(s, "  ({e})");
                }
                s.push('\n');
            }
            s
        })
    }
}

/// The human form of a sync or resync report.
pub fn validate_text(r: &ckptstore::validate::Report) -> String {
    let state = if r.running {
        "running: checked by libvirt"
    } else {
        "shut off: images read directly"
    };
    let mut s = match r.findings.len() {
        0 => {
            format!(
                "domain {}: ok, {} checkpoint{} ({state})\n",
                r.domain,
                r.checkpoints,
                plural(r.checkpoints as u64)
            )
        }
        n => format!(
            "domain {}: {n} finding{} in {} checkpoint{} ({state})\n",
            r.domain,
            plural(n as u64),
            r.checkpoints,
            plural(r.checkpoints as u64)
        ),
    };
    for f in &r.findings {
        s.push_str(&format!("  {:<22}", name(&f.kind)));
        if let Some(c) = &f.checkpoint {
            s.push_str(&format!(" checkpoint {c}"));
        }
        if let Some(d) = &f.disk {
            s.push_str(&format!(" disk {d}"));
        }
        if let Some(i) = &f.image {
            s.push_str(&format!(" image {}", i.display()));
        }
        s.push_str(&format!(": {}\n", f.detail));
    }
    match (&r.usable, &r.leaf) {
        (Some(u), Some(l)) if u == l => s.push_str(&format!(
            "usable for an incremental backup: {u} (the leaf)\n"
        )),
        (Some(u), Some(l)) => s.push_str(&format!(
            "usable for an incremental backup: {u} (the leaf {l} is not)\n"
        )),
        (Some(u), None) => s.push_str(&format!("usable for an incremental backup: {u}\n")),
        (None, _) if r.checkpoints > 0 => {
            s.push_str("usable for an incremental backup: none; take a full backup\n")
        }
        (None, _) => {}
    }
    for n in &r.notes {
        s.push_str(&format!("note: {n}\n"));
    }
    s
}

pub fn sync_text(r: &SyncReport) -> String {
    let mut s = format!(
        "domain {}: {} (transaction {})\n",
        r.domain,
        words(&r.outcome),
        r.txn
    );
    let _ = writeln!(
        s,
        "  {} redefined, {} deleted, {} unchanged; {} libvirt call{}",
        r.redefined.len(),
        r.deleted.len(),
        r.unchanged.len(),
        r.libvirt_calls,
        plural(r.libvirt_calls)
    );
    warnings(&mut s, &r.warnings);
    s
}

/// The human form of `recover`; `failed` holds each failure's `error`
/// object (`message`, `hint`).
pub fn recover_text(r: &RecoverReport, failed: &[Value]) -> String {
    let mut s = String::new();
    if r.recovered.is_empty() && r.left_open.is_empty() && r.failed.is_empty() {
        s.push_str("nothing to recover\n");
    }
    for r in &r.recovered {
        let _ = writeln!(
            s,
            "transaction {} on domain {}: {} ({} libvirt call{})",
            r.txn,
            r.domain,
            words(&r.outcome),
            r.libvirt_calls,
            plural(r.libvirt_calls)
        );
        warnings(&mut s, &r.warnings);
    }
    let failed_ids: Vec<_> = r.failed.iter().map(|f| f.txn).collect();
    for (f, e) in r.failed.iter().zip(failed) {
        let _ = writeln!(
            s,
            "transaction {} on domain {}: failed, still open: {}",
            f.txn,
            f.domain,
            e["message"].as_str().unwrap_or_default()
        );
    }
    for t in r
        .left_open
        .iter()
        .filter(|t| !failed_ids.contains(&t.summary.id))
    {
        let u = &t.summary;
        let pid = u.owner.pid;
        let what = if t.owner_alive {
            format!("left alone: its owner, pid {pid}, is alive")
        } else {
            format!("still open (owner pid {pid})")
        };
        let _ = writeln!(s, "transaction {} on domain {}: {what}", u.id, u.domain);
    }
    s
}

/// The human form of `status`.
pub fn status_text(st: &Status) -> String {
    let mut s = String::new();
    if st.incomplete.is_empty() {
        s.push_str("incomplete transactions: none\n");
    } else {
        s.push_str("incomplete transactions:\n");
        for t in &st.incomplete {
            let u = &t.summary;
            let _ = writeln!(
                s,
                "  {}  domain {}  {}  {}  {}/{} steps  owner pid {} {}",
                u.id,
                u.domain,
                name(&u.kind),
                name(&u.state),
                u.done,
                u.total,
                u.owner.pid,
                if t.owner_alive { "alive" } else { "dead" }
            );
        }
    }
    if st.domains.is_empty() {
        s.push_str("committed chains: none\n");
    } else {
        s.push_str("committed chains:\n");
        for d in &st.domains {
            let _ = writeln!(
                s,
                "  {}  {} checkpoint{}  root {}  leaf {}",
                d.domain,
                d.checkpoints,
                plural(d.checkpoints as u64),
                d.root.as_deref().unwrap_or("-"),
                d.leaf.as_deref().unwrap_or("-")
            );
        }
    }
    s
}

/// The JSON form of `status`.
pub fn status_doc(st: &Status) -> Value {
    let incomplete: Vec<Value> = st.incomplete.iter().map(incomplete_doc).collect();
    let domains: Vec<Value> = st
        .domains
        .iter()
        .map(|d| {
            json!({
                "domain": d.domain,
                "checkpoints": d.checkpoints,
                "root": d.root,
                "leaf": d.leaf,
                "txn": d.txn,
                "committed_at": d.committed_at,
            })
        })
        .collect();
    json!({"incomplete": incomplete, "domains": domains})
}

fn incomplete_doc(t: &Incomplete) -> Value {
    let u = &t.summary;
    json!({
        "txn": u.id,
        "domain": u.domain,
        "kind": u.kind,
        "state": u.state,
        "owner": u.owner,
        "owner_alive": t.owner_alive,
        "done": u.done,
        "total": u.total,
        "checkpoints": u.target_len,
        "started_at": u.started_at,
    })
}

fn warnings(s: &mut String, warnings: &[String]) {
    for w in warnings {
        let _ = writeln!(s, "  warning: {w}");
    }
}

/// The snake_case name serde gives a unit enum variant.
pub fn name(v: &impl Serialize) -> String {
    match serde_json::to_value(v) {
        Ok(Value::String(s)) => s,
        _ => "?".into(),
    }
}

/// [`name`] with spaces for a sentence: `rolled back`.
pub fn words(v: &impl Serialize) -> String {
    name(v).replace('_', " ")
}

pub fn plural(n: u64) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// Write to stdout; a closed pipe (`ckptstore status | head -1`) is not an
/// error.
fn write_stdout(s: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match stdout.write_all(s.as_bytes()).and_then(|()| stdout.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}
