//! Journal vs libvirt: the names the journal may know a domain by, its
//! committed chain, and the comparison of that chain with libvirt's
//! checkpoints by name and content.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::{Finding, FindingKind};
use crate::backend::DomainInfo;
use crate::chain::CheckpointDef;
use crate::engine::Store;
use crate::error::Result;
use crate::journal::Committed;

/// The names the journal may know the domain by: as asked, its name, its UUID.
pub(super) fn journal_keys(domain: &str, info: &DomainInfo) -> Vec<String> {
    let mut keys: Vec<String> = Vec::new();
    for k in [domain, info.name.as_str(), info.uuid.as_str()] {
        if !k.is_empty() && !keys.iter().any(|have| have == k) {
            keys.push(k.to_string());
        }
    }
    keys
}

pub(super) fn committed_chain(store: &Store, keys: &[String]) -> Result<Option<Committed>> {
    for key in keys {
        if let Some(c) = store.committed(key)? {
            return Ok(Some(c));
        }
    }
    Ok(None)
}

/// Journal vs libvirt, by name: what the journal has that libvirt lacks or
/// holds differently (in the journal's order), then what only libvirt has
/// (in libvirt's order).
pub(super) fn compare_journal(
    journal: &[CheckpointDef],
    libvirt: &[CheckpointDef],
) -> Vec<Finding> {
    let lv: HashMap<&str, &CheckpointDef> = libvirt.iter().map(|d| (d.name.as_str(), d)).collect();
    let jn: HashSet<&str> = journal.iter().map(|d| d.name.as_str()).collect();
    let mut out = Vec::new();
    for j in journal {
        match lv.get(j.name.as_str()) {
            None => out.push(Finding {
                kind: FindingKind::MissingInLibvirt,
                checkpoint: Some(j.name.clone()),
                disk: None,
                image: None,
                detail: format!(
                    "the journal's committed chain has checkpoint {} ({}); libvirt does not",
                    j.name,
                    describe(j)
                ),
            }),
            Some(l) if *l != j => out.push(Finding {
                kind: FindingKind::Mismatch,
                checkpoint: Some(j.name.clone()),
                disk: None,
                image: None,
                detail: differences(j, l),
            }),
            Some(_) => {}
        }
    }
    for l in libvirt.iter().filter(|l| !jn.contains(l.name.as_str())) {
        out.push(Finding {
            kind: FindingKind::UnexpectedInLibvirt,
            checkpoint: Some(l.name.clone()),
            disk: None,
            image: None,
            detail: format!(
                "libvirt has checkpoint {} ({}); the journal's committed chain does not",
                l.name,
                describe(l)
            ),
        });
    }
    out
}

fn describe(d: &CheckpointDef) -> String {
    format!(
        "parent {}, creationTime {}, disks {}",
        parent_name(d),
        d.creation_time,
        disk_map(&d.disks)
    )
}

fn parent_name(d: &CheckpointDef) -> &str {
    d.parent.as_deref().unwrap_or("none")
}

fn disk_map(disks: &BTreeMap<String, String>) -> String {
    let parts: Vec<String> = disks.iter().map(|(t, b)| format!("{t}={b}")).collect();
    format!("{{{}}}", parts.join(", "))
}

fn differences(j: &CheckpointDef, l: &CheckpointDef) -> String {
    let mut parts = Vec::new();
    if j.parent != l.parent {
        parts.push(format!(
            "parent: journal {}, libvirt {}",
            parent_name(j),
            parent_name(l)
        ));
    }
    if j.creation_time != l.creation_time {
        parts.push(format!(
            "creationTime: journal {}, libvirt {}",
            j.creation_time, l.creation_time
        ));
    }
    if j.disks != l.disks {
        parts.push(format!(
            "disks: journal {}, libvirt {}",
            disk_map(&j.disks),
            disk_map(&l.disks)
        ));
    }
    if j.description != l.description {
        parts.push("description differs".into());
    }
    format!("checkpoint {} differs: {}", j.name, parts.join("; "))
}
