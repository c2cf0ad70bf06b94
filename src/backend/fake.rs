//! An in-memory backend that behaves like libvirt's qemu driver, written as
//! the specification of the behaviour the store relies on, with fault
//! injection for simulation tests.
//!
//! What it does like libvirt 11.3 (each line is covered by the conformance
//! suite, `tests/conformance.rs`, that also runs against real libvirt), with
//! libvirt's error codes and messages:
//! - the redefine XML is checked first as libvirt's schema does (names,
//!   disk targets, a non-empty `<disks>` when there is one, an unsigned
//!   `creationTime`): `InvalidArgument`, code 92; XML that is not
//!   well-formed is code 35; then a missing `<name>` is `InvalidArgument`,
//!   code 27, and a missing `creationTime` `Other`, code 1;
//! - a checkpoint with no `<disks>` is accepted and has no disks;
//! - a `<domain>` inside the XML must carry the domain's UUID
//!   (`InvalidArgument`, checked after the parent); libvirt's alignment of
//!   the checkpoint's disks to that embedded domain is not modelled (the
//!   store never sends one);
//! - redefine needs the parent to exist: `InvalidArgument`, "parent P for
//!   moment N not found"; a self-parent or a cycle is `InvalidArgument` too,
//!   the cycle message naming the ancestor whose parent is N;
//! - redefining an existing name replaces its definition (any parent, any
//!   creation time) and keeps its children;
//! - an empty `<description>` is no description; line ends are normalised
//!   as an XML parser does; other whitespace is kept;
//! - disk names are not checked against the domain's disks;
//! - delete (metadata only) re-parents the children to the deleted one's
//!   parent; an unknown name is `NoCheckpoint`;
//! - the hidden *current* checkpoint: a redefined checkpoint becomes current
//!   when its parent is current or there is none (a replaced current one
//!   stays current); deleting the current one makes its parent current;
//!   [`FakeBackend::create`] (a real, non-redefine checkpoint) takes the
//!   current one as parent, and needs a running domain (`Unsupported`);
//!   after a daemon restart ([`FakeBackend::restart`]) the current one is
//!   the leaf when the checkpoints form one line from one root, and there
//!   is none when they branch or have several roots;
//! - `validate` runs after the parent checks, needs a running domain
//!   (`NotRunning`) and, on every disk the domain has, a bitmap named after
//!   the checkpoint (`Inconsistent`); disks the domain lacks are skipped;
//! - [`Backend::bitmap_states`] (libvirt's `VIR_DOMAIN_CHECKPOINT_XML_SIZE`)
//!   makes the same check on every disk instead of stopping at the first
//!   bad one, and needs a running domain; [`Backend::checkpoint_xml`]
//!   returns the XML a checkpoint was last redefined with, as given (one
//!   the fake made itself is rendered);
//! - listing is libvirt's topological order: depth first from the roots,
//!   siblings most recently (re)defined first; a delete moves the children
//!   to the front of their new parent's list, in their order;
//! - crash leftovers ([`FakeBackend::plant_leftover`], `NAME.xml.new`, as a
//!   daemon killed while rewriting a checkpoint's metadata leaves them):
//!   a restart loads every readable one — a checkpoint libvirt no longer
//!   has comes back, one it has gets the leftover's definition (the worse
//!   of the two orders libvirt's directory may give) — and keeps the file;
//!   a delete leaves it; a redefine of its checkpoint consumes it (libvirt's
//!   rewrites of the checkpoint that stops or starts being current, which
//!   consume that one's leftover too, are not modelled). The fake reads its
//!   leftovers like a local daemon's ([`Backend::leftovers`]), and removes
//!   only stale ones.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;

use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

use super::{
    Backend, BackendError, BackendErrorKind as K, BitmapState, DiskBitmap, DomainDisk, DomainInfo,
    Leftover, LeftoverScan,
};
use crate::chain::{is_valid_checkpoint_name, CheckpointDef};
use crate::xml::parse_checkpoint;

/// libvirt's error codes the fake reproduces.
mod code {
    pub const INTERNAL_ERROR: i32 = 1;
    pub const INVALID_ARG: i32 = 8;
    pub const XML_ERROR: i32 = 27;
    pub const XML_DETAIL: i32 = 35;
    pub const SYSTEM_ERROR: i32 = 38;
    pub const NO_DOMAIN: i32 = 42;
    pub const OPERATION_INVALID: i32 = 55;
    pub const OPERATION_UNSUPPORTED: i32 = 84;
    pub const XML_INVALID_SCHEMA: i32 = 92;
    pub const NO_DOMAIN_CHECKPOINT: i32 = 103;
    pub const CHECKPOINT_INCONSISTENT: i32 = 109;
}

/// Which backend operation a fault or a counter refers to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Op {
    /// [`Backend::list`]
    List,
    /// [`Backend::redefine`]
    Redefine,
    /// [`Backend::delete`]
    Delete,
    /// [`Backend::domain_info`]
    DomainInfo,
}

/// When an injected fault strikes relative to the call's effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The call fails and has no effect.
    BeforeEffect,
    /// The call takes effect, then fails (the caller cannot know).
    AfterEffect,
}

/// An injected fault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// Only calls of this operation count and fail (`None`: every call).
    pub op: Option<Op>,
    /// The 1-based number of the matching call that fails first.
    pub nth: u64,
    /// Before or after the effect.
    pub phase: Phase,
    /// The error kind returned.
    pub kind: K,
    /// Keep failing every matching call from the `nth` on.
    pub forever: bool,
}

#[derive(Debug, Clone, Default)]
struct FakeDomain {
    name: String,
    uuid: String,
    running: bool,
    disks: Vec<DomainDisk>,
    /// Bitmap names present in each disk's image, by target.
    bitmaps: BTreeMap<String, BTreeSet<String>>,
    /// Checkpoints by name.
    checkpoints: HashMap<String, CheckpointDef>,
    /// libvirt's sibling lists: parent (`None`: the roots) → children,
    /// the most recently linked first.
    children: HashMap<Option<String>, Vec<String>>,
    current: Option<String>,
    /// Definitions libvirt will refuse to redefine (a simulated refusal).
    refused: Vec<CheckpointDef>,
    /// Crash leftovers by checkpoint name: what libvirt would load from
    /// each (`None`: cut short), and whether it is stale.
    leftovers: BTreeMap<String, (Option<CheckpointDef>, bool)>,
    /// The XML each checkpoint was last redefined with, returned as it was
    /// given by [`Backend::checkpoint_xml`] (the others are rendered).
    xml: HashMap<String, String>,
}

impl FakeDomain {
    /// Link a checkpoint under its parent, in front of its siblings.
    fn link(&mut self, name: &str, parent: Option<String>) {
        self.children
            .entry(parent)
            .or_default()
            .insert(0, name.to_string());
    }

    fn unlink(&mut self, name: &str, parent: Option<String>) {
        if let Some(list) = self.children.get_mut(&parent) {
            list.retain(|c| c != name);
        }
    }

    /// Depth first from the roots, siblings in list order.
    fn listing(&self) -> Vec<CheckpointDef> {
        let mut out = Vec::with_capacity(self.checkpoints.len());
        let mut stack: Vec<&str> = Vec::new();
        if let Some(roots) = self.children.get(&None) {
            stack.extend(roots.iter().rev().map(String::as_str));
        }
        while let Some(n) = stack.pop() {
            if let Some(d) = self.checkpoints.get(n) {
                out.push(d.clone());
                if let Some(list) = self.children.get(&Some(n.to_string())) {
                    stack.extend(list.iter().rev().map(String::as_str));
                }
            }
        }
        out
    }

    /// Replace every checkpoint, linking each under its parent (or as a
    /// root when the parent is missing) so that siblings list in the order
    /// given.
    fn replace_all(&mut self, defs: Vec<CheckpointDef>) {
        self.current = recompute_current(&defs);
        self.checkpoints.clear();
        self.xml.clear();
        self.children.clear();
        let names: BTreeSet<String> = defs.iter().map(|d| d.name.clone()).collect();
        for d in defs.into_iter().rev() {
            let parent = d
                .parent
                .clone()
                .filter(|p| names.contains(p) && *p != d.name);
            let name = d.name.clone();
            if self.checkpoints.insert(name.clone(), d).is_none() {
                self.link(&name, parent);
            }
        }
    }

    fn is(&self, domain: &str) -> bool {
        if self.name == domain {
            return true;
        }
        match (
            uuid::Uuid::parse_str(domain),
            uuid::Uuid::parse_str(&self.uuid),
        ) {
            (Ok(a), Ok(b)) => a == b,
            _ => false,
        }
    }
}

#[derive(Debug, Default)]
struct State {
    domains: Vec<FakeDomain>,
    faults: Vec<(Fault, u64)>,
    calls: HashMap<Op, u64>,
}

/// The in-memory backend. Cheap to create; share it by reference.
#[derive(Debug, Default)]
pub struct FakeBackend {
    state: Mutex<State>,
}

impl FakeBackend {
    /// An empty backend with no domains.
    pub fn new() -> Self {
        Self::default()
    }

    /// Define a domain with disks (target names) whose images are
    /// `/fake/<domain>/<target>.qcow2`.
    pub fn define_domain(&self, name: &str, uuid: &str, targets: &[&str], running: bool) {
        let mut st = self.lock();
        st.domains.retain(|d| d.name != name);
        st.domains.push(FakeDomain {
            name: name.into(),
            uuid: uuid.into(),
            running,
            disks: targets
                .iter()
                .map(|t| DomainDisk {
                    target: (*t).into(),
                    format: Some("qcow2".into()),
                    source: Some(format!("/fake/{name}/{t}.qcow2").into()),
                    backing: Vec::new(),
                })
                .collect(),
            bitmaps: targets
                .iter()
                .map(|t| ((*t).to_string(), BTreeSet::new()))
                .collect(),
            ..FakeDomain::default()
        });
    }

    /// Remove a domain and its checkpoint metadata.
    pub fn undefine_domain(&self, name: &str) {
        self.lock().domains.retain(|d| d.name != name);
    }

    /// Start or stop a domain (checkpoint metadata and bitmaps stay).
    pub fn set_running(&self, domain: &str, running: bool) {
        if let Some(d) = self.lock().domains.iter_mut().find(|d| d.is(domain)) {
            d.running = running;
        }
    }

    /// Add a bitmap to a disk's image (what `qemu-img bitmap --add` does).
    pub fn add_bitmap(&self, domain: &str, target: &str, bitmap: &str) {
        let mut st = self.lock();
        if let Some(d) = st.domains.iter_mut().find(|d| d.is(domain)) {
            d.bitmaps
                .entry(target.into())
                .or_default()
                .insert(bitmap.into());
        }
    }

    /// Create a new (non-redefine) checkpoint with bitmaps on every disk, as
    /// a backup does: its parent is the current checkpoint, and it becomes
    /// current. Returns the parent it got.
    ///
    /// # Errors
    ///
    /// `NoDomain`; `Unsupported` when the domain is not running (like
    /// libvirt: "cannot create checkpoint for inactive domain");
    /// `InvalidArgument` for a bad name; `Other` for a taken one.
    pub fn create(
        &self,
        domain: &str,
        name: &str,
        creation_time: i64,
    ) -> Result<Option<String>, BackendError> {
        let mut st = self.lock();
        let d = find(&mut st, domain)?;
        if !d.running {
            return Err(BackendError::with_code(
                K::Unsupported,
                code::OPERATION_UNSUPPORTED,
                "Operation not supported: cannot create checkpoint for inactive domain",
            ));
        }
        if !is_valid_checkpoint_name(name) {
            return Err(schema_error());
        }
        if d.checkpoints.contains_key(name) {
            return Err(BackendError::with_code(
                K::Other,
                code::INTERNAL_ERROR,
                format!("internal error: bitmap '{name}' already exists"),
            ));
        }
        let parent = d.current.clone();
        let disks: BTreeMap<String, String> = d
            .disks
            .iter()
            .map(|k| (k.target.clone(), name.to_string()))
            .collect();
        for t in disks.keys() {
            d.bitmaps.entry(t.clone()).or_default().insert(name.into());
        }
        d.checkpoints.insert(
            name.into(),
            CheckpointDef {
                name: name.into(),
                parent: parent.clone(),
                creation_time,
                description: None,
                disks,
            },
        );
        d.link(name, parent.clone());
        d.xml.remove(name);
        d.current = Some(name.into());
        Ok(parent)
    }

    /// The hidden current checkpoint (no libvirt API reads it; tests of the
    /// fake may).
    pub fn current(&self, domain: &str) -> Option<String> {
        self.lock()
            .domains
            .iter()
            .find(|d| d.is(domain))
            .and_then(|d| d.current.clone())
    }

    /// Restart the daemon: load every readable crash leftover (which
    /// stays, now older than the daemon), then recompute the current
    /// checkpoint as libvirt does: the leaf of a single line, or none.
    pub fn restart(&self) {
        let mut st = self.lock();
        for d in &mut st.domains {
            let loaded: Vec<CheckpointDef> = d
                .leftovers
                .values()
                .filter_map(|(c, _)| c.clone())
                .collect();
            for def in loaded {
                let name = def.name.clone();
                let parent = def.parent.clone().filter(|p| d.checkpoints.contains_key(p));
                if let Some(old) = d.checkpoints.insert(name.clone(), def) {
                    d.unlink(&name, old.parent);
                }
                d.link(&name, parent);
                d.xml.remove(&name);
            }
            for l in d.leftovers.values_mut() {
                l.1 = true;
            }
            let defs: Vec<CheckpointDef> = d.checkpoints.values().cloned().collect();
            d.current = current_after_restart(&defs);
        }
    }

    /// Leave a crash leftover for checkpoint `name`, as a daemon killed
    /// while rewriting its metadata does: `content` is what a restart
    /// would load (`None`: the file was cut short); `stale`: it is older
    /// than the running daemon (otherwise it may be being written now).
    pub fn plant_leftover(
        &self,
        domain: &str,
        name: &str,
        content: Option<CheckpointDef>,
        stale: bool,
    ) {
        let mut st = self.lock();
        if let Some(d) = st.domains.iter_mut().find(|d| d.is(domain)) {
            d.leftovers.insert(name.to_string(), (content, stale));
        }
    }

    /// Make every redefine of exactly this definition fail with
    /// `InvalidArgument`, as libvirt refuses a definition it finds invalid.
    pub fn refuse_def(&self, domain: &str, def: &CheckpointDef) {
        let mut st = self.lock();
        if let Some(d) = st.domains.iter_mut().find(|d| d.is(domain)) {
            d.refused.push(def.clone());
        }
    }

    /// The domain's checkpoints, parents first, read without counting a
    /// call or striking a fault (for test assertions).
    pub fn peek(&self, domain: &str) -> Vec<CheckpointDef> {
        self.lock()
            .domains
            .iter()
            .find(|d| d.is(domain))
            .map(FakeDomain::listing)
            .unwrap_or_default()
    }

    /// Inject a fault; faults are checked in the order they were added.
    pub fn inject(&self, fault: Fault) {
        self.lock().faults.push((fault, 0));
    }

    /// Remove every injected fault (the daemon is back).
    pub fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    /// How many calls of `op` were made (failed ones included).
    pub fn calls(&self, op: Op) -> u64 {
        self.lock().calls.get(&op).copied().unwrap_or(0)
    }

    /// Reset the call counters.
    pub fn reset_calls(&self) {
        self.lock().calls.clear();
    }

    /// Replace a domain's checkpoints directly (test set-up), current = the
    /// newest leaf. Siblings list in the order given.
    pub fn set_checkpoints(&self, domain: &str, defs: Vec<CheckpointDef>) {
        let mut st = self.lock();
        if let Some(d) = st.domains.iter_mut().find(|d| d.is(domain)) {
            d.replace_all(defs);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock (a simulated crash) leaves the
        // state as libvirt would: whatever was applied stays applied.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Count the call and return the fault that strikes it, if any.
    fn enter(st: &mut State, op: Op) -> Option<(Phase, K)> {
        *st.calls.entry(op).or_default() += 1;
        for (f, seen) in &mut st.faults {
            if f.op.is_none_or(|o| o == op) {
                *seen += 1;
                if *seen == f.nth || (f.forever && *seen > f.nth) {
                    return Some((f.phase, f.kind));
                }
            }
        }
        None
    }

    fn call<T>(
        &self,
        op: Op,
        f: impl FnOnce(&mut State) -> Result<T, BackendError>,
    ) -> Result<T, BackendError> {
        let mut st = self.lock();
        match Self::enter(&mut st, op) {
            None => f(&mut st),
            Some((Phase::BeforeEffect, kind)) => Err(fault_error(kind)),
            Some((Phase::AfterEffect, kind)) => {
                let _ = f(&mut st);
                Err(fault_error(kind))
            }
        }
    }
}

fn fault_error(kind: K) -> BackendError {
    match kind {
        K::ConnectionLost => BackendError::with_code(
            kind,
            code::SYSTEM_ERROR,
            "End of file while reading data: Input/output error (injected)",
        ),
        _ => BackendError::new(kind, "injected fault"),
    }
}

fn find<'a>(st: &'a mut State, domain: &str) -> Result<&'a mut FakeDomain, BackendError> {
    st.domains.iter_mut().find(|d| d.is(domain)).ok_or_else(|| {
        BackendError::with_code(
            K::NoDomain,
            code::NO_DOMAIN,
            format!("Domain not found: no domain with matching name '{domain}'"),
        )
    })
}

fn recompute_current(defs: &[CheckpointDef]) -> Option<String> {
    crate::chain::leaf_of(defs).map(|d| d.name.clone())
}

/// The current checkpoint libvirt sets when it loads a domain's checkpoints
/// at start-up: walking down from the roots while there is exactly one
/// child, the leaf it reaches; none when it meets a branch, or when there
/// are several roots (libvirt's `virDomainMomentFindLeaf`).
fn current_after_restart(defs: &[CheckpointDef]) -> Option<String> {
    let names: BTreeSet<&str> = defs.iter().map(|d| d.name.as_str()).collect();
    let mut children: HashMap<Option<&str>, Vec<&str>> = HashMap::new();
    for d in defs {
        let parent = d.parent.as_deref().filter(|p| names.contains(p));
        children.entry(parent).or_default().push(d.name.as_str());
    }
    let mut at: Option<&str> = None;
    loop {
        match children.get(&at).map(Vec::as_slice) {
            Some([only]) => at = Some(only),
            None | Some([]) => return at.map(String::from),
            Some(_) => return None,
        }
    }
}

fn no_checkpoint(name: &str) -> BackendError {
    BackendError::with_code(
        K::NoCheckpoint,
        code::NO_DOMAIN_CHECKPOINT,
        format!("Domain checkpoint not found: no domain checkpoint with matching name '{name}'"),
    )
}

fn not_running() -> BackendError {
    BackendError::with_code(
        K::NotRunning,
        code::OPERATION_INVALID,
        "Requested operation is not valid: domain is not running",
    )
}

fn invalid(message: String) -> BackendError {
    BackendError::with_code(K::InvalidArgument, code::INVALID_ARG, message)
}

/// What libvirt says when its RELAX NG schema refuses the document.
fn schema_error() -> BackendError {
    BackendError::with_code(
        K::InvalidArgument,
        code::XML_INVALID_SCHEMA,
        "XML document failed to validate against schema: Unable to validate doc against \
         /usr/share/libvirt/schemas/domaincheckpoint.rng\nElement domaincheckpoint failed to validate content\n",
    )
}

/// `unsignedLong` in libvirt's schema: digits only, within u64.
fn is_unsigned_long(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) && s.parse::<u64>().is_ok()
}

/// libvirt's `diskTargetDev` (`(ioemu:)?(fd|hd|sd|vd|xvd|ubd)[a-zA-Z0-9_]+`)
/// or an absolute path.
fn is_disk_name(s: &str) -> bool {
    if s.starts_with('/') && s.len() > 1 {
        return true;
    }
    let s = s.strip_prefix("ioemu:").unwrap_or(s);
    ["fd", "hd", "sd", "vd", "xvd", "ubd"].iter().any(|p| {
        s.strip_prefix(p).is_some_and(|rest| {
            !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        })
    })
}

/// Check a redefine document as libvirt does before it looks at the
/// domain's checkpoints: well-formed XML (code 35), then the schema of
/// `domaincheckpoint.rng` (code 92), then a `<name>` (code 27), then a
/// `creationTime` (code 1). Returns the UUID of an embedded `<domain>`.
fn check_redefine_xml(xml: &str) -> Result<Option<String>, BackendError> {
    let not_well_formed = |e: String| {
        BackendError::with_code(
            K::InvalidArgument,
            code::XML_DETAIL,
            format!("at line 1: {e}"),
        )
    };
    if let Some(c) = xml.chars().find(|&c| !is_xml_char(c)) {
        return Err(not_well_formed(format!(
            "character U+{:04X} is not allowed in XML",
            c as u32
        )));
    }
    let mut r = Reader::from_str(xml);
    let mut path: Vec<Vec<u8>> = Vec::new();
    let mut seen: BTreeSet<Vec<u8>> = BTreeSet::new();
    let mut text = String::new();
    let mut disks = 0usize;
    let mut has_time = false;
    let mut has_name = false;
    let mut domain_uuid = None;
    let mut schema_ok = true;
    let mut root_seen = false;
    let mut parent_named = false;
    let check_disk = |e: &BytesStart<'_>| -> bool {
        let mut name = None;
        let mut kind = None;
        let mut extra_ok = true;
        for a in e.attributes() {
            let Ok(a) = a else { return false };
            let Ok(v) = a.unescape_value() else {
                return false;
            };
            match a.key.as_ref() {
                b"name" => name = Some(v.into_owned()),
                b"checkpoint" => kind = Some(v.into_owned()),
                b"bitmap" => {}
                b"size" => extra_ok &= is_unsigned_long(&v),
                _ => extra_ok = false,
            }
        }
        let kind_ok = match kind.as_deref() {
            None | Some("bitmap") => true,
            Some("no") => e
                .attributes()
                .flatten()
                .all(|a| !matches!(a.key.as_ref(), b"bitmap" | b"size")),
            Some(_) => false,
        };
        name.is_some_and(|n| is_disk_name(&n)) && kind_ok && extra_ok
    };
    loop {
        let ev = r.read_event().map_err(|e| not_well_formed(e.to_string()))?;
        match ev {
            Event::Start(ref e) | Event::Empty(ref e) => {
                let n = e.name().as_ref().to_vec();
                let empty = matches!(ev, Event::Empty(_));
                match path.len() {
                    0 => {
                        root_seen = true;
                        schema_ok &= n == b"domaincheckpoint";
                    }
                    1 => {
                        let known = [
                            &b"name"[..],
                            b"description",
                            b"creationTime",
                            b"disks",
                            b"domain",
                            b"parent",
                        ];
                        schema_ok &= known.contains(&n.as_slice()) && seen.insert(n.clone());
                        schema_ok &= !(empty
                            && [&b"name"[..], b"creationTime", b"disks", b"parent"]
                                .contains(&n.as_slice()));
                        has_time |= n == b"creationTime";
                    }
                    2 if path[1] == b"disks" => {
                        schema_ok &= n == b"disk" && check_disk(e);
                        disks += 1;
                    }
                    2 if path[1] == b"parent" => {
                        schema_ok &= n == b"name" && !empty && !parent_named;
                        parent_named = true;
                    }
                    2 if path[1] != b"domain" => schema_ok = false,
                    _ => {}
                }
                if !empty {
                    path.push(n);
                }
                text.clear();
            }
            Event::Text(t) => {
                let s = t.decode().map_err(|e| not_well_formed(e.to_string()))?;
                let s =
                    quick_xml::escape::unescape(&s).map_err(|e| not_well_formed(e.to_string()))?;
                if path.len() == 1 && !s.trim().is_empty() {
                    schema_ok = false;
                }
                text.push_str(&s);
            }
            Event::GeneralRef(g) => {
                let name = g.decode().map_err(|e| not_well_formed(e.to_string()))?;
                let entity = format!("&{name};");
                let s = quick_xml::escape::unescape(&entity)
                    .map_err(|e| not_well_formed(e.to_string()))?;
                text.push_str(&s);
            }
            Event::CData(c) => text.push_str(&String::from_utf8_lossy(&c.into_inner())),
            Event::End(_) => {
                let at =
                    |p: &[&[u8]]| path.len() == p.len() && path.iter().zip(p).all(|(a, b)| a == b);
                if at(&[b"domaincheckpoint", b"domain", b"uuid"]) {
                    domain_uuid = Some(text.trim().to_string());
                }
                if at(&[b"domaincheckpoint", b"name"])
                    || at(&[b"domaincheckpoint", b"parent", b"name"])
                {
                    has_name |= path.len() == 2;
                    schema_ok &= is_valid_checkpoint_name(&text);
                } else if at(&[b"domaincheckpoint", b"creationTime"]) {
                    schema_ok &= is_unsigned_long(&text);
                } else if at(&[b"domaincheckpoint", b"disks"]) {
                    schema_ok &= disks > 0;
                } else if at(&[b"domaincheckpoint", b"parent"]) {
                    schema_ok &= parent_named;
                }
                path.pop();
                text.clear();
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if !root_seen || !path.is_empty() {
        return Err(not_well_formed(
            "document is empty or ends inside an element".into(),
        ));
    }
    if !schema_ok {
        return Err(schema_error());
    }
    if !has_name {
        return Err(BackendError::with_code(
            K::InvalidArgument,
            code::XML_ERROR,
            "XML error: a redefined checkpoint must have a name",
        ));
    }
    if !has_time {
        return Err(BackendError::with_code(
            K::Other,
            code::INTERNAL_ERROR,
            "internal error: missing creationTime from existing checkpoint",
        ));
    }
    Ok(domain_uuid)
}

/// XML 1.0's `Char` production.
fn is_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r') || (c >= ' ' && c != '\u{FFFE}' && c != '\u{FFFF}')
}

/// XML end-of-line handling: a parser turns `\r\n` and `\r` into `\n`
/// before anything else.
fn normalise_line_ends(xml: &str) -> std::borrow::Cow<'_, str> {
    if xml.contains('\r') {
        xml.replace("\r\n", "\n").replace('\r', "\n").into()
    } else {
        xml.into()
    }
}

impl Backend for FakeBackend {
    fn list(&self, domain: &str) -> Result<Vec<CheckpointDef>, BackendError> {
        self.call(Op::List, |st| Ok(find(st, domain)?.listing()))
    }

    fn redefine(&self, domain: &str, xml: &str, validate: bool) -> Result<(), BackendError> {
        let given = xml;
        self.call(Op::Redefine, |st| {
            let d = find(st, domain)?;
            let xml = normalise_line_ends(xml);
            let embedded_uuid = check_redefine_xml(&xml)?;
            let mut def = parse_checkpoint(&xml)
                .map_err(|e| BackendError::with_code(K::InvalidArgument, code::XML_ERROR, format!("XML error: {e}")))?;
            // libvirt reads an empty description as none.
            if def.description.as_deref() == Some("") {
                def.description = None;
            }
            if d.refused.contains(&def) {
                return Err(invalid(format!("invalid argument: checkpoint {} refused (simulated)", def.name)));
            }
            if let Some(p) = &def.parent {
                if *p == def.name {
                    return Err(invalid(format!("invalid argument: cannot set moment {p} as its own parent")));
                }
                let Some(mut other) = d.checkpoints.get(p) else {
                    return Err(invalid(format!("invalid argument: parent {p} for moment {} not found", def.name)));
                };
                // A cycle: walking up from the new parent reaches this one.
                while let Some(up) = &other.parent {
                    if *up == def.name {
                        return Err(invalid(format!(
                            "invalid argument: parent {} would create cycle to {}",
                            other.name, def.name
                        )));
                    }
                    match d.checkpoints.get(up) {
                        Some(o) => other = o,
                        None => break,
                    }
                }
            }
            if let Some(u) = embedded_uuid {
                let same = matches!(
                    (uuid::Uuid::parse_str(&u), uuid::Uuid::parse_str(&d.uuid)),
                    (Ok(a), Ok(b)) if a == b
                );
                if !same {
                    return Err(invalid(format!(
                        "invalid argument: definition for checkpoint {} must use uuid {}",
                        def.name, d.uuid
                    )));
                }
            }
            if validate {
                if !d.running {
                    return Err(not_running());
                }
                // libvirt checks the bitmap named after the checkpoint, on
                // the disks the domain has (a detached disk is tolerated).
                for target in def.disks.keys() {
                    let Some(present) = d.bitmaps.get(target) else { continue };
                    if !present.contains(&def.name) {
                        return Err(BackendError::with_code(
                            K::Inconsistent,
                            code::CHECKPOINT_INCONSISTENT,
                            format!(
                                "checkpoint inconsistent: missing or broken bitmap '{}' for disk '{target}'",
                                def.name
                            ),
                        ));
                    }
                }
            }
            let becomes_current = d.current.is_none() || def.parent.is_some() && def.parent == d.current;
            let name = def.name.clone();
            // libvirt's rewrite of NAME.xml goes through NAME.xml.new.
            d.leftovers.remove(&name);
            d.xml.insert(name.clone(), given.to_string());
            let parent = def.parent.clone();
            if let Some(old) = d.checkpoints.insert(name.clone(), def) {
                d.unlink(&name, old.parent);
            }
            d.link(&name, parent);
            if becomes_current {
                d.current = Some(name);
            }
            Ok(())
        })
    }

    fn delete(&self, domain: &str, name: &str) -> Result<(), BackendError> {
        self.call(Op::Delete, |st| {
            let d = find(st, domain)?;
            let Some(gone) = d.checkpoints.remove(name) else {
                return Err(no_checkpoint(name));
            };
            d.unlink(name, gone.parent.clone());
            d.xml.remove(name);
            let orphans = d
                .children
                .remove(&Some(name.to_string()))
                .unwrap_or_default();
            for c in &orphans {
                // libvirt rewrites a re-parented child's XML.
                d.xml.remove(c);
                if let Some(child) = d.checkpoints.get_mut(c) {
                    child.parent = gone.parent.clone();
                }
            }
            let siblings = d.children.entry(gone.parent.clone()).or_default();
            siblings.splice(0..0, orphans);
            if d.current.as_deref() == Some(name) {
                d.current = gone.parent;
            }
            Ok(())
        })
    }

    fn domain_info(&self, domain: &str) -> Result<DomainInfo, BackendError> {
        self.call(Op::DomainInfo, |st| {
            let d = find(st, domain)?;
            Ok(DomainInfo {
                name: d.name.clone(),
                uuid: d.uuid.clone(),
                running: d.running,
                disks: d.disks.clone(),
            })
        })
    }

    fn describe(&self) -> String {
        "fake".into()
    }

    fn checkpoint_xml(&self, domain: &str, name: &str) -> Result<String, BackendError> {
        let mut st = self.lock();
        let d = find(&mut st, domain)?;
        match (d.xml.get(name), d.checkpoints.get(name)) {
            (Some(xml), _) => Ok(xml.clone()),
            (None, Some(def)) => Ok(crate::xml::render_checkpoint(def)),
            (None, None) => Err(no_checkpoint(name)),
        }
    }

    /// Like libvirt's `VIR_DOMAIN_CHECKPOINT_XML_SIZE`: the bitmap named
    /// after the checkpoint, looked for in each disk's bitmap set.
    fn bitmap_states(
        &self,
        domain: &str,
        checkpoint: &str,
    ) -> Result<Vec<DiskBitmap>, BackendError> {
        let mut st = self.lock();
        let d = find(&mut st, domain)?;
        let def = d
            .checkpoints
            .get(checkpoint)
            .ok_or_else(|| no_checkpoint(checkpoint))?;
        if !d.running {
            return Err(not_running());
        }
        Ok(def
            .disks
            .keys()
            .filter_map(|target| {
                let present = d.bitmaps.get(target)?;
                let state = if present.contains(checkpoint) {
                    BitmapState::Usable { dirty_bytes: 0 }
                } else {
                    BitmapState::Unusable
                };
                Some(DiskBitmap {
                    target: target.clone(),
                    state,
                })
            })
            .collect())
    }

    fn leftovers(&self, domain: &str) -> Result<LeftoverScan, BackendError> {
        let mut st = self.lock();
        let d = find(&mut st, domain)?;
        Ok(LeftoverScan::Checked(
            d.leftovers
                .iter()
                .map(|(name, (content, stale))| Leftover {
                    checkpoint: name.clone(),
                    path: leftover_path(&d.name, name),
                    content: content.clone(),
                    modified: std::time::SystemTime::UNIX_EPOCH,
                    stale: *stale,
                })
                .collect(),
        ))
    }

    fn remove_leftover(&self, domain: &str, leftover: &Leftover) -> Result<(), BackendError> {
        let mut st = self.lock();
        let d = find(&mut st, domain)?;
        let name = &leftover.checkpoint;
        let refuse = |why: &str| {
            Err(BackendError::new(
                K::Other,
                format!("{}: {why}", leftover.path.display()),
            ))
        };
        if leftover.path != leftover_path(&d.name, name) {
            return refuse("not a leftover of this domain");
        }
        if d.checkpoints.contains_key(name) {
            return refuse("libvirt lists its checkpoint: redefine it instead");
        }
        match d.leftovers.get(name) {
            None => Ok(()),
            Some((_, false)) => refuse("may be being written now: left alone"),
            Some(_) => {
                d.leftovers.remove(name);
                Ok(())
            }
        }
    }
}

/// Where the fake says a leftover lives.
fn leftover_path(domain: &str, name: &str) -> std::path::PathBuf {
    format!("/fake/{domain}/checkpoint/{name}.xml.new").into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restart_makes_the_leaf_of_a_line_current_and_nothing_else() {
        let d = |name: &str, parent: Option<&str>, t: i64| CheckpointDef {
            name: name.into(),
            parent: parent.map(Into::into),
            creation_time: t,
            description: None,
            disks: BTreeMap::from([("vda".to_string(), name.to_string())]),
        };
        let fake = FakeBackend::new();
        fake.define_domain("r", "93a5c045-6457-2c09-e56c-927cdf34e178", &["vda"], true);
        let after = |defs: Vec<CheckpointDef>| {
            fake.set_checkpoints("r", defs);
            fake.restart();
            fake.current("r")
        };
        assert_eq!(after(vec![]), None);
        assert_eq!(
            after(vec![
                d("a", None, 1),
                d("b", Some("a"), 2),
                d("c", Some("b"), 3)
            ])
            .as_deref(),
            Some("c")
        );
        // A branch anywhere, or a second root: none, whatever the times.
        assert_eq!(
            after(vec![
                d("a", None, 1),
                d("b", Some("a"), 2),
                d("c", Some("a"), 3)
            ]),
            None
        );
        assert_eq!(
            after(vec![d("a", None, 1), d("b", Some("a"), 2), d("x", None, 3)]),
            None
        );
    }

    #[test]
    fn checkpoint_xml_is_what_was_given_until_the_fake_changes_it() {
        let fake = FakeBackend::new();
        fake.define_domain("x", "93a5c045-6457-2c09-e56c-927cdf34e178", &["vda"], true);
        let a = "<domaincheckpoint><name>a</name><creationTime>1</creationTime>\
                 <description>as given</description></domaincheckpoint>";
        let b = "<domaincheckpoint><name>b</name><parent><name>a</name></parent>\
                 <creationTime>2</creationTime></domaincheckpoint>";
        fake.redefine("x", a, false).unwrap();
        fake.redefine("x", b, false).unwrap();
        assert_eq!(fake.checkpoint_xml("x", "a").unwrap(), a);
        assert_eq!(fake.checkpoint_xml("x", "b").unwrap(), b);
        // Deleting a re-parents b: its XML is libvirt's rewrite now.
        fake.delete("x", "a").unwrap();
        let now = fake.checkpoint_xml("x", "b").unwrap();
        assert_eq!(parse_checkpoint(&now).unwrap().parent, None);
        assert_eq!(
            fake.checkpoint_xml("x", "a").unwrap_err().kind,
            K::NoCheckpoint
        );
    }

    #[test]
    fn schema_checks_refuse_what_libvirts_schema_refuses() {
        let ok = "<domaincheckpoint><name>c1</name><creationTime>1</creationTime>\
                  <disks><disk name='vda' checkpoint='bitmap' bitmap='c1'/></disks></domaincheckpoint>";
        assert_eq!(check_redefine_xml(ok), Ok(None));
        let code_of = |xml: &str| check_redefine_xml(xml).unwrap_err().code;
        assert_eq!(
            code_of(&ok.replace("<name>c1</name>", "<name>.c1</name>")),
            code::XML_INVALID_SCHEMA
        );
        assert_eq!(
            code_of(&ok.replace(">1<", ">-1<")),
            code::XML_INVALID_SCHEMA
        );
        assert_eq!(
            code_of(&ok.replace("vda", "disk0")),
            code::XML_INVALID_SCHEMA
        );
        assert_eq!(
            code_of(&ok.replace("checkpoint='bitmap'", "checkpoint='maybe'")),
            code::XML_INVALID_SCHEMA
        );
        assert_eq!(
            code_of(&ok.replace("<disk name='vda' checkpoint='bitmap' bitmap='c1'/>", "")),
            code::XML_INVALID_SCHEMA
        );
        assert_eq!(
            code_of(&ok.replace("<name>c1</name>", "<name>c1</name><foo/>")),
            code::XML_INVALID_SCHEMA
        );
        assert_eq!(
            code_of(&ok.replace("<creationTime>1</creationTime>", "")),
            code::INTERNAL_ERROR
        );
        assert_eq!(
            code_of("<domaincheckpoint><name>c1</name>"),
            code::XML_DETAIL
        );
        // No name: refused before the missing creationTime is noticed.
        assert_eq!(code_of("<domaincheckpoint/>"), code::XML_ERROR);
        assert_eq!(
            code_of(
                &ok.replace("<name>c1</name>", "")
                    .replace("<creationTime>1</creationTime>", "")
            ),
            code::XML_ERROR
        );
        // No <disks> at all is fine; an empty one is not.
        let bare =
            "<domaincheckpoint><name>c1</name><creationTime>1</creationTime></domaincheckpoint>";
        assert_eq!(check_redefine_xml(bare), Ok(None));
        assert_eq!(
            code_of(&bare.replace("<creationTime>", "<disks></disks><creationTime>")),
            code::XML_INVALID_SCHEMA
        );
        assert_eq!(code_of("<domain/>"), code::XML_INVALID_SCHEMA);
        assert!(is_disk_name("sda") && is_disk_name("vdz") && is_disk_name("/img/a.qcow2"));
        assert!(!is_disk_name("vd") && !is_disk_name("nvme0n1") && !is_disk_name("vd-a"));
    }
}
