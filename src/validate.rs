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
//! A **running** domain's top layers hold every bitmap in use by design, so
//! there the image rules are replaced by libvirt's own check: every
//! checkpoint is redefined in place, with its current content, with
//! `REDEFINE_VALIDATE`; a refusal ([`crate::BackendErrorKind::Inconsistent`])
//! becomes a [`FindingKind::MissingBitmap`] when the bitmap is in no layer
//! of the image on disk, and an [`FindingKind::InconsistentBitmap`]
//! otherwise, with libvirt's message in the detail. The redefines run
//! parent first with the leaf's branch last, so libvirt's hidden *current*
//! checkpoint stays on the leaf (a refused redefine changes nothing). These
//! calls are not journaled: each writes back exactly what libvirt listed.
//! Orphans are not looked for on a running domain (its images on disk lag
//! behind QEMU's bitmaps).
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

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::backend::{
    Backend, BackendError, BackendErrorKind, DomainDisk, DomainInfo, LeftoverScan,
};
use crate::chain::{order_defs, spine_path, CheckpointDef};
use crate::engine::Store;
use crate::error::{Error, Result};
use crate::journal::Committed;
use crate::qcow2::{self, ChainEnd};
use crate::xml::render_checkpoint;

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

impl FindingKind {
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
    /// `REDEFINE_VALIDATE` calls made (running domains).
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

/// One bitmap of one image layer, as validation needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerBitmap {
    /// The bitmap's name.
    pub name: String,
    /// Flag `in_use`: not saved cleanly.
    pub in_use: bool,
    /// Flag `auto`: records writes.
    pub auto: bool,
}

/// One qcow2 file of a disk's backing chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// The file.
    pub path: PathBuf,
    /// `false` when the bitmaps extension is marked inconsistent (autoclear
    /// bit 0 clear): QEMU ignores every bitmap of the file.
    pub bitmaps_consistent: bool,
    /// Its bitmaps.
    pub bitmaps: Vec<LayerBitmap>,
}

/// A disk's qcow2 layers, top first.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DiskChain {
    /// The qcow2 layers; empty when the disk's image is not qcow2.
    pub layers: Vec<Layer>,
    /// Set when the chain goes on below the last layer in a form that was
    /// not followed (a `json:` or protocol backing name): what it says.
    pub unfollowed: Option<String>,
}

/// Why a disk's chain could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ImageError {
    /// The disk's image itself is not qcow2: it holds no bitmaps.
    NotQcow2 {
        /// The image.
        path: PathBuf,
    },
    /// The image or a backing file could not be read.
    Unreadable {
        /// The file that failed.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// Where validation gets a disk's layers from. [`Qcow2Reader`] reads the
/// files in-process; a test or a bench may supply another.
pub trait ImageReader {
    /// The layers of the image at `path` and of its backing files, top first.
    ///
    /// # Errors
    ///
    /// [`ImageError::NotQcow2`] when the image at `path` is not qcow2,
    /// [`ImageError::Unreadable`] when it or a backing file cannot be read.
    fn read_chain(&self, path: &Path) -> std::result::Result<DiskChain, ImageError>;
}

/// The in-process reader: [`crate::qcow2::read_chain`], read-only, one read
/// of each file's header and bitmap directory.
#[derive(Debug, Clone, Copy, Default)]
pub struct Qcow2Reader;

impl ImageReader for Qcow2Reader {
    fn read_chain(&self, path: &Path) -> std::result::Result<DiskChain, ImageError> {
        match qcow2::read_chain(path) {
            Ok(chain) => Ok(DiskChain {
                unfollowed: match chain.end {
                    ChainEnd::Unreadable(name) => Some(name),
                    _ => None,
                },
                layers: chain
                    .layers
                    .into_iter()
                    .map(|image| Layer {
                        bitmaps_consistent: image.bitmaps_consistent,
                        bitmaps: image
                            .bitmaps
                            .into_iter()
                            .map(|b| LayerBitmap {
                                name: b.name,
                                in_use: b.in_use,
                                auto: b.auto,
                            })
                            .collect(),
                        path: image.path,
                    })
                    .collect(),
            }),
            Err(e) if e.is_not_qcow2() && e.path() == path => Err(ImageError::NotQcow2 {
                path: path.to_path_buf(),
            }),
            Err(e) => Err(ImageError::Unreadable {
                path: e.path().to_path_buf(),
                reason: e.to_string(),
            }),
        }
    }
}

/// Validate a domain: the journal's committed chain against libvirt's
/// checkpoints, and libvirt's checkpoints against the bitmaps in the
/// domain's images (read in-process when the domain is shut off, checked by
/// libvirt's `REDEFINE_VALIDATE` when it runs). See the module documentation
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
    // No writer may change the domain while it is read (and, when it runs,
    // redefined in place).
    let _locks = keys
        .iter()
        .map(|k| store.lock_domain(k))
        .collect::<Result<Vec<_>>>()?;
    let mut notes = Vec::new();
    for key in &keys {
        for t in store.journal().incomplete(Some(key))? {
            // The domain's lock is ours: only a live process that left the
            // transaction open after an error may still hold it.
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
    let libvirt = backend.list(domain).map_err(backend_err(domain, "list"))?;
    let committed = committed_chain(store, &keys)?;

    let mut findings = match &committed {
        Some(c) => compare_journal(&c.defs, &libvirt),
        None => {
            notes.push("the journal has no committed chain for this domain: journal vs libvirt not compared".into());
            Vec::new()
        }
    };
    let journal_defs = committed
        .as_ref()
        .map(|c| c.defs.as_slice())
        .unwrap_or_default();
    notes.extend(detached_notes(&libvirt, &info));

    let mut check = Check {
        info: &info,
        libvirt: &libvirt,
        reader,
        findings: Vec::new(),
        bad: HashSet::new(),
    };
    let mut images_read = 0;
    let mut validations = 0;
    let running = if info.running {
        match check.running(backend, domain, &mut images_read, &mut validations) {
            Ok(()) => true,
            // The domain stopped since it was looked up: check its images.
            Err(e) if e.kind == BackendErrorKind::NotRunning => {
                notes.push(
                    "the domain stopped during validation: its images were checked instead".into(),
                );
                check.findings.clear();
                check.bad.clear();
                check.stopped(journal_defs, &mut images_read, &mut notes);
                false
            }
            Err(e) => {
                return Err(Error::Backend {
                    domain: domain.to_string(),
                    op: "validate",
                    txn: None,
                    source: e,
                })
            }
        }
    } else {
        check.stopped(journal_defs, &mut images_read, &mut notes);
        false
    };
    if running {
        notes.push(
            "the domain is running: bitmaps checked by libvirt (REDEFINE_VALIDATE); orphans not looked for".into(),
        );
    }
    findings.append(&mut check.findings);
    // After the running domain's redefines, which consume the leftovers of
    // the checkpoints they rewrite.
    leftover_findings(backend, domain, &libvirt, &mut findings, &mut notes)?;
    let usable = newest_usable(&libvirt, &check.bad, &participating(&libvirt, &info));
    let index: HashMap<&str, usize> = libvirt
        .iter()
        .enumerate()
        .map(|(i, d)| (d.name.as_str(), i))
        .collect();
    let leaf = spine_path(&libvirt, &index)
        .last()
        .map(|&i| libvirt[i].name.clone());
    Ok(Report {
        domain: domain.to_string(),
        ok: findings.is_empty(),
        findings,
        usable,
        leaf,
        running,
        checkpoints: libvirt.len(),
        journal_txn: committed.map(|c| c.txn),
        images_read,
        libvirt_validations: validations,
        notes,
    })
}

/// libvirt's crash leftovers among the domain's checkpoint files, each a
/// finding; where the files cannot be read, a note says so.
fn leftover_findings(
    backend: &dyn Backend,
    domain: &str,
    libvirt: &[CheckpointDef],
    findings: &mut Vec<Finding>,
    notes: &mut Vec<String>,
) -> Result<()> {
    match backend
        .leftovers(domain)
        .map_err(backend_err(domain, "leftovers"))?
    {
        LeftoverScan::CannotCheck(why) => notes.push(format!(
            "libvirt's metadata files not checked for crash leftovers: {why}"
        )),
        LeftoverScan::Checked(found) => findings.extend(found.iter().map(|l| Finding {
            kind: FindingKind::LibvirtLeftover,
            checkpoint: Some(l.checkpoint.clone()),
            disk: None,
            image: Some(l.path.clone()),
            detail: format!(
                "{}; a sync, recover or import of the domain repairs it",
                crate::leftovers::effect(l, libvirt.iter().find(|d| d.name == l.checkpoint))
            ),
        })),
    }
    Ok(())
}

fn backend_err<'a>(domain: &'a str, op: &'static str) -> impl Fn(BackendError) -> Error + 'a {
    move |source| Error::Backend {
        domain: domain.to_string(),
        op,
        txn: None,
        source,
    }
}

/// The names the journal may know the domain by: as asked, its name, its UUID.
fn journal_keys(domain: &str, info: &DomainInfo) -> Vec<String> {
    let mut keys: Vec<String> = Vec::new();
    for k in [domain, info.name.as_str(), info.uuid.as_str()] {
        if !k.is_empty() && !keys.iter().any(|have| have == k) {
            keys.push(k.to_string());
        }
    }
    keys
}

fn committed_chain(store: &Store, keys: &[String]) -> Result<Option<Committed>> {
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
fn compare_journal(journal: &[CheckpointDef], libvirt: &[CheckpointDef]) -> Vec<Finding> {
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

/// Notes for checkpoints naming disks the domain no longer has (libvirt
/// tolerates them: a disk may have been detached).
fn detached_notes(libvirt: &[CheckpointDef], info: &DomainInfo) -> Vec<String> {
    let mut by_target: BTreeMap<&str, usize> = BTreeMap::new();
    for d in libvirt {
        for t in d.disks.keys().filter(|t| !info.has_target(t)) {
            *by_target.entry(t).or_default() += 1;
        }
    }
    by_target
        .into_iter()
        .map(|(t, n)| {
            format!("{n} checkpoint(s) name disk {t}, which the domain no longer has: not checked")
        })
        .collect()
}

/// The disks that take part in checkpoints: the domain's disks that at
/// least one of libvirt's checkpoints names.
fn participating<'a>(libvirt: &'a [CheckpointDef], info: &DomainInfo) -> BTreeSet<&'a str> {
    libvirt
        .iter()
        .flat_map(|d| d.disks.keys())
        .filter(|t| info.has_target(t))
        .map(String::as_str)
        .collect()
}

/// The newest checkpoint on the leaf's path (leaf first, up to the root)
/// that has no finding or unknown, and names every participating disk.
fn newest_usable(
    libvirt: &[CheckpointDef],
    bad: &HashSet<String>,
    disks: &BTreeSet<&str>,
) -> Option<String> {
    let index: HashMap<&str, usize> = libvirt
        .iter()
        .enumerate()
        .map(|(i, d)| (d.name.as_str(), i))
        .collect();
    spine_path(libvirt, &index)
        .into_iter()
        .rev()
        .map(|i| &libvirt[i])
        .find(|d| !bad.contains(&d.name) && disks.iter().all(|t| d.disks.contains_key(*t)))
        .map(|d| d.name.clone())
}

/// A disk's layers with a name index per layer.
struct Indexed<'a> {
    chain: &'a DiskChain,
    by_name: Vec<HashMap<&'a str, &'a LayerBitmap>>,
}

impl<'a> Indexed<'a> {
    fn new(chain: &'a DiskChain) -> Self {
        let by_name = chain
            .layers
            .iter()
            .map(|l| l.bitmaps.iter().map(|b| (b.name.as_str(), b)).collect())
            .collect();
        Indexed { chain, by_name }
    }

    fn in_any_layer(&self, bitmap: &str) -> bool {
        self.by_name.iter().any(|m| m.contains_key(bitmap))
    }
}

/// One finding about a bitmap on one disk: its kind, the layer concerned
/// (`None`: the disk's image itself), and the detail.
type BitmapFinding = (FindingKind, Option<PathBuf>, String);

/// What one disk's chain says about one bitmap. Empty when the bitmap is
/// usable.
#[cfg(test)]
fn check_bitmap(chain: &DiskChain, bitmap: &str) -> Vec<BitmapFinding> {
    bitmap_findings(&Indexed::new(chain), bitmap)
}

fn bitmap_findings(disk: &Indexed<'_>, bitmap: &str) -> Vec<BitmapFinding> {
    let layers = &disk.chain.layers;
    let Some(top) = layers.first() else {
        return vec![(
            FindingKind::MissingBitmap,
            None,
            format!("bitmap {bitmap} cannot exist: the disk's image is not qcow2"),
        )];
    };
    let present: Vec<Option<&LayerBitmap>> = disk
        .by_name
        .iter()
        .map(|m| m.get(bitmap).copied())
        .collect();
    let run = present.iter().take_while(|p| p.is_some()).count();
    let mut out = Vec::new();
    if run == 0 {
        match present.iter().position(Option::is_some) {
            Some(k) => out.push((
                FindingKind::BrokenChain,
                Some(top.path.clone()),
                format!(
                    "bitmap {bitmap} is in backing layer {k} ({}) but not in the top image",
                    layers[k].path.display()
                ),
            )),
            None => {
                let stale = if top.bitmaps_consistent {
                    ""
                } else {
                    " (and the image's bitmaps extension is marked inconsistent)"
                };
                let below = if layers.len() > 1 {
                    " nor in any backing layer"
                } else {
                    ""
                };
                out.push((
                    FindingKind::MissingBitmap,
                    Some(top.path.clone()),
                    format!("bitmap {bitmap} is not in the top image{below}{stale}"),
                ));
            }
        }
        return out;
    }
    if let Some(again) = present.iter().skip(run).position(Option::is_some) {
        let again = run + again;
        out.push((
            FindingKind::BrokenChain,
            Some(layers[run].path.clone()),
            format!(
                "bitmap {bitmap} is in backing layer {again} ({}) but missing from layer {run} above it",
                layers[again].path.display()
            ),
        ));
    }
    for (layer, b) in layers.iter().zip(&present).take(run) {
        let Some(b) = b else { continue };
        if !layer.bitmaps_consistent {
            out.push((
                FindingKind::InconsistentBitmap,
                Some(layer.path.clone()),
                format!(
                    "the image's bitmaps extension is marked inconsistent (autoclear bit 0 clear): QEMU ignores \
                     bitmap {bitmap} and every other bitmap of it"
                ),
            ));
        } else if b.in_use {
            out.push((
                FindingKind::InconsistentBitmap,
                Some(layer.path.clone()),
                format!(
                    "bitmap {bitmap} is in use on a stopped domain: QEMU did not save it cleanly"
                ),
            ));
        }
        if !b.auto {
            out.push((
                FindingKind::DisabledBitmap,
                Some(layer.path.clone()),
                format!("bitmap {bitmap} is disabled (no auto flag): it does not record writes"),
            ));
        }
    }
    out
}

/// The state of one validation run.
struct Check<'a> {
    info: &'a DomainInfo,
    libvirt: &'a [CheckpointDef],
    reader: &'a dyn ImageReader,
    findings: Vec<Finding>,
    /// Checkpoints with a finding or an unknown on some disk.
    bad: HashSet<String>,
}

/// A disk's chain as read, or why it is unknown.
enum Read {
    Chain(DiskChain),
    Unknown,
}

impl Check<'_> {
    /// Read one disk's chain, recording an unreadable image as a finding.
    fn read(
        &mut self,
        disk: &DomainDisk,
        images_read: &mut usize,
        notes: &mut Vec<String>,
    ) -> Read {
        let Some(source) = &disk.source else {
            self.findings.push(Finding {
                kind: FindingKind::UnreadableImage,
                checkpoint: None,
                disk: Some(disk.target.clone()),
                image: None,
                detail:
                    "the disk has no local file or block device source: its bitmaps cannot be read"
                        .into(),
            });
            return Read::Unknown;
        };
        if disk.format.as_deref().is_some_and(|f| f != "qcow2") {
            return Read::Chain(DiskChain::default());
        }
        match self.reader.read_chain(source) {
            Ok(chain) => {
                *images_read += chain.layers.len();
                if let Some(name) = &chain.unfollowed {
                    notes.push(format!(
                        "disk {}: backing file {name:?} is not a local file and was not read; bitmaps below it \
                         not checked",
                        disk.target
                    ));
                }
                Read::Chain(chain)
            }
            Err(ImageError::NotQcow2 { .. }) => {
                *images_read += 1;
                Read::Chain(DiskChain::default())
            }
            Err(ImageError::Unreadable { path, reason }) => {
                *images_read += 1;
                self.findings.push(Finding {
                    kind: FindingKind::UnreadableImage,
                    checkpoint: None,
                    disk: Some(disk.target.clone()),
                    image: Some(path),
                    detail: reason,
                });
                Read::Unknown
            }
        }
    }

    /// The image checks of a shut-off domain: each disk's chain read once.
    fn stopped(
        &mut self,
        journal: &[CheckpointDef],
        images_read: &mut usize,
        notes: &mut Vec<String>,
    ) {
        let libvirt = self.libvirt;
        for disk in &self.info.disks {
            let named: Vec<(&CheckpointDef, &str)> = libvirt
                .iter()
                .filter_map(|d| d.disks.get(&disk.target).map(|b| (d, b.as_str())))
                .collect();
            let chain = match self.read(disk, images_read, notes) {
                Read::Chain(chain) => chain,
                Read::Unknown => {
                    self.bad.extend(named.iter().map(|(d, _)| d.name.clone()));
                    continue;
                }
            };
            let indexed = Indexed::new(&chain);
            for (def, bitmap) in &named {
                let found = bitmap_findings(&indexed, bitmap);
                if !found.is_empty() {
                    self.bad.insert(def.name.clone());
                }
                for (kind, image, detail) in found {
                    self.findings.push(Finding {
                        kind,
                        checkpoint: Some(def.name.clone()),
                        disk: Some(disk.target.clone()),
                        image: image.or_else(|| disk.source.clone()),
                        detail,
                    });
                }
            }
            let Some(top) = chain.layers.first() else {
                continue;
            };
            let known: HashSet<&str> = named
                .iter()
                .map(|(_, b)| *b)
                .chain(
                    journal
                        .iter()
                        .filter_map(|d| d.disks.get(&disk.target).map(String::as_str)),
                )
                .collect();
            for b in top
                .bitmaps
                .iter()
                .filter(|b| !known.contains(b.name.as_str()))
            {
                self.findings.push(Finding {
                    kind: FindingKind::OrphanBitmap,
                    checkpoint: Some(b.name.clone()),
                    disk: Some(disk.target.clone()),
                    image: Some(top.path.clone()),
                    detail: format!(
                        "bitmap {} is in the top image but no checkpoint names it for this disk",
                        b.name
                    ),
                });
            }
        }
    }

    /// libvirt's check of a running domain: every checkpoint redefined in
    /// place with `REDEFINE_VALIDATE`, parent first, the leaf's branch last.
    fn running(
        &mut self,
        backend: &dyn Backend,
        domain: &str,
        images_read: &mut usize,
        validations: &mut usize,
    ) -> std::result::Result<(), BackendError> {
        let mut chains: HashMap<String, Read> = HashMap::new();
        let mut ignored = Vec::new();
        for def in order_defs(self.libvirt) {
            *validations += 1;
            let e = match backend.redefine(domain, &render_checkpoint(def), true) {
                Ok(()) => continue,
                Err(e) if e.kind == BackendErrorKind::Inconsistent => e,
                Err(e) => return Err(e),
            };
            self.bad.insert(def.name.clone());
            let target = refused_disk(def, &e.message, self.info);
            let mut kind = FindingKind::InconsistentBitmap;
            let mut image = None;
            let mut on_disk = String::new();
            if let Some((target, bitmap)) = target.and_then(|t| def.disks.get_key_value(t)) {
                let disk = self.info.disks.iter().find(|d| d.target == *target);
                if let Some(disk) = disk {
                    image = disk.source.clone();
                    if !chains.contains_key(target) {
                        let read = self.read(disk, images_read, &mut ignored);
                        chains.insert(target.clone(), read);
                    }
                    if let Some(Read::Chain(chain)) = chains.get(target) {
                        if Indexed::new(chain).in_any_layer(bitmap) {
                            on_disk = format!("; bitmap {bitmap} is in the image on disk");
                        } else {
                            kind = FindingKind::MissingBitmap;
                            on_disk =
                                format!("; bitmap {bitmap} is in no layer of the image on disk");
                        }
                    }
                }
            }
            self.findings.push(Finding {
                kind,
                checkpoint: Some(def.name.clone()),
                disk: target.map(str::to_string),
                image,
                detail: format!("libvirt refused to validate it: {}{on_disk}", e.message),
            });
        }
        Ok(())
    }
}

/// The disk a refused validation is about: the one libvirt's message names
/// ("... for disk 'vda'") if the checkpoint names it, else the checkpoint's
/// only disk the domain has. Used to annotate the finding only.
fn refused_disk<'a>(def: &'a CheckpointDef, message: &str, info: &DomainInfo) -> Option<&'a str> {
    let mut attached = def.disks.keys().filter(|t| info.has_target(t));
    if let Some(named) = message
        .rsplit_once("for disk '")
        .and_then(|(_, rest)| rest.split_once('\''))
    {
        if let Some(t) = def.disks.keys().find(|t| **t == named.0) {
            return Some(t.as_str());
        }
    }
    match (attached.next(), attached.next()) {
        (Some(t), None) => Some(t.as_str()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::fake::FakeBackend;
    use crate::engine::StoreOptions;

    const UUID: &str = "5f0c5c16-0000-4000-8000-000000000001";

    fn def(name: &str, parent: Option<&str>, t: i64, disks: &[&str]) -> CheckpointDef {
        CheckpointDef {
            name: name.into(),
            parent: parent.map(Into::into),
            creation_time: t,
            description: None,
            disks: disks
                .iter()
                .map(|d| (d.to_string(), name.to_string()))
                .collect(),
        }
    }

    fn line(n: usize, disks: &[&str]) -> Vec<CheckpointDef> {
        (0..n)
            .map(|i| {
                let p = (i > 0).then(|| format!("c{}", i - 1));
                def(&format!("c{i}"), p.as_deref(), 100 + i as i64, disks)
            })
            .collect()
    }

    fn layer(path: &str, bitmaps: &[(&str, bool, bool)]) -> Layer {
        Layer {
            path: path.into(),
            bitmaps_consistent: true,
            bitmaps: bitmaps
                .iter()
                .map(|(n, in_use, auto)| LayerBitmap {
                    name: n.to_string(),
                    in_use: *in_use,
                    auto: *auto,
                })
                .collect(),
        }
    }

    fn good(path: &str, names: &[&str]) -> Layer {
        layer(
            path,
            &names.iter().map(|n| (*n, false, true)).collect::<Vec<_>>(),
        )
    }

    /// Images by path, for the fake's `/fake/<domain>/<target>.qcow2`.
    #[derive(Default)]
    struct Images(HashMap<PathBuf, std::result::Result<DiskChain, ImageError>>);

    impl Images {
        fn disk(mut self, target: &str, layers: Vec<Layer>) -> Self {
            self.0.insert(
                format!("/fake/vm/{target}.qcow2").into(),
                Ok(DiskChain {
                    layers,
                    unfollowed: None,
                }),
            );
            self
        }
    }

    impl ImageReader for Images {
        fn read_chain(&self, path: &Path) -> std::result::Result<DiskChain, ImageError> {
            self.0.get(path).cloned().unwrap_or_else(|| {
                Err(ImageError::Unreadable {
                    path: path.into(),
                    reason: "no such file (test)".into(),
                })
            })
        }
    }

    struct Setup {
        _dir: tempfile::TempDir,
        store: Store,
        fake: FakeBackend,
    }

    fn setup(targets: &[&str], running: bool, defs: Vec<CheckpointDef>) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_with(dir.path().join("j.db"), StoreOptions::default()).unwrap();
        let fake = FakeBackend::new();
        fake.define_domain("vm", UUID, targets, running);
        fake.set_checkpoints("vm", defs);
        Setup {
            _dir: dir,
            store,
            fake,
        }
    }

    fn kinds(r: &Report) -> Vec<(FindingKind, Option<&str>, Option<&str>)> {
        r.findings
            .iter()
            .map(|f| (f.kind, f.checkpoint.as_deref(), f.disk.as_deref()))
            .collect()
    }

    #[test]
    fn clean_domain_is_ok_and_the_leaf_is_usable() {
        let s = setup(&["vda", "vdb"], false, line(3, &["vda", "vdb"]));
        s.store.import(&s.fake, "vm").unwrap();
        let images = Images::default()
            .disk("vda", vec![good("/fake/vm/vda.qcow2", &["c0", "c1", "c2"])])
            .disk("vdb", vec![good("/fake/vm/vdb.qcow2", &["c0", "c1", "c2"])]);
        let r = validate_with(&s.store, &s.fake, "vm", &images).unwrap();
        assert!(r.ok, "{r:#?}");
        assert_eq!(
            (r.usable.as_deref(), r.leaf.as_deref()),
            (Some("c2"), Some("c2"))
        );
        assert_eq!((r.images_read, r.checkpoints, r.running), (2, 3, false));
        assert!(r.journal_txn.is_some());
        // The domain is found in the journal by UUID as well.
        let r = validate_with(&s.store, &s.fake, UUID, &images).unwrap();
        assert!(r.ok && r.journal_txn.is_some(), "{r:#?}");
    }

    #[test]
    fn journal_against_libvirt() {
        let s = setup(&["vda"], false, line(4, &["vda"]));
        s.store.import(&s.fake, "vm").unwrap();
        let mut changed = line(4, &["vda"]);
        changed[1].creation_time = 7;
        changed[2].disks.insert("vda".into(), "other".into());
        changed.pop();
        changed.push(def("x", Some("c2"), 500, &["vda"]));
        s.fake.set_checkpoints("vm", changed);
        let images = Images::default().disk(
            "vda",
            vec![good(
                "/fake/vm/vda.qcow2",
                &["c0", "c1", "c2", "c3", "x", "other"],
            )],
        );
        let r = validate_with(&s.store, &s.fake, "vm", &images).unwrap();
        assert_eq!(
            kinds(&r),
            [
                (FindingKind::Mismatch, Some("c1"), None),
                (FindingKind::Mismatch, Some("c2"), None),
                (FindingKind::MissingInLibvirt, Some("c3"), None),
                (FindingKind::UnexpectedInLibvirt, Some("x"), None),
            ]
        );
        assert!(
            r.findings[0]
                .detail
                .contains("creationTime: journal 101, libvirt 7"),
            "{}",
            r.findings[0].detail
        );
        assert!(r.findings[1]
            .detail
            .contains("disks: journal {vda=c2}, libvirt {vda=other}"));
        // c3's bitmap is known to the journal: not an orphan.
        assert_eq!(r.usable.as_deref(), Some("x"));
    }

    #[test]
    fn no_committed_chain_skips_the_journal_comparison() {
        let s = setup(&["vda"], false, line(2, &["vda"]));
        let images = Images::default().disk("vda", vec![good("/fake/vm/vda.qcow2", &["c0", "c1"])]);
        let r = validate_with(&s.store, &s.fake, "vm", &images).unwrap();
        assert!(r.ok && r.journal_txn.is_none());
        assert!(
            r.notes.iter().any(|n| n.contains("no committed chain")),
            "{:?}",
            r.notes
        );
    }

    #[test]
    fn bitmap_rules() {
        let chain = |layers: Vec<Layer>| DiskChain {
            layers,
            unfollowed: None,
        };
        let kinds = |c: &DiskChain, b: &str| {
            check_bitmap(c, b)
                .into_iter()
                .map(|f| (f.0, f.1))
                .collect::<Vec<_>>()
        };
        let p = |s: &str| Some(PathBuf::from(s));
        let ok = chain(vec![
            good("top", &["a"]),
            good("mid", &["a"]),
            good("base", &[]),
        ]);
        assert!(kinds(&ok, "a").is_empty());
        assert_eq!(kinds(&ok, "b"), [(FindingKind::MissingBitmap, p("top"))]);
        let gap = chain(vec![
            good("top", &["a"]),
            good("mid", &[]),
            good("base", &["a"]),
        ]);
        assert_eq!(kinds(&gap, "a"), [(FindingKind::BrokenChain, p("mid"))]);
        let below = chain(vec![good("top", &[]), good("base", &["a"])]);
        assert_eq!(kinds(&below, "a"), [(FindingKind::BrokenChain, p("top"))]);
        let flags = chain(vec![
            layer("top", &[("a", true, false)]),
            layer("base", &[("a", false, false)]),
        ]);
        assert_eq!(
            kinds(&flags, "a"),
            [
                (FindingKind::InconsistentBitmap, p("top")),
                (FindingKind::DisabledBitmap, p("top")),
                (FindingKind::DisabledBitmap, p("base"))
            ]
        );
        let mut stale = good("top", &["a"]);
        stale.bitmaps_consistent = false;
        assert_eq!(
            kinds(&chain(vec![stale]), "a"),
            [(FindingKind::InconsistentBitmap, p("top"))]
        );
        assert_eq!(
            kinds(&chain(vec![]), "a"),
            [(FindingKind::MissingBitmap, None)]
        );
    }

    #[test]
    fn usable_is_the_newest_good_checkpoint_on_the_leaf_path() {
        // c3's bitmap is missing on vdb, c2's is disabled on vda: c1 is usable.
        let s = setup(&["vda", "vdb"], false, line(4, &["vda", "vdb"]));
        let images = Images::default()
            .disk(
                "vda",
                vec![layer(
                    "/fake/vm/vda.qcow2",
                    &[
                        ("c0", false, true),
                        ("c1", false, true),
                        ("c2", false, false),
                        ("c3", false, true),
                        ("zz", false, true),
                    ],
                )],
            )
            .disk("vdb", vec![good("/fake/vm/vdb.qcow2", &["c0", "c1", "c2"])]);
        let r = validate_with(&s.store, &s.fake, "vm", &images).unwrap();
        assert_eq!(
            kinds(&r),
            [
                (FindingKind::DisabledBitmap, Some("c2"), Some("vda")),
                (FindingKind::OrphanBitmap, Some("zz"), Some("vda")),
                (FindingKind::MissingBitmap, Some("c3"), Some("vdb")),
            ]
        );
        assert_eq!(r.usable.as_deref(), Some("c1"));
        assert!(!r.ok);
    }

    #[test]
    fn a_checkpoint_missing_a_disk_others_name_is_not_usable() {
        // vdb was attached after c0: only c1 covers both disks.
        let mut defs = line(2, &["vda", "vdb"]);
        defs[0].disks.remove("vdb");
        let s = setup(&["vda", "vdb"], false, defs);
        let images = Images::default()
            .disk("vda", vec![good("/fake/vm/vda.qcow2", &["c0", "c1"])])
            .disk("vdb", vec![good("/fake/vm/vdb.qcow2", &["c1"])]);
        let r = validate_with(&s.store, &s.fake, "vm", &images).unwrap();
        assert!(r.ok);
        assert_eq!(r.usable.as_deref(), Some("c1"));
        let images = Images::default()
            .disk("vda", vec![good("/fake/vm/vda.qcow2", &["c0", "c1"])])
            .disk("vdb", vec![good("/fake/vm/vdb.qcow2", &[])]);
        let r = validate_with(&s.store, &s.fake, "vm", &images).unwrap();
        assert_eq!(
            kinds(&r),
            [(FindingKind::MissingBitmap, Some("c1"), Some("vdb"))]
        );
        assert_eq!(r.usable, None);
    }

    #[test]
    fn unreadable_images_make_their_checkpoints_unknown() {
        let s = setup(&["vda", "vdb"], false, line(2, &["vda", "vdb"]));
        let images = Images::default().disk("vda", vec![good("/fake/vm/vda.qcow2", &["c0", "c1"])]);
        let r = validate_with(&s.store, &s.fake, "vm", &images).unwrap();
        assert_eq!(
            kinds(&r),
            [(FindingKind::UnreadableImage, None, Some("vdb"))]
        );
        assert_eq!(r.usable, None);
    }

    #[test]
    fn detached_disks_are_noted_not_found() {
        let s = setup(&["vda"], false, line(2, &["vda", "vdz"]));
        let images = Images::default().disk("vda", vec![good("/fake/vm/vda.qcow2", &["c0", "c1"])]);
        let r = validate_with(&s.store, &s.fake, "vm", &images).unwrap();
        assert!(r.ok, "{r:#?}");
        assert_eq!(r.usable.as_deref(), Some("c1"));
        assert!(
            r.notes.iter().any(|n| n.contains("disk vdz")),
            "{:?}",
            r.notes
        );
    }

    #[test]
    fn running_domain_is_checked_by_libvirt_and_current_stays_on_the_leaf() {
        let s = setup(&["vda"], true, line(3, &["vda"]));
        s.fake.add_bitmap("vm", "vda", "c0");
        s.fake.add_bitmap("vm", "vda", "c2");
        assert_eq!(s.fake.current("vm").as_deref(), Some("c2"));
        // On disk, c1 was never written either: missing.
        let images = Images::default().disk(
            "vda",
            vec![layer("/fake/vm/vda.qcow2", &[("c0", true, true)])],
        );
        let r = validate_with(&s.store, &s.fake, "vm", &images).unwrap();
        assert!(r.running);
        assert_eq!(
            kinds(&r),
            [(FindingKind::MissingBitmap, Some("c1"), Some("vda"))]
        );
        assert!(
            r.findings[0]
                .detail
                .contains("missing or broken bitmap 'c1' for disk 'vda'"),
            "{r:#?}"
        );
        assert_eq!((r.libvirt_validations, r.images_read), (3, 1));
        assert_eq!(r.usable.as_deref(), Some("c2"));
        assert_eq!(s.fake.current("vm").as_deref(), Some("c2"));
        assert_eq!(s.fake.peek("vm").len(), 3);
        // Present on disk but refused by libvirt: inconsistent.
        let images = Images::default().disk(
            "vda",
            vec![layer("/fake/vm/vda.qcow2", &[("c1", true, true)])],
        );
        let r = validate_with(&s.store, &s.fake, "vm", &images).unwrap();
        assert_eq!(
            kinds(&r),
            [(FindingKind::InconsistentBitmap, Some("c1"), Some("vda"))]
        );
    }

    #[test]
    fn a_live_open_transaction_makes_the_domain_busy() {
        use crate::backend::fake::{Fault, Op, Phase};
        let s = setup(&["vda"], false, Vec::new());
        // A transaction left open by a lost connection: this process owns it
        // and no thread works on it, so it is an interrupted one.
        s.fake.inject(Fault {
            op: Some(Op::Redefine),
            nth: 1,
            phase: Phase::BeforeEffect,
            kind: BackendErrorKind::ConnectionLost,
            forever: true,
        });
        let opts = StoreOptions {
            reconnect_attempts: 0,
            reconnect_delay: std::time::Duration::ZERO,
            ..StoreOptions::default()
        };
        let store = Store::open_with(s._dir.path().join("k.db"), opts).unwrap();
        let (disk, ckpt) = (Uuid::from_u128(2), Uuid::from_u128(3));
        let chain: crate::chain::Chain = serde_json::from_str(&format!(
            r#"{{"vm_id":"{UUID}","domain":"vm","disks":{{"{disk}":"vda"}},
                "checkpoints":[{{"id":"{ckpt}","created":"2024-01-01T00:00:00Z","disks":["{disk}"]}}]}}"#
        ))
        .unwrap();
        assert!(store.sync(&s.fake, chain).is_err());
        s.fake.clear_faults();
        let images = Images::default().disk("vda", vec![good("/fake/vm/vda.qcow2", &[])]);
        let r = validate_with(&store, &s.fake, "vm", &images).unwrap();
        assert!(
            r.notes.iter().any(|n| n.contains("interrupted")),
            "{:?}",
            r.notes
        );
        // Owned by a live process that is not this one: busy.
        let other = StoreOptions {
            seams: crate::engine::Seams {
                owner: Some(crate::owner::Owner {
                    pid: 1,
                    boot_id: "x".into(),
                    start: 1,
                }),
                liveness: Some(std::sync::Arc::new(|_: &crate::owner::Owner| true)),
                ..Default::default()
            },
            ..StoreOptions::default()
        };
        let store2 = Store::open_with(s._dir.path().join("k.db"), other).unwrap();
        let e = validate_with(&store2, &s.fake, "vm", &images).unwrap_err();
        assert!(e.is_busy(), "{e}");
    }

    #[test]
    fn report_serialises_with_snake_case_kinds() {
        let f = Finding {
            kind: FindingKind::OrphanBitmap,
            checkpoint: Some("b".into()),
            disk: Some("vda".into()),
            image: None,
            detail: "d".into(),
        };
        let v = serde_json::to_value(&f).unwrap();
        assert_eq!(v["kind"], "orphan_bitmap");
        assert_eq!(v["disk"], "vda");
        assert_eq!(FindingKind::BrokenChain.to_string(), "broken_chain");
    }
}
