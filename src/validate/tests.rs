//! Unit tests of validation on the fake backend, with images supplied by
//! a test reader.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::rules::check_bitmap;
use super::*;
use crate::backend::fake::FakeBackend;
use crate::backend::BackendErrorKind;
use crate::bitmaps::images::{DiskChain, ImageError, ImageReader, Layer, LayerBitmap};
use crate::chain::CheckpointDef;
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
    dir: tempfile::TempDir,
    store: Store,
    fake: FakeBackend,
}

fn setup(targets: &[&str], running: bool, defs: Vec<CheckpointDef>) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_with(dir.path().join("j.db"), StoreOptions::default()).unwrap();
    let fake = FakeBackend::new();
    fake.define_domain("vm", UUID, targets, running);
    fake.set_checkpoints("vm", defs);
    Setup { dir, store, fake }
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
fn a_running_domain_reports_every_broken_disk_and_writes_nothing() {
    use crate::backend::fake::Op;
    let s = setup(&["vda", "vdb"], true, line(3, &["vda", "vdb"]));
    // In QEMU: c1 on neither disk, c2 on vda only.
    for (disk, bitmap) in [("vda", "c0"), ("vda", "c2"), ("vdb", "c0")] {
        s.fake.add_bitmap("vm", disk, bitmap);
    }
    // On disk (behind QEMU, every bitmap in use): vdb still holds c1.
    let images = Images::default()
        .disk(
            "vda",
            vec![layer("/fake/vm/vda.qcow2", &[("c0", true, true)])],
        )
        .disk(
            "vdb",
            vec![layer(
                "/fake/vm/vdb.qcow2",
                &[("c0", true, true), ("c1", true, true)],
            )],
        );
    s.fake.reset_calls();
    let r = validate_with(&s.store, &s.fake, "vm", &images).unwrap();
    assert!(r.running);
    // Per disk, then libvirt's order, as on a shut-off domain.
    assert_eq!(
        kinds(&r),
        [
            (FindingKind::MissingBitmap, Some("c1"), Some("vda")),
            (FindingKind::InconsistentBitmap, Some("c1"), Some("vdb")),
            (FindingKind::MissingBitmap, Some("c2"), Some("vdb")),
        ],
        "{r:#?}"
    );
    assert!(r.findings[1].detail.contains("lags behind QEMU"), "{r:#?}");
    assert_eq!((r.libvirt_validations, r.images_read), (3, 2));
    assert_eq!(r.usable.as_deref(), Some("c0"));
    assert_eq!(s.fake.calls(Op::Redefine), 0);
    // A bitmap libvirt refuses that is disabled on disk: the rule it breaks.
    let images = Images::default()
        .disk(
            "vda",
            vec![layer(
                "/fake/vm/vda.qcow2",
                &[("c0", true, true), ("c1", true, false)],
            )],
        )
        .disk("vdb", vec![good("/fake/vm/vdb.qcow2", &["c0"])]);
    let r = validate_with(&s.store, &s.fake, "vm", &images).unwrap();
    assert_eq!(
        kinds(&r)[..2],
        [
            (FindingKind::DisabledBitmap, Some("c1"), Some("vda")),
            (FindingKind::MissingBitmap, Some("c1"), Some("vdb")),
        ],
        "{r:#?}"
    );
}

#[test]
fn a_running_domain_keeps_its_current_checkpoint_where_it_was() {
    // A branching tree after a daemon restart: libvirt has no current
    // checkpoint. The redefines validate once made gave it one.
    let mut defs = line(3, &["vda"]);
    defs.push(def("side", Some("c0"), 500, &["vda"]));
    let s = setup(&["vda"], true, defs);
    for b in ["c0", "c1", "c2", "side"] {
        s.fake.add_bitmap("vm", "vda", b);
    }
    s.fake.restart();
    assert_eq!(s.fake.current("vm"), None);
    let images = Images::default().disk("vda", vec![good("/fake/vm/vda.qcow2", &[])]);
    let before = s.fake.peek("vm");
    let r = validate_with(&s.store, &s.fake, "vm", &images).unwrap();
    assert!(r.ok && r.running, "{r:#?}");
    assert_eq!(s.fake.current("vm"), None);
    assert_eq!(s.fake.peek("vm"), before);
}

/// A backend without the per-disk check: validate redefines each checkpoint
/// with exactly the XML the backend holds, with `REDEFINE_VALIDATE`.
struct WholeOnly<'a>(&'a FakeBackend);

impl Backend for WholeOnly<'_> {
    fn list(&self, domain: &str) -> std::result::Result<Vec<CheckpointDef>, BackendError> {
        self.0.list(domain)
    }
    fn redefine(
        &self,
        domain: &str,
        xml: &str,
        validate: bool,
    ) -> std::result::Result<(), BackendError> {
        self.0.redefine(domain, xml, validate)
    }
    fn delete(&self, domain: &str, name: &str) -> std::result::Result<(), BackendError> {
        self.0.delete(domain, name)
    }
    fn domain_info(
        &self,
        domain: &str,
    ) -> std::result::Result<crate::backend::DomainInfo, BackendError> {
        self.0.domain_info(domain)
    }
    fn describe(&self) -> String {
        "whole-checkpoint only".into()
    }
    fn checkpoint_xml(
        &self,
        domain: &str,
        name: &str,
    ) -> std::result::Result<String, BackendError> {
        self.0.checkpoint_xml(domain, name)
    }
}

#[test]
fn without_the_per_disk_check_each_checkpoint_is_redefined_as_libvirt_holds_it() {
    use crate::backend::fake::Op;
    let s = setup(&["vda", "vdb"], true, Vec::new());
    // As libvirt stores a checkpoint it made: with the domain's definition.
    let full = |name: &str, parent: Option<&str>| {
        let parent = parent.map_or(String::new(), |p| {
            format!("<parent><name>{p}</name></parent>")
        });
        format!(
            "<domaincheckpoint><name>{name}</name>{parent}<creationTime>1</creationTime><disks>\
             <disk name='vda' checkpoint='bitmap' bitmap='{name}'/><disk name='vdb' checkpoint='bitmap' bitmap='{name}'/>\
             </disks><domain type='qemu'><name>vm</name><uuid>{UUID}</uuid></domain></domaincheckpoint>"
        )
    };
    let xmls = [full("c0", None), full("c1", Some("c0"))];
    for x in &xmls {
        s.fake.redefine("vm", x, false).unwrap();
    }
    for disk in ["vda", "vdb"] {
        s.fake.add_bitmap("vm", disk, "c0");
    }
    assert_eq!(s.fake.current("vm").as_deref(), Some("c1"));
    let images = Images::default()
        .disk("vda", vec![good("/fake/vm/vda.qcow2", &["c0"])])
        .disk("vdb", vec![good("/fake/vm/vdb.qcow2", &["c0"])]);
    s.fake.reset_calls();
    let r = validate_with(&s.store, &WholeOnly(&s.fake), "vm", &images).unwrap();
    // libvirt names only the first bad disk of c1.
    assert_eq!(
        kinds(&r),
        [(FindingKind::MissingBitmap, Some("c1"), Some("vda"))],
        "{r:#?}"
    );
    assert!(
        r.notes.iter().any(|n| n.contains("first bad disk")),
        "{:?}",
        r.notes
    );
    assert_eq!((r.libvirt_validations, s.fake.calls(Op::Redefine)), (2, 2));
    assert_eq!(s.fake.checkpoint_xml("vm", "c0").unwrap(), xmls[0]);
    assert_eq!(s.fake.checkpoint_xml("vm", "c1").unwrap(), xmls[1]);
    assert_eq!(s.fake.current("vm").as_deref(), Some("c1"));
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
    let store = Store::open_with(s.dir.path().join("k.db"), opts).unwrap();
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
    let store2 = Store::open_with(s.dir.path().join("k.db"), other).unwrap();
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
