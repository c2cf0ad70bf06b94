//! `metrics`: what the journal says of every domain, as one document
//! ([`Metrics`]) and in Prometheus' text exposition format 0.0.4
//! ([`Metrics::to_prometheus`]), for node_exporter's textfile collector or
//! any scraper.
//!
//! Everything comes from the journal, read in one transaction; libvirt is
//! never asked. A domain is listed when the journal has a committed chain,
//! a finished or open transaction, or a `validate` report for it.
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `ckptstore_checkpoints` | gauge | `domain` |
//! | `ckptstore_open_transactions` | gauge | `domain`, `owner_alive` |
//! | `ckptstore_last_commit_timestamp_seconds` | gauge | `domain` |
//! | `ckptstore_transactions_total` | counter | `domain`, `kind`, `outcome` |
//! | `ckptstore_validate_findings` | gauge | `domain`, `kind` |
//! | `ckptstore_last_validate_timestamp_seconds` | gauge | `domain` |
//!
//! Every label combination is written, zeros included, so that an alert on
//! a value sees it go back to 0: both `owner_alive` values, every
//! transaction kind with both outcomes, and for a validated domain every
//! [`FindingKind`]. The counters never go backwards: the journal keeps
//! them apart from the history it prunes.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use chrono::DateTime;
use serde::{Deserialize, Serialize};

use crate::engine::Store;
use crate::error::Result;
use crate::journal::{kind_name, JournalError, TxnKind, TxnState, TXN_KINDS};
use crate::validate::FindingKind;

/// The `metrics` document: every domain the journal knows, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// One entry per domain, ordered by name.
    pub domains: Vec<DomainMetrics>,
}

/// One domain's figures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DomainMetrics {
    /// The domain, as the journal names it.
    pub domain: String,
    /// Checkpoints in its committed chain; `None` when it has none.
    pub checkpoints: Option<u64>,
    /// RFC 3339 time its last transaction committed (with or without
    /// libvirt calls); `None` when none has.
    pub last_commit_at: Option<String>,
    /// Its open transactions.
    pub open_transactions: OpenTransactions,
    /// Its finished transactions, every kind with both outcomes.
    pub transactions: Vec<TxnCount>,
    /// Its last `validate`; `None` when it was never validated.
    pub last_validate: Option<LastValidate>,
}

/// Open transactions of a domain, by whether their owner is alive (a dead
/// owner's is for `recover`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenTransactions {
    /// Held by a live process.
    pub owner_alive: u64,
    /// Left by a dead one.
    pub owner_dead: u64,
}

/// How many transactions of a kind ended one way, ever.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TxnCount {
    /// What they did.
    pub kind: TxnKind,
    /// `committed` (nothing to do included) or `rolled_back`.
    pub outcome: TxnState,
    /// How many (never decreases).
    pub count: u64,
}

/// A domain's last `validate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LastValidate {
    /// RFC 3339 time it ran.
    pub validated_at: String,
    /// Its findings by kind, every kind listed (0 included).
    pub findings: Vec<FindingCount>,
}

/// How many findings of one kind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FindingCount {
    /// The kind.
    pub kind: FindingKind,
    /// How many.
    pub count: u64,
}

/// The outcomes a transaction is counted under.
const OUTCOMES: [TxnState; 2] = [TxnState::Committed, TxnState::RolledBack];

/// What `metrics` reads of a stored validate report: the kinds of its
/// findings (a kind this build does not know is left out).
#[derive(Deserialize)]
struct StoredReport {
    findings: Vec<StoredFinding>,
}

#[derive(Deserialize)]
struct StoredFinding {
    kind: String,
}

impl Store {
    /// Every domain's figures from the journal (see the module
    /// documentation); libvirt is not asked.
    ///
    /// # Errors
    ///
    /// [`crate::Error::Journal`] when the journal cannot be read or a stored
    /// validate report is not JSON.
    pub fn metrics(&self) -> Result<Metrics> {
        let snap = self.journal().metrics_snapshot()?;
        let mut domains: BTreeMap<String, DomainMetrics> = BTreeMap::new();
        for c in &snap.committed {
            let m = domain_entry(&mut domains, &c.domain);
            m.checkpoints = Some(c.checkpoints);
            m.last_commit_at = Some(later(m.last_commit_at.take(), &c.committed_at));
        }
        for c in &snap.counters {
            let m = domain_entry(&mut domains, &c.domain);
            if let Some(t) = m
                .transactions
                .iter_mut()
                .find(|t| t.kind == c.kind && t.outcome == c.outcome)
            {
                t.count = c.count;
            }
            if c.outcome == TxnState::Committed {
                m.last_commit_at = Some(later(m.last_commit_at.take(), &c.last_at));
            }
        }
        for s in &snap.open {
            let alive = self.owner_alive(s);
            let open = &mut domain_entry(&mut domains, &s.domain).open_transactions;
            if alive {
                open.owner_alive += 1;
            } else {
                open.owner_dead += 1;
            }
        }
        for v in &snap.validations {
            let stored: StoredReport = serde_json::from_str(&v.report_json).map_err(|e| {
                JournalError::decode("validate report", format!("of domain {}: {e}", v.domain))
            })?;
            let mut findings: Vec<FindingCount> = FindingKind::ALL
                .iter()
                .map(|&kind| FindingCount { kind, count: 0 })
                .collect();
            for f in &stored.findings {
                if let Some(c) = findings.iter_mut().find(|c| c.kind.as_str() == f.kind) {
                    c.count += 1;
                }
            }
            domain_entry(&mut domains, &v.domain).last_validate = Some(LastValidate {
                validated_at: v.validated_at.clone(),
                findings,
            });
        }
        Ok(Metrics {
            domains: domains.into_values().collect(),
        })
    }
}

fn domain_entry<'a>(
    domains: &'a mut BTreeMap<String, DomainMetrics>,
    domain: &str,
) -> &'a mut DomainMetrics {
    domains
        .entry(domain.to_string())
        .or_insert_with(|| DomainMetrics::new(domain))
}

/// The later of two RFC 3339 times of the journal (one format: they
/// compare as text).
fn later(have: Option<String>, seen: &str) -> String {
    match have {
        Some(h) if h.as_str() >= seen => h,
        _ => seen.to_string(),
    }
}

impl DomainMetrics {
    fn new(domain: &str) -> DomainMetrics {
        DomainMetrics {
            domain: domain.to_string(),
            checkpoints: None,
            last_commit_at: None,
            open_transactions: OpenTransactions::default(),
            transactions: TXN_KINDS
                .iter()
                .flat_map(|&kind| {
                    OUTCOMES.iter().map(move |&outcome| TxnCount {
                        kind,
                        outcome,
                        count: 0,
                    })
                })
                .collect(),
            last_validate: None,
        }
    }
}

/// One metric family: its name, type and help.
struct Family {
    name: &'static str,
    kind: &'static str,
    help: &'static str,
}

const CHECKPOINTS: Family = Family {
    name: "ckptstore_checkpoints",
    kind: "gauge",
    help: "Checkpoints in the domain's committed chain.",
};
const OPEN: Family = Family {
    name: "ckptstore_open_transactions",
    kind: "gauge",
    help: "Open transactions of the domain, by whether their owner is alive (recover finishes a dead owner's).",
};
const LAST_COMMIT: Family = Family {
    name: "ckptstore_last_commit_timestamp_seconds",
    kind: "gauge",
    help: "When the domain's last transaction committed, in seconds since the epoch.",
};
const TOTAL: Family = Family {
    name: "ckptstore_transactions_total",
    kind: "counter",
    help: "Finished transactions of the domain by kind and outcome (one with nothing to do counts as committed).",
};
const FINDINGS: Family = Family {
    name: "ckptstore_validate_findings",
    kind: "gauge",
    help: "Findings of the domain's last validate, by kind.",
};
const LAST_VALIDATE: Family = Family {
    name: "ckptstore_last_validate_timestamp_seconds",
    kind: "gauge",
    help: "When the domain was last validated, in seconds since the epoch.",
};

impl Metrics {
    /// The document in Prometheus' text exposition format 0.0.4: each family
    /// with its `# HELP` and `# TYPE` lines and its samples together, label
    /// values escaped (backslash, double quote, newline), one line per
    /// sample, domains in the document's order. A time that is not RFC
    /// 3339 is left out.
    pub fn to_prometheus(&self) -> String {
        let mut out = String::new();
        family(&mut out, &CHECKPOINTS, |out| {
            for d in &self.domains {
                if let Some(n) = d.checkpoints {
                    sample(
                        out,
                        CHECKPOINTS.name,
                        &[("domain", &d.domain)],
                        &n.to_string(),
                    );
                }
            }
        });
        family(&mut out, &OPEN, |out| {
            for d in &self.domains {
                let o = d.open_transactions;
                for (alive, n) in [("false", o.owner_dead), ("true", o.owner_alive)] {
                    let labels = [("domain", d.domain.as_str()), ("owner_alive", alive)];
                    sample(out, OPEN.name, &labels, &n.to_string());
                }
            }
        });
        family(&mut out, &LAST_COMMIT, |out| {
            for d in &self.domains {
                if let Some(t) = d.last_commit_at.as_deref().and_then(seconds) {
                    sample(out, LAST_COMMIT.name, &[("domain", &d.domain)], &t);
                }
            }
        });
        family(&mut out, &TOTAL, |out| {
            for d in &self.domains {
                for t in &d.transactions {
                    let labels = [
                        ("domain", d.domain.as_str()),
                        ("kind", kind_name(t.kind)),
                        ("outcome", t.outcome.as_str()),
                    ];
                    sample(out, TOTAL.name, &labels, &t.count.to_string());
                }
            }
        });
        family(&mut out, &FINDINGS, |out| {
            for d in &self.domains {
                for f in d.last_validate.iter().flat_map(|v| &v.findings) {
                    let labels = [("domain", d.domain.as_str()), ("kind", f.kind.as_str())];
                    sample(out, FINDINGS.name, &labels, &f.count.to_string());
                }
            }
        });
        family(&mut out, &LAST_VALIDATE, |out| {
            for d in &self.domains {
                let at = d.last_validate.as_ref().map(|v| v.validated_at.as_str());
                if let Some(t) = at.and_then(seconds) {
                    sample(out, LAST_VALIDATE.name, &[("domain", &d.domain)], &t);
                }
            }
        });
        out
    }
}

fn family(out: &mut String, f: &Family, samples: impl FnOnce(&mut String)) {
    let _ = writeln!(out, "# HELP {} {}", f.name, f.help);
    let _ = writeln!(out, "# TYPE {} {}", f.name, f.kind);
    samples(out);
}

fn sample(out: &mut String, name: &str, labels: &[(&str, &str)], value: &str) {
    out.push_str(name);
    out.push('{');
    for (i, (k, v)) in labels.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(k);
        out.push_str("=\"");
        escape_label(out, v);
        out.push('"');
    }
    out.push_str("} ");
    out.push_str(value);
    out.push('\n');
}

/// A label value as the format wants it: `\` → `\\`, `"` → `\"`, a
/// newline → `\n`; everything else (any UTF-8) as it is.
fn escape_label(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
}

/// An RFC 3339 time as seconds since the epoch, to the millisecond.
fn seconds(t: &str) -> Option<String> {
    let ms = DateTime::parse_from_rfc3339(t).ok()?.timestamp_millis();
    Some(format!(
        "{}.{:03}",
        ms.div_euclid(1000),
        ms.rem_euclid(1000)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped_as_the_format_says() {
        let mut s = String::new();
        escape_label(&mut s, "a\\b\"c\nd é,=}{");
        assert_eq!(s, "a\\\\b\\\"c\\nd é,=}{");
    }

    #[test]
    fn times_are_seconds_to_the_millisecond() {
        assert_eq!(
            seconds("2024-05-01T09:00:00.042Z").as_deref(),
            Some("1714554000.042")
        );
        assert_eq!(
            seconds("1969-12-31T23:59:59.500Z").as_deref(),
            Some("-1.500")
        );
        assert_eq!(seconds("yesterday"), None);
    }

    #[test]
    fn every_kind_is_labelled_with_its_serde_name() {
        for &k in TXN_KINDS {
            assert_eq!(serde_json::to_value(k).unwrap(), kind_name(k));
        }
    }
}
