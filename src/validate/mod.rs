//! Validation: the journal's committed chain, libvirt's checkpoint metadata
//! and the bitmaps in each disk's qcow2 images, checked against each other —
//! the `virDomainCheckpointValidate()` libvirt never got.
//!
//! Three comparisons, each producing typed [`Finding`]s:
//!
//! - **journal vs libvirt**, by checkpoint name: a checkpoint of the
//!   journal's committed chain that libvirt lacks is
//!   [`FindingKind::MissingInLibvirt`], one libvirt has and the journal does
//!   not is [`FindingKind::UnexpectedInLibvirt`], and one whose parent,
//!   creation time, disk → bitmap map or description differ is
//!   [`FindingKind::Mismatch`]. A domain with no committed chain in the
//!   journal skips this comparison (the report says so in its notes).
//! - **libvirt vs images**, for every checkpoint libvirt lists and every
//!   disk of the domain it names, the bitmap it names (the checkpoint's
//!   `bitmap` attribute for that disk) is checked down the disk's backing
//!   chain with the rules libvirt's backup code applies
//!   (`qemuBlockBitmapChainIsValid`): it must be on the top layer
//!   ([`FindingKind::MissingBitmap`]); where it is also in backing layers
//!   those must continue it from the top without a gap
//!   ([`FindingKind::BrokenChain`]); in every layer that holds it, it must
//!   not be in use on a stopped domain, and the layer's bitmaps extension
//!   must be consistent, autoclear bit 0 set
//!   ([`FindingKind::InconsistentBitmap`]); and it must record writes, flag
//!   `auto` ([`FindingKind::DisabledBitmap`]).
//! - **images vs metadata**: a bitmap in a disk's top image that no
//!   checkpoint names for that disk — neither libvirt's nor the journal's
//!   — is [`FindingKind::OrphanBitmap`]. An image that cannot be read is
//!   [`FindingKind::UnreadableImage`]; its bitmaps count as unknown.
//!
//! A **shut-off** domain's images are read in-process, read-only, once per
//! disk ([`crate::qcow2::read_chain`] on the disk's source, following the
//! image's own backing chain: libvirt lists none for a shut-off domain).
//! A **running** domain's top layers hold every bitmap in use by design, and
//! its images on disk lag behind QEMU's bitmaps, so there the image rules
//! are replaced by libvirt's own check — the one `REDEFINE_VALIDATE` makes —
//! read for every checkpoint on every disk
//! ([`crate::Backend::bitmap_states`]: the checkpoint's XML with
//! `VIR_DOMAIN_CHECKPOINT_XML_SIZE`, where libvirt sizes only the bitmaps
//! that pass). Nothing is written in libvirt or the images: libvirt's
//! metadata, its hidden *current* checkpoint and the images stay as they
//! were. The one write is the report itself, kept in the journal as the
//! domain's last validate (what `metrics` shows). A bitmap libvirt finds
//! missing or broken is told apart by the image on disk, with the rules of a
//! shut-off domain except that a bitmap in use is expected: a
//! [`FindingKind::MissingBitmap`] when it is in no layer, the rule it breaks
//! there when it breaks one, an [`FindingKind::InconsistentBitmap`]
//! otherwise. So the same damage gives the same findings as on the shut-off
//! domain. A backend that cannot check per disk falls back to redefining
//! each checkpoint with exactly the XML libvirt holds (`<domain>`
//! included) and `REDEFINE_VALIDATE`, parent first with the leaf's branch
//! last, so the current checkpoint stays on the leaf; libvirt then names
//! only the first bad disk of a checkpoint. Orphans are not looked for on a
//! running domain.
//!
//! **Usable checkpoint.** Since libvirt 6.10 every checkpoint's bitmap keeps
//! recording on its own, and an incremental backup from checkpoint `C`
//! reads only the bitmaps named `C` (merged down the backing chain); the
//! bitmaps of later checkpoints play no part. So `C` is usable when, on
//! every disk that takes part in checkpoints (a disk of the domain that at
//! least one of libvirt's checkpoints names), `C` names a bitmap and that
//! bitmap passes every rule above (no finding, nothing unknown).
//! [`Report::usable`] is the newest such checkpoint on the path from
//! libvirt's newest leaf up to its root — the one whose backup copies the
//! least.
//!
//! The code map: `images.rs` (where a disk's layers and bitmaps come from:
//! [`ImageReader`], [`Qcow2Reader`]), `journal.rs` (journal vs libvirt),
//! `rules.rs` (the bitmap rules and the usable checkpoint), `check.rs` (the
//! shut-off and running checks, crash leftovers, detached disks); this file
//! holds [`validate`], [`validate_with`] and the report's types.
//!
//! ```no_run
//! use ckptstore::{validate, LibvirtBackend, Store};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let store = Store::open("/var/lib/ckptstore/journal.db")?;
//! let backend = LibvirtBackend::connect("qemu:///system")?;
//! let report = validate(&store, &backend, "vm1")?;
//! for f in &report.findings {
//!     println!("{:?} {:?} {:?}: {}", f.kind, f.checkpoint, f.disk, f.detail);
//! }
//! println!("incremental backup from: {:?}", report.usable);
//! # Ok(())
//! # }
//! ```

mod check;
mod journal;
mod rules;
#[cfg(test)]
mod tests;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::backend::{Backend, BackendError};
use crate::engine::Store;
use crate::error::{Error, Result};

#[cfg(feature = "testing")]
pub use crate::bitmaps::images::{DiskChain, ImageError, Layer, LayerBitmap};
pub use crate::bitmaps::images::{ImageReader, Qcow2Reader};
use check::{detached_notes, leftover_findings, Check};
use journal::{committed_chain, compare_journal, journal_keys};
use rules::{newest_leaf, newest_usable, participating};

/// What a finding is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum FindingKind {
    /// The journal's committed chain has the checkpoint; libvirt does not.
    MissingInLibvirt,
    /// libvirt has the checkpoint; the journal's committed chain does not.
    UnexpectedInLibvirt,
    /// Both have the checkpoint with different parent, creation time, disk
    /// → bitmap map or description.
    Mismatch,
    /// The checkpoint's bitmap is not on the disk's top image.
    MissingBitmap,
    /// The bitmap is in use on a stopped domain (QEMU did not save it), or
    /// its image's bitmaps extension is marked inconsistent.
    InconsistentBitmap,
    /// The bitmap has no `auto` flag: it does not record writes.
    DisabledBitmap,
    /// The bitmap is in a backing layer but missing from a layer above it.
    BrokenChain,
    /// A bitmap in the disk's top image that no checkpoint names.
    OrphanBitmap,
    /// The disk's image (or one of its backing files) could not be read.
    UnreadableImage,
    /// libvirt left `NAME.xml.new` beside the checkpoint's metadata (its
    /// daemon died while rewriting it): the next daemon start loads it.
    LibvirtLeftover,
}

impl From<crate::bitmaps::Problem> for FindingKind {
    fn from(p: crate::bitmaps::Problem) -> Self {
        use crate::bitmaps::Problem;
        match p {
            Problem::Missing => FindingKind::MissingBitmap,
            Problem::Inconsistent => FindingKind::InconsistentBitmap,
            Problem::Disabled => FindingKind::DisabledBitmap,
            Problem::BrokenChain => FindingKind::BrokenChain,
        }
    }
}

impl FindingKind {
    /// Every kind, in the order `metrics` lists them.
    pub const ALL: &'static [FindingKind] = &[
        FindingKind::MissingInLibvirt,
        FindingKind::UnexpectedInLibvirt,
        FindingKind::Mismatch,
        FindingKind::MissingBitmap,
        FindingKind::InconsistentBitmap,
        FindingKind::DisabledBitmap,
        FindingKind::BrokenChain,
        FindingKind::OrphanBitmap,
        FindingKind::UnreadableImage,
        FindingKind::LibvirtLeftover,
    ];

    /// The name used in JSON and messages (`missing_bitmap`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            FindingKind::MissingInLibvirt => "missing_in_libvirt",
            FindingKind::UnexpectedInLibvirt => "unexpected_in_libvirt",
            FindingKind::Mismatch => "mismatch",
            FindingKind::MissingBitmap => "missing_bitmap",
            FindingKind::InconsistentBitmap => "inconsistent_bitmap",
            FindingKind::DisabledBitmap => "disabled_bitmap",
            FindingKind::BrokenChain => "broken_chain",
            FindingKind::OrphanBitmap => "orphan_bitmap",
            FindingKind::UnreadableImage => "unreadable_image",
            FindingKind::LibvirtLeftover => "libvirt_leftover",
        }
    }
}

impl std::fmt::Display for FindingKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One disagreement between the journal, libvirt and the images.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Finding {
    /// What kind.
    pub kind: FindingKind,
    /// The checkpoint concerned (for an orphan: the bitmap's name).
    pub checkpoint: Option<String>,
    /// The disk concerned, by target name.
    pub disk: Option<String>,
    /// The file concerned: the image layer where the problem is, or for a
    /// [`FindingKind::LibvirtLeftover`] the leftover metadata file.
    pub image: Option<PathBuf>,
    /// What exactly is wrong, for people.
    pub detail: String,
}

/// The answer to [`validate`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Report {
    /// The domain, as asked.
    pub domain: String,
    /// No findings.
    pub ok: bool,
    /// Every finding: journal vs libvirt first, then per disk the bitmaps
    /// of libvirt's checkpoints (in libvirt's order), then orphans.
    pub findings: Vec<Finding>,
    /// The newest checkpoint on the path from libvirt's newest leaf to its
    /// root that is still usable for an incremental backup on every disk
    /// (see the module documentation); `None` when there is none.
    pub usable: Option<String>,
    /// libvirt's newest leaf checkpoint.
    pub leaf: Option<String>,
    /// Whether the domain was running (libvirt's check instead of the images').
    pub running: bool,
    /// How many checkpoints libvirt has.
    pub checkpoints: usize,
    /// The journal transaction whose committed chain was compared with
    /// libvirt; `None` when the journal has no committed chain for the
    /// domain and that comparison was skipped.
    pub journal_txn: Option<Uuid>,
    /// Image files read (every layer of every disk).
    pub images_read: usize,
    /// Checkpoints libvirt checked (running domains): one per-disk read
    /// each, or one `REDEFINE_VALIDATE` each where the backend cannot read
    /// per disk.
    pub libvirt_validations: usize,
    /// What was not checked, and why.
    pub notes: Vec<String>,
}

impl Report {
    /// The findings of one kind.
    pub fn of_kind(&self, kind: FindingKind) -> impl Iterator<Item = &Finding> {
        self.findings.iter().filter(move |f| f.kind == kind)
    }
}

/// Validate a domain: the journal's committed chain against libvirt's
/// checkpoints, and libvirt's checkpoints against the bitmaps in the
/// domain's images (read in-process when the domain is shut off, checked by
/// libvirt when it runs, per disk, changing nothing there; the report is
/// kept in the journal as the domain's last). See the module documentation
/// for the rules and for what [`Report::usable`] means.
///
/// `domain` is a libvirt domain name or UUID; the journal's committed chain
/// is looked up under it, then under the domain's name and UUID.
///
/// # Errors
///
/// [`Error::Busy`] when a live process holds an open transaction on the
/// domain; [`Error::Backend`] when libvirt cannot be reached, the domain
/// does not exist, or libvirt fails a call other than by refusing a
/// validation; [`Error::Journal`]. Findings are never errors.
pub fn validate(store: &Store, backend: &dyn Backend, domain: &str) -> Result<Report> {
    validate_with(store, backend, domain, &Qcow2Reader)
}

/// [`validate`], reading images with `reader`.
///
/// # Errors
///
/// As [`validate`].
pub fn validate_with(
    store: &Store,
    backend: &dyn Backend,
    domain: &str,
    reader: &dyn ImageReader,
) -> Result<Report> {
    let info = backend
        .domain_info(domain)
        .map_err(backend_err(domain, "domain lookup"))?;
    let keys = journal_keys(domain, &info);
    // No writer may change the domain while it is read.
    let _locks = keys
        .iter()
        .map(|k| store.lock_domain(k))
        .collect::<Result<Vec<_>>>()?;
    let mut notes = interrupted(store, &keys, domain)?;
    let libvirt = backend.list(domain).map_err(backend_err(domain, "list"))?;
    let committed = committed_chain(store, &keys)?;
    let mut findings = match &committed {
        Some(c) => compare_journal(&c.defs, &libvirt),
        None => {
            notes.push("the journal has no committed chain for this domain: journal vs libvirt not compared".into());
            Vec::new()
        }
    };
    notes.extend(detached_notes(&libvirt, &info));
    let journal_defs = committed.as_ref().map_or(&[][..], |c| c.defs.as_slice());
    let mut check = Check::new(&info, &libvirt, reader);
    let running = check
        .run(backend, domain, journal_defs)
        .map_err(backend_err(domain, "validate"))?;
    findings.append(&mut check.findings);
    notes.append(&mut check.notes);
    leftover_findings(backend, domain, &libvirt, &mut findings, &mut notes)?;
    // Recorded under the journal's name for the domain, where it has one.
    let key = committed.as_ref().map_or(domain, |c| c.domain.as_str());
    let key = key.to_string();
    let report = Report {
        domain: domain.to_string(),
        ok: findings.is_empty(),
        findings,
        usable: newest_usable(&libvirt, &check.bad, &participating(&libvirt, &info)),
        leaf: newest_leaf(&libvirt),
        running,
        checkpoints: libvirt.len(),
        journal_txn: committed.map(|c| c.txn),
        images_read: check.images_read,
        libvirt_validations: check.validations,
        notes,
    };
    record(store, &key, &report)?;
    Ok(report)
}

/// Keep the report as the domain's last validate (what `metrics` shows);
/// the journal is the only thing written.
fn record(store: &Store, key: &str, report: &Report) -> Result<()> {
    let json = serde_json::to_string(report).map_err(|e| {
        Error::Journal(crate::journal::JournalError::io(format!(
            "cannot encode the validate report: {e}"
        )))
    })?;
    Ok(store.journal().record_validation(key, &json)?)
}

/// Notes for the domain's open transactions whose owner is gone; a live
/// owner's makes the domain busy (the domain's lock is ours: only a live
/// process that left its transaction open after an error may hold one).
fn interrupted(store: &Store, keys: &[String], domain: &str) -> Result<Vec<String>> {
    let mut notes = Vec::new();
    for key in keys {
        for t in store.journal().incomplete(Some(key))? {
            if !store.orphaned(&t) {
                return Err(Error::Busy {
                    domain: domain.to_string(),
                    txn: Some(t.id),
                    owner: Some(t.owner),
                });
            }
            notes.push(format!(
                "transaction {} on this domain was interrupted and is still open: libvirt may hold part of it; \
                 run recover, then validate again",
                t.id
            ));
        }
    }
    Ok(notes)
}

fn backend_err<'a>(domain: &'a str, op: &'static str) -> impl Fn(BackendError) -> Error + 'a {
    move |source| Error::Backend {
        domain: domain.to_string(),
        op,
        txn: None,
        source,
    }
}
