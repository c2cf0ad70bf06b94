//! `validate` against the real daemon (`qemu:///system`) and real qcow2
//! images, one test per finding kind, each with the image or libvirt's
//! metadata broken for real: a writer killed with SIGKILL, `qemu-img bitmap
//! --remove` / `--disable` / `--add`, a metadata-only delete, a redefine
//! behind the store's back, a cleared autoclear bit, an overlay without
//! the base's bitmap, a deleted backing file; and a running TCG domain
//! checked by libvirt (its per-disk check, which `REDEFINE_VALIDATE` makes).

use testkit::qemu;
use testkit::support;

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

use chrono::DateTime;
use ckptstore::testing::render_checkpoint;
use ckptstore::{
    validate, Backend, BitmapPolicy, Chain, Checkpoint, FindingKind as K, LibvirtBackend, Report,
    Store, StoreOptions,
};
use qemu::{leave_in_use, qemu_img};
use support::TestDomain;
use uuid::Uuid;

/// A shut-off test domain, its chain of checkpoints (a line, every disk in
/// every checkpoint), a journal and a backend.
struct Fixture {
    dom: TestDomain,
    backend: LibvirtBackend,
    store: Store,
    chain: Chain,
    /// Checkpoint names (= bitmap names), root first.
    names: Vec<String>,
    _journal: tempfile::TempDir,
}

impl Fixture {
    fn new(tag: &str, disks: usize, checkpoints: usize) -> Fixture {
        let dom = TestDomain::define(&support::system(), tag, disks);
        let backend = LibvirtBackend::connect(support::SYSTEM_URI).unwrap();
        let journal = tempfile::tempdir().unwrap();
        // The tests damage the images before the chain goes in; with the
        // bitmap check off, libvirt then holds the chain as it would had
        // the damage come after the sync (what validate is for).
        let store = Store::open_with(
            journal.path().join("journal.db"),
            StoreOptions {
                bitmaps: BitmapPolicy::Ignore,
                ..StoreOptions::default()
            },
        )
        .unwrap();
        let disk_ids: BTreeMap<String, String> = dom
            .targets
            .iter()
            .map(|t| (Uuid::new_v4().to_string(), t.clone()))
            .collect();
        let mut cps: Vec<Checkpoint> = Vec::new();
        for i in 0..checkpoints {
            cps.push(Checkpoint {
                id: Uuid::new_v4().to_string(),
                parent: cps.last().map(|c| c.id.clone()),
                created: DateTime::from_timestamp(1_700_000_000 + 60 * i as i64, 0).unwrap(),
                description: None,
                disks: disk_ids.keys().cloned().collect(),
            });
        }
        let names = cps.iter().map(|c| c.id.clone()).collect();
        let chain = Chain {
            scope: None,
            vm_id: Uuid::new_v4(),
            domain: Some(dom.name.clone()),
            disks: disk_ids,
            checkpoints: cps,
        };
        Fixture {
            dom,
            backend,
            store,
            chain,
            names,
            _journal: journal,
        }
    }

    /// Every checkpoint's bitmap on every disk.
    fn add_bitmaps(&self) {
        for name in &self.names {
            self.dom.add_bitmap_everywhere(name);
        }
    }

    /// The chain into the journal and libvirt, with the store's real sync.
    fn sync(&self) {
        let report = self.store.sync(&self.backend, self.chain.clone()).unwrap();
        assert_eq!(report.redefined.len(), self.names.len());
    }

    fn validate(&self) -> Report {
        let report = validate(&self.store, &self.backend, &self.dom.name).unwrap();
        // The JSON the CLI prints carries the kinds in snake case.
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["ok"], report.ok);
        for (f, j) in report
            .findings
            .iter()
            .zip(json["findings"].as_array().unwrap())
        {
            assert_eq!(j["kind"], f.kind.as_str());
        }
        report
    }

    fn name(&self, i: usize) -> &str {
        &self.names[i]
    }

    fn image(&self, disk: usize) -> &Path {
        &self.dom.images[disk]
    }
}

/// (kind, checkpoint, disk) of every finding, in order.
fn found(r: &Report) -> Vec<(K, Option<&str>, Option<&str>)> {
    r.findings
        .iter()
        .map(|f| (f.kind, f.checkpoint.as_deref(), f.disk.as_deref()))
        .collect()
}

fn bitmap_op(op: &str, image: &Path, name: &str) {
    qemu_img(&["bitmap", op, image.to_str().unwrap(), name]);
}

#[test]
fn clean_domain_is_ok_with_the_leaf_usable() {
    let f = Fixture::new("v-clean", 2, 3);
    f.add_bitmaps();
    f.sync();
    let r = f.validate();
    assert!(r.ok, "{r:#?}");
    assert!(r.findings.is_empty());
    assert_eq!(r.usable.as_deref(), Some(f.name(2)));
    assert_eq!(r.leaf.as_deref(), Some(f.name(2)));
    assert!(!r.running);
    assert_eq!(
        (r.checkpoints, r.images_read, r.libvirt_validations),
        (3, 2, 0)
    );
    assert!(r.journal_txn.is_some());
}

#[test]
fn in_use_bitmap_after_a_killed_writer_is_inconsistent() {
    let f = Fixture::new("v-inuse", 1, 2);
    let img = f.image(0);
    // Only the leaf's bitmap exists while the writer runs, so only it is
    // left in use; the root's is added after.
    f.dom.add_bitmap(0, f.name(1));
    leave_in_use(img);
    f.dom.add_bitmap(0, f.name(0));
    f.sync();

    let r = f.validate();
    assert_eq!(
        found(&r),
        [(K::InconsistentBitmap, Some(f.name(1)), Some("vda"))],
        "{r:#?}"
    );
    assert!(
        r.findings[0].detail.contains("in use on a stopped domain"),
        "{}",
        r.findings[0].detail
    );
    assert_eq!(r.findings[0].image.as_deref(), Some(img));
    // Every bitmap records on its own: a backup from the root still works.
    assert_eq!(r.usable.as_deref(), Some(f.name(0)));
}

#[test]
fn removed_bitmap_is_missing() {
    let f = Fixture::new("v-removed", 2, 3);
    f.add_bitmaps();
    bitmap_op("--remove", f.image(1), f.name(1));
    f.sync();
    let r = f.validate();
    assert_eq!(
        found(&r),
        [(K::MissingBitmap, Some(f.name(1)), Some("vdb"))],
        "{r:#?}"
    );
    assert_eq!(r.findings[0].image.as_deref(), Some(f.image(1)));
    assert_eq!(r.usable.as_deref(), Some(f.name(2)));
    // The leaf's bitmap gone too: the newest usable one is the root.
    bitmap_op("--remove", f.image(0), f.name(2));
    let r = f.validate();
    assert_eq!(
        found(&r),
        [
            (K::MissingBitmap, Some(f.name(2)), Some("vda")),
            (K::MissingBitmap, Some(f.name(1)), Some("vdb"))
        ]
    );
    assert_eq!(r.usable.as_deref(), Some(f.name(0)));
}

#[test]
fn disabled_bitmap_is_reported() {
    let f = Fixture::new("v-disabled", 1, 2);
    f.add_bitmaps();
    bitmap_op("--disable", f.image(0), f.name(1));
    f.sync();
    let r = f.validate();
    assert_eq!(
        found(&r),
        [(K::DisabledBitmap, Some(f.name(1)), Some("vda"))],
        "{r:#?}"
    );
    assert_eq!(r.usable.as_deref(), Some(f.name(0)));
}

#[test]
fn bitmap_added_by_hand_is_an_orphan() {
    let f = Fixture::new("v-orphan", 2, 2);
    f.add_bitmaps();
    bitmap_op("--add", f.image(1), "by-hand");
    f.sync();
    let r = f.validate();
    assert_eq!(
        found(&r),
        [(K::OrphanBitmap, Some("by-hand"), Some("vdb"))],
        "{r:#?}"
    );
    assert_eq!(r.findings[0].image.as_deref(), Some(f.image(1)));
    // An orphan takes nothing away from the checkpoints.
    assert_eq!(r.usable.as_deref(), Some(f.name(1)));
}

#[test]
fn checkpoint_deleted_from_libvirt_is_missing_in_libvirt() {
    let f = Fixture::new("v-deleted", 1, 3);
    f.add_bitmaps();
    f.sync();
    // Metadata only: the bitmap stays in the image (and the journal still
    // names it, so it is no orphan).
    f.backend.delete(&f.dom.name, f.name(2)).unwrap();
    let r = f.validate();
    assert_eq!(
        found(&r),
        [(K::MissingInLibvirt, Some(f.name(2)), None)],
        "{r:#?}"
    );
    assert_eq!(r.leaf.as_deref(), Some(f.name(1)));
    assert_eq!(r.usable.as_deref(), Some(f.name(1)));
}

#[test]
fn checkpoint_added_to_libvirt_only_is_unexpected() {
    let f = Fixture::new("v-extra", 1, 2);
    f.add_bitmaps();
    f.sync();
    let mut extra = f.backend.list(&f.dom.name).unwrap().pop().unwrap();
    extra.parent = Some(extra.name.clone());
    extra.name = "extra".into();
    extra.creation_time += 60;
    extra.disks = [("vda".to_string(), "extra".to_string())].into();
    f.dom.add_bitmap(0, "extra");
    f.backend
        .redefine(&f.dom.name, &render_checkpoint(&extra), false)
        .unwrap();
    let r = f.validate();
    assert_eq!(
        found(&r),
        [(K::UnexpectedInLibvirt, Some("extra"), None)],
        "{r:#?}"
    );
    assert_eq!(r.usable.as_deref(), Some("extra"));
}

#[test]
fn checkpoint_redefined_with_another_time_is_a_mismatch() {
    let f = Fixture::new("v-mismatch", 1, 2);
    f.add_bitmaps();
    f.sync();
    let mut changed = f.backend.list(&f.dom.name).unwrap().remove(0);
    changed.creation_time += 3600;
    f.backend
        .redefine(&f.dom.name, &render_checkpoint(&changed), false)
        .unwrap();
    let r = f.validate();
    assert_eq!(found(&r), [(K::Mismatch, Some(f.name(0)), None)], "{r:#?}");
    assert!(r.findings[0]
        .detail
        .contains("creationTime: journal 1700000000, libvirt 1700003600"));
}

#[test]
fn cleared_autoclear_bit_makes_every_bitmap_inconsistent() {
    let f = Fixture::new("v-autoclear", 2, 2);
    f.add_bitmaps();
    // Autoclear features: u64 at 88, big-endian; bit 0 is in byte 95.
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(f.image(0))
        .unwrap();
    let mut byte = [0u8; 1];
    file.read_exact_at(&mut byte, 95).unwrap();
    assert_eq!(byte[0] & 1, 1);
    file.write_all_at(&[byte[0] & !1], 95).unwrap();
    drop(file);
    f.sync();
    let r = f.validate();
    assert_eq!(
        found(&r),
        [
            (K::InconsistentBitmap, Some(f.name(0)), Some("vda")),
            (K::InconsistentBitmap, Some(f.name(1)), Some("vda"))
        ],
        "{r:#?}"
    );
    assert!(
        r.findings[0].detail.contains("autoclear bit 0"),
        "{}",
        r.findings[0].detail
    );
    assert_eq!(r.usable, None);
}

/// Moves disk `disk`'s image to `base.qcow2` and puts a fresh overlay on
/// it at the domain's path.
fn overlay(f: &Fixture, disk: usize) -> std::path::PathBuf {
    let top = f.image(disk);
    let base = f.dom.dir().join("base.qcow2");
    std::fs::rename(top, &base).unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        top.to_str().unwrap(),
    ]);
    base
}

#[test]
fn bitmap_in_the_base_but_not_the_overlay_is_a_broken_chain() {
    let f = Fixture::new("v-broken", 1, 2);
    f.add_bitmaps();
    let base = overlay(&f, 0);
    // The overlay continues only the leaf's bitmap.
    f.dom.add_bitmap(0, f.name(1));
    f.sync();
    let r = f.validate();
    assert_eq!(
        found(&r),
        [(K::BrokenChain, Some(f.name(0)), Some("vda"))],
        "{r:#?}"
    );
    assert_eq!(r.findings[0].image.as_deref(), Some(f.image(0)));
    assert!(
        r.findings[0].detail.contains(&base.display().to_string()),
        "{}",
        r.findings[0].detail
    );
    assert_eq!(r.images_read, 2);
    assert_eq!(r.usable.as_deref(), Some(f.name(1)));
}

#[test]
fn missing_backing_file_is_an_unreadable_image() {
    let f = Fixture::new("v-unreadable", 2, 1);
    f.add_bitmaps();
    let base = overlay(&f, 1);
    std::fs::remove_file(&base).unwrap();
    f.sync();
    let r = f.validate();
    assert_eq!(
        found(&r),
        [(K::UnreadableImage, None, Some("vdb"))],
        "{r:#?}"
    );
    assert_eq!(r.findings[0].image.as_deref(), Some(base.as_path()));
    // vdb's bitmaps are unknown: nothing is usable on every disk.
    assert_eq!(r.usable, None);
}

#[test]
fn running_domain_is_checked_by_libvirt_and_keeps_its_current_checkpoint() {
    let f = Fixture::new("v-running", 1, 3);
    // The middle checkpoint's bitmap was never made.
    f.dom.add_bitmap(0, f.name(0));
    f.dom.add_bitmap(0, f.name(2));
    f.sync();
    f.dom.start();

    let r = f.validate();
    assert!(r.running);
    assert_eq!(
        found(&r),
        [(K::MissingBitmap, Some(f.name(1)), Some("vda"))],
        "{r:#?}"
    );
    let detail = &r.findings[0].detail;
    assert!(
        detail.contains(&format!(
            "missing or broken bitmap '{}' for disk 'vda'",
            f.name(1)
        )),
        "{detail}"
    );
    assert_eq!(r.libvirt_validations, 3);
    // The leaf's bitmap records on its own: still usable.
    assert_eq!(r.usable.as_deref(), Some(f.name(2)));
    // libvirt's checkpoints are unchanged, and its hidden current
    // checkpoint is still the leaf: a new checkpoint (as a backup makes)
    // gets the leaf as its parent.
    let listed = f.backend.list(&f.dom.name).unwrap();
    assert_eq!(listed.len(), 3);
    let real = f
        .backend
        .create_checkpoint(
            &f.dom.name,
            "<domaincheckpoint><name>real</name></domaincheckpoint>",
        )
        .unwrap();
    assert_eq!(real.parent.as_deref(), Some(f.name(2)));

    // The real checkpoint validates; it is libvirt's only, so unexpected.
    let r = f.validate();
    assert_eq!(
        found(&r),
        [
            (K::UnexpectedInLibvirt, Some("real"), None),
            (K::MissingBitmap, Some(f.name(1)), Some("vda"))
        ],
        "{r:#?}"
    );
    assert_eq!(r.usable.as_deref(), Some("real"));
    let again = f
        .backend
        .create_checkpoint(
            &f.dom.name,
            "<domaincheckpoint><name>again</name></domaincheckpoint>",
        )
        .unwrap();
    assert_eq!(again.parent.as_deref(), Some("real"));
}
