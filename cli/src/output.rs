//! Rendering: the human form (concise, stable, one fact per line) of every
//! command's result, and the JSON form, which is the library's own type
//! serialised as it is (the wire format is defined once, in the library:
//! `SyncReport`, `PlanReport`, `RecoverReport`, `Status`, `History`,
//! `Report`, `ErrorDoc`). The README lists every document.

use std::fmt::Write as _;
use std::io::Write as _;

use ckptstore::{
    Chain, Degraded, ErrorDoc, History, PlanReport, PlanStep, RecoverReport, Report, Status,
    SyncReport, Unverified,
};
use serde::Serialize;
use serde_json::{Map, Value};

/// Where results go: human text or one JSON document, on stdout.
#[derive(Debug)]
pub struct Out {
    json: bool,
}

impl Out {
    pub fn new(json: bool) -> Out {
        Out { json }
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

    /// The document of a failed command: the report it had (the rolled-back
    /// `sync`, the `validate` with findings, the `recover` with failures), or
    /// an empty one, with `error` added.
    pub fn failure(&self, report: Option<Value>, error: &ErrorDoc) -> anyhow::Result<()> {
        let mut doc = match report {
            Some(Value::Object(map)) => map,
            _ => Map::new(),
        };
        doc.insert("error".into(), serde_json::to_value(error)?);
        self.emit(&doc, String::new)
    }

    /// A validation report (its findings, if any, are the command's failure).
    pub fn validate(&self, r: &Report) -> anyhow::Result<()> {
        self.emit(r, || validate_text(r))
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

    /// A chain file: JSON in both modes (it is what `sync --chain` reads).
    pub fn export(&self, chain: &Chain) -> anyhow::Result<()> {
        let mut s = serde_json::to_string_pretty(chain)?;
        s.push('\n');
        write_stdout(&s)
    }

    pub fn plan(&self, r: &PlanReport) -> anyhow::Result<()> {
        self.emit(r, || plan_text(r))
    }

    pub fn recover(&self, r: &RecoverReport) -> anyhow::Result<()> {
        self.emit(r, || recover_text(r))
    }

    pub fn status(&self, st: &Status) -> anyhow::Result<()> {
        self.emit(st, || status_text(st))
    }

    pub fn history(&self, h: &History) -> anyhow::Result<()> {
        self.emit(h, || history_text(h))
    }
}

/// The human form of `plan`.
fn plan_text(r: &PlanReport) -> String {
    let n = r.steps.len() as u64;
    let mut s = format!(
        "domain {}: {n} step{}, {} unchanged",
        r.domain,
        plural(n),
        r.unchanged.len()
    );
    s.push_str(if n == 0 { " (nothing to do)\n" } else { "\n" });
    for step in &r.steps {
        let _ = match step {
            PlanStep::Delete { checkpoint, .. } => writeln!(s, "  delete    {checkpoint}"),
            PlanStep::Redefine {
                checkpoint,
                forced: true,
                ..
            } => writeln!(
                s,
                "  redefine  {checkpoint}  (same content: moves libvirt's current checkpoint)"
            ),
            PlanStep::Redefine {
                checkpoint,
                replaces: true,
                ..
            } => writeln!(
                s,
                "  redefine  {checkpoint}  (replaces a different definition)"
            ),
            PlanStep::Redefine { checkpoint, .. } => writeln!(s, "  redefine  {checkpoint}"),
        };
    }
    kept(&mut s, &r.adopted, &r.foreign);
    bitmaps(&mut s, &r.degraded, &r.unverified);
    warnings(&mut s, &r.warnings);
    s
}

/// The human form of `history`.
fn history_text(h: &History) -> String {
    if h.transactions.is_empty() {
        return format!("no transactions for domain {}\n", h.domain);
    }
    let mut s = String::new();
    for t in &h.transactions {
        let _ = write!(
            s,
            "{}  {}  {:<6}  {:<12}  {} checkpoint{}  {} libvirt call{}",
            t.txn,
            t.started_at,
            name(&t.kind),
            name(&t.state),
            t.checkpoints,
            plural(t.checkpoints),
            t.libvirt_calls,
            plural(t.libvirt_calls)
        );
        if let Some(e) = &t.error {
            let _ = write!(s, "  ({e})");
        }
        s.push('\n');
    }
    s
}

/// The human form of a validation report.
pub fn validate_text(r: &Report) -> String {
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
        let _ = write!(s, "  {:<22}", name(&f.kind));
        if let Some(c) = &f.checkpoint {
            let _ = write!(s, " checkpoint {c}");
        }
        if let Some(d) = &f.disk {
            let _ = write!(s, " disk {d}");
        }
        if let Some(i) = &f.image {
            let _ = write!(s, " image {}", i.display());
        }
        let _ = writeln!(s, ": {}", f.detail);
    }
    let _ = match (&r.usable, &r.leaf) {
        (Some(u), Some(l)) if u == l => {
            writeln!(s, "usable for an incremental backup: {u} (the leaf)")
        }
        (Some(u), Some(l)) => writeln!(
            s,
            "usable for an incremental backup: {u} (the leaf {l} is not)"
        ),
        (Some(u), None) => writeln!(s, "usable for an incremental backup: {u}"),
        (None, _) if r.checkpoints > 0 => {
            writeln!(
                s,
                "usable for an incremental backup: none; take a full backup"
            )
        }
        (None, _) => Ok(()),
    };
    for n in &r.notes {
        let _ = writeln!(s, "note: {n}");
    }
    s
}

/// The human form of a sync or resync report.
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
    kept(&mut s, &r.adopted, &r.foreign);
    bitmaps(&mut s, &r.degraded, &r.unverified);
    warnings(&mut s, &r.warnings);
    s
}

/// The human form of `recover`.
pub fn recover_text(r: &RecoverReport) -> String {
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
    for f in &r.failed {
        let _ = writeln!(
            s,
            "transaction {} on domain {}: failed, still open: {}",
            f.txn, f.domain, f.error.message
        );
    }
    let failed = |t: &ckptstore::Incomplete| r.failed.iter().any(|f| f.txn == t.txn);
    for t in r.left_open.iter().filter(|t| !failed(t)) {
        let pid = t.owner.pid;
        let what = if t.owner_alive {
            format!("left alone: its owner, pid {pid}, is alive")
        } else {
            format!("still open (owner pid {pid})")
        };
        let _ = writeln!(s, "transaction {} on domain {}: {what}", t.txn, t.domain);
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
            let _ = writeln!(
                s,
                "  {}  domain {}  {}  {}  {}/{} steps  owner pid {} {}",
                t.txn,
                t.domain,
                name(&t.kind),
                name(&t.state),
                t.done,
                t.total,
                t.owner.pid,
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

/// What a re-apply kept of libvirt's own checkpoints.
fn kept(s: &mut String, adopted: &[String], foreign: &[String]) {
    if !adopted.is_empty() {
        let _ = writeln!(
            s,
            "  adopted (after the committed leaf): {}",
            adopted.join(", ")
        );
    }
    if !foreign.is_empty() {
        let _ = writeln!(
            s,
            "  kept as libvirt has them (foreign): {}",
            foreign.join(", ")
        );
    }
}

/// The disks left out of their checkpoints, and those nobody could check
/// (one line per reason).
fn bitmaps(s: &mut String, degraded: &[Degraded], unverified: &[Unverified]) {
    for d in degraded {
        let _ = writeln!(
            s,
            "  degraded: checkpoint {} disk {}: {}",
            d.checkpoint, d.disk, d.reason
        );
    }
    let mut by_reason: Vec<(&str, Vec<&str>)> = Vec::new();
    for u in unverified {
        match by_reason.iter_mut().find(|(r, _)| *r == u.reason) {
            Some((_, disks)) => disks.push(&u.disk),
            None => by_reason.push((&u.reason, vec![&u.disk])),
        }
    }
    for (reason, disks) in by_reason {
        let _ = writeln!(s, "  bitmaps not checked on {}: {reason}", disks.join(", "));
    }
}

pub fn warnings(s: &mut String, warnings: &[String]) {
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
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(crate::exit::Fail::new(
            crate::exit::BAD_INPUT,
            format!("cannot write the result to standard output: {e}"),
            "check where standard output goes (a full disk, a closed file); nothing else failed",
        )
        .into()),
        _ => Ok(()),
    }
}
