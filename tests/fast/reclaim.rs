//! `reclaim` on the fake: the dry run changes nothing; the scan finds
//! exactly the orphan and broken bitmaps and the checkpoints they leave
//! unusable; hostile input.

use testkit::sim;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ckptstore::testing::{
    render_checkpoint, same_content, validate_with, DiskChain, FakeBackend, ImageEditError,
    ImageEditor, ImageError, ImageReader, Layer, LayerBitmap, Op, Removed,
};
use ckptstore::{
    Backend, BitmapPolicy, CheckpointAction, CheckpointDef, Error, ErrorKind, InconsistentReason,
    Owner, Policy, Store, StoreOptions,
};
use sim::*;

/// A shut-off domain with a 4-checkpoint chain synced (metadata only) whose
/// images hold every bitmap but c1's on sdb and all of c2's, plus a stray
/// bitmap on sda.
fn damaged() -> (Arc<FakeBackend>, TempJournal) {
    let fake = Arc::new(FakeBackend::new());
    fake.define_domain(DOMAIN, VM_UUID, &["sda", "sdb"], false);
    for i in 0..4 {
        for t in ["sda", "sdb"] {
            fake.add_bitmap(DOMAIN, t, &ckpt_id(i));
        }
    }
    fake.remove_bitmap(DOMAIN, "sdb", &ckpt_id(1));
    fake.remove_bitmap(DOMAIN, "sda", &ckpt_id(2));
    fake.remove_bitmap(DOMAIN, "sdb", &ckpt_id(2));
    fake.add_bitmap(DOMAIN, "sda", "stray");
    let j = TempJournal::new();
    j.store_with_images(1, &fake, BitmapPolicy::Ignore)
        .sync(fake.as_ref(), linear_chain(4, 2))
        .unwrap();
    (fake, j)
}

fn bitmaps(fake: &FakeBackend) -> Vec<Vec<String>> {
    ["sda", "sdb"]
        .iter()
        .map(|t| fake.bitmaps(DOMAIN, t))
        .collect()
}

#[test]
fn reclaim_dry_run_reports_and_changes_nothing() {
    let (fake, j) = damaged();
    let store = j.store_with_images(2, &fake, BitmapPolicy::Degrade);
    let (held, images) = (fake.peek(DOMAIN), bitmaps(&fake));
    let history = store.history(DOMAIN, 10).unwrap().transactions.len();
    fake.reset_calls();
    let r = store.reclaim(fake.as_ref(), DOMAIN, false).unwrap();
    assert!(!r.applied && r.txn.is_none());
    assert_eq!(
        r.orphans
            .iter()
            .map(|b| (b.target.as_str(), b.bitmap.as_str()))
            .collect::<Vec<_>>(),
        [("sda", "stray")]
    );
    assert!(r.inconsistent.is_empty(), "{:?}", r.inconsistent);
    let cps: Vec<_> = r
        .checkpoints
        .iter()
        .map(|c| (c.checkpoint.clone(), c.action, c.disks.clone()))
        .collect();
    assert_eq!(
        cps,
        [
            (
                ckpt_id(1),
                CheckpointAction::Degraded,
                vec!["sdb".to_string()]
            ),
            (
                ckpt_id(2),
                CheckpointAction::Deleted,
                vec!["sda".to_string(), "sdb".to_string()]
            ),
        ]
    );
    assert_eq!(r.libvirt_calls, 0);
    assert_eq!(fake.calls(Op::Redefine) + fake.calls(Op::Delete), 0);
    assert_eq!(fake.peek(DOMAIN), held);
    assert_eq!(bitmaps(&fake), images);
    assert_eq!(
        store.history(DOMAIN, 10).unwrap().transactions.len(),
        history
    );
    // The document round-trips.
    let json = serde_json::to_string(&r).unwrap();
    assert_eq!(
        serde_json::from_str::<ckptstore::ReclaimReport>(&json).unwrap(),
        r
    );
    assert!(!json.contains("foreign_bitmaps"), "{json}");
}

#[test]
fn reclaim_of_a_missing_domain_is_unreachable_and_writes_nothing() {
    let (fake, j) = damaged();
    let store = j.store_with_images(2, &fake, BitmapPolicy::Degrade);
    for apply in [false, true] {
        let err = store
            .reclaim(fake.as_ref(), "no-such-domain", apply)
            .unwrap_err();
        assert!(matches!(err, Error::Backend { .. }), "{err:?}");
        assert_eq!(err.kind(), ErrorKind::Unreachable);
    }
    assert!(store
        .history("no-such-domain", 10)
        .unwrap()
        .transactions
        .is_empty());
}

/// A shut-off domain's images in memory: the fake's bitmaps per disk (one
/// layer, `/fake/<domain>/<target>.qcow2`), some of them in use, and
/// images another process holds (QEMU's lock): the reader and the editor
/// of a store.
struct World {
    fake: Arc<FakeBackend>,
    in_use: Mutex<HashSet<(String, String)>>,
    held: Mutex<HashSet<PathBuf>>,
}

impl World {
    fn target(path: &Path) -> Option<String> {
        let file = path.strip_prefix(format!("/fake/{DOMAIN}")).ok()?;
        Some(file.to_str()?.strip_suffix(".qcow2")?.to_string())
    }
}

impl ImageReader for World {
    fn read_chain(&self, path: &Path) -> Result<DiskChain, ImageError> {
        let target = World::target(path).ok_or_else(|| ImageError::Unreadable {
            path: path.to_path_buf(),
            reason: "not a fake image".into(),
        })?;
        let in_use = self.in_use.lock().unwrap();
        Ok(DiskChain {
            layers: vec![Layer {
                path: path.to_path_buf(),
                bitmaps_consistent: true,
                bitmaps: self
                    .fake
                    .bitmaps(DOMAIN, &target)
                    .into_iter()
                    .map(|name| LayerBitmap {
                        in_use: in_use.contains(&(target.clone(), name.clone())),
                        name,
                        auto: true,
                    })
                    .collect(),
            }],
            unfollowed: None,
        })
    }
}

impl ImageEditor for World {
    fn remove_bitmap(&self, image: &Path, bitmap: &str) -> Result<Removed, ImageEditError> {
        self.check_writable(image)?;
        let target = World::target(image).unwrap();
        if !self
            .fake
            .bitmaps(DOMAIN, &target)
            .iter()
            .any(|b| b == bitmap)
        {
            return Ok(Removed::AlreadyGone);
        }
        self.fake.remove_bitmap(DOMAIN, &target, bitmap);
        Ok(Removed::Removed)
    }

    fn check_writable(&self, image: &Path) -> Result<(), ImageEditError> {
        if self.held.lock().unwrap().contains(image) {
            return Err(ImageEditError::InUse {
                image: image.to_path_buf(),
                message: "Failed to get \"write\" lock".into(),
            });
        }
        Ok(())
    }
}

/// `damaged()` with c3's bitmap on sdb left in use.
fn world() -> (Arc<World>, TempJournal) {
    let (fake, j) = damaged();
    let w = Arc::new(World {
        fake,
        in_use: Mutex::new(HashSet::from([("sdb".to_string(), ckpt_id(3))])),
        held: Mutex::new(HashSet::new()),
    });
    (w, j)
}

fn options(w: &Arc<World>, owner: u32, crash_at: Option<u64>) -> StoreOptions {
    let seen = Arc::new(AtomicU64::new(0));
    let hook: Option<ckptstore::testing::Hook> = crash_at.map(|k| {
        let hook: ckptstore::testing::Hook = Arc::new(move |_| {
            if seen.fetch_add(1, Ordering::SeqCst) + 1 == k {
                std::panic::panic_any(SimCrash);
            }
        });
        hook
    });
    StoreOptions {
        seams: ckptstore::testing::Seams {
            owner: Some(Owner {
                pid: owner,
                boot_id: "simulation".into(),
                start: u64::from(owner),
            }),
            liveness: Some(Arc::new(|_| false)),
            hook,
            images: Some(w.clone()),
            editor: Some(w.clone()),
        },
        reconnect_attempts: 3,
        reconnect_delay: std::time::Duration::ZERO,
        ..StoreOptions::default()
    }
}

fn store(w: &Arc<World>, j: &TempJournal, owner: u32, crash_at: Option<u64>) -> Store {
    Store::open_with(j.path(), options(w, owner, crash_at)).unwrap()
}

/// The end state of a reclaim of `world()`: stray, c3 on sdb (in use) and
/// c2 gone; c1 without sdb; c3 without sdb, hanging off c1.
fn assert_reclaimed(w: &World, label: &str) {
    let mut want: Vec<String> = [0, 1, 3].iter().map(|i| ckpt_id(*i)).collect();
    want.sort();
    let mut have = bitmaps(&w.fake);
    for v in &mut have {
        v.sort();
    }
    // sda loses the stray bitmap, sdb c3's (in use); c2's were gone before.
    assert_eq!(have, [want, vec![ckpt_id(0)]], "{label}");
    let held: Vec<(String, Option<String>, Vec<String>)> = w
        .fake
        .peek(DOMAIN)
        .into_iter()
        .map(|d| (d.name, d.parent, d.disks.into_keys().collect()))
        .collect();
    assert_eq!(
        held,
        [
            (ckpt_id(0), None, vec!["sda".to_string(), "sdb".to_string()]),
            (ckpt_id(1), Some(ckpt_id(0)), vec!["sda".to_string()]),
            (ckpt_id(3), Some(ckpt_id(1)), vec!["sda".to_string()]),
        ],
        "{label}"
    );
}

#[test]
fn reclaim_apply_removes_exactly_the_orphan_and_in_use_bitmaps() {
    let (w, j) = world();
    let s = store(&w, &j, 2, None);
    let dry = s.reclaim(w.fake.as_ref(), DOMAIN, false).unwrap();
    assert_eq!(dry.inconsistent.len(), 1);
    assert_eq!(
        (
            dry.inconsistent[0].target.as_str(),
            dry.inconsistent[0].bitmap.as_str()
        ),
        ("sdb", ckpt_id(3).as_str())
    );
    assert_eq!(dry.inconsistent[0].reason, InconsistentReason::InUse);
    let r = s.reclaim(w.fake.as_ref(), DOMAIN, true).unwrap();
    assert!(r.applied && r.txn.is_some(), "{r:?}");
    assert_eq!(
        (r.orphans.clone(), r.inconsistent.clone()),
        (dry.orphans, dry.inconsistent)
    );
    assert_reclaimed(&w, "apply");
    // The committed chain is libvirt's listing: validate would compare
    // equal, and a second reclaim has nothing to do.
    let committed = s.committed(DOMAIN).unwrap().unwrap();
    assert!(same_content(&committed.defs, &w.fake.peek(DOMAIN)));
    let chain = committed.chain.unwrap();
    assert_eq!(chain.checkpoints.len(), 3);
    let again = s.reclaim(w.fake.as_ref(), DOMAIN, true).unwrap();
    assert!(again.txn.is_none() && again.orphans.is_empty() && again.checkpoints.is_empty());
    assert_eq!(again.libvirt_calls, 0);
}

#[test]
fn reclaim_refuses_an_image_in_use_before_any_change() {
    let (w, j) = world();
    w.held
        .lock()
        .unwrap()
        .insert(PathBuf::from(format!("/fake/{DOMAIN}/sda.qcow2")));
    let s = store(&w, &j, 2, None);
    let (held, images) = (w.fake.peek(DOMAIN), bitmaps(&w.fake));
    let err = s.reclaim(w.fake.as_ref(), DOMAIN, true).unwrap_err();
    assert!(err.to_string().contains("in use"), "{err}");
    assert_eq!(w.fake.peek(DOMAIN), held);
    assert_eq!(bitmaps(&w.fake), images);
    assert!(s.status(Some(DOMAIN)).unwrap().incomplete.is_empty());
}

#[test]
fn reclaim_crashed_at_every_point_then_recovered_ends_reclaimed_or_untouched() {
    let (mut points, mut restored) = (0, 0);
    for policy in [Policy::Resume, Policy::Rollback] {
        for k in 1.. {
            let (w, j) = world();
            let before = (w.fake.peek(DOMAIN), bitmaps(&w.fake));
            let crashed = store(&w, &j, 2, Some(k));
            let r = run_crashing(|| crashed.reclaim(w.fake.as_ref(), DOMAIN, true));
            drop(crashed);
            if let Some(r) = r {
                r.unwrap();
                assert_reclaimed(&w, "no crash");
                break;
            }
            points += 1;
            let label = format!("{policy:?} crash at point {k}");
            let rec = store(&w, &j, 3, None)
                .recover(w.fake.as_ref(), policy, None)
                .unwrap();
            assert!(rec.failed.is_empty(), "{label}: {rec:?}");
            let untouched = (w.fake.peek(DOMAIN), bitmaps(&w.fake)) == before;
            if policy == Policy::Resume || !untouched {
                assert_reclaimed(&w, &label);
            } else {
                restored += 1;
            }
            let s = store(&w, &j, 4, None);
            assert!(
                s.status(Some(DOMAIN)).unwrap().incomplete.is_empty(),
                "{label}"
            );
            // Whatever happened, the next reclaim ends reclaimed.
            s.reclaim(w.fake.as_ref(), DOMAIN, true).unwrap();
            assert_reclaimed(&w, &format!("{label}, reclaimed again"));
        }
    }
    println!(
        "reclaim: {points} crashes (resume and rollback), each recovered; {restored} rollbacks restored \
         the before-image, the others finished"
    );
    assert!(points > 10 && restored > 0, "{points} {restored}");
}

fn def(i: usize, parent: Option<usize>, disks: &[&str]) -> CheckpointDef {
    CheckpointDef {
        name: ckpt_id(i),
        parent: parent.map(ckpt_id),
        creation_time: 1_700_000_000 + i as i64,
        description: None,
        disks: disks
            .iter()
            .map(|t| ((*t).to_string(), ckpt_id(i)))
            .collect(),
    }
}

/// A running domain: the orphans go through libvirt (a root checkpoint
/// naming them, then a real delete), one under another name when a
/// checkpoint of libvirt's already has the bitmap's; the checkpoint whose
/// bitmap libvirt finds missing is degraded.
#[test]
fn reclaim_of_a_running_domain_goes_through_libvirt() {
    let fake = Arc::new(FakeBackend::new());
    fake.define_domain(DOMAIN, VM_UUID, &["sda", "sdb"], true);
    for (t, b) in [
        ("sda", ckpt_id(0)),
        ("sda", ckpt_id(1)),
        ("sda", ckpt_id(2)),
        ("sda", "stray".to_string()),
        ("sdb", ckpt_id(0)),
        ("sdb", ckpt_id(2)),
    ] {
        fake.add_bitmap(DOMAIN, t, &b);
    }
    for d in [
        def(0, None, &["sda", "sdb"]),
        def(1, Some(0), &["sda", "sdb"]),
        def(2, Some(1), &["sda"]),
    ] {
        fake.redefine(DOMAIN, &render_checkpoint(&d), false)
            .unwrap();
    }
    let j = TempJournal::new();
    let store = j.store_with_images(1, &fake, BitmapPolicy::Degrade);
    store.import(fake.as_ref(), DOMAIN).unwrap();
    let dry = store.reclaim(fake.as_ref(), DOMAIN, false).unwrap();
    let orphans: Vec<(String, String)> = dry
        .orphans
        .iter()
        .map(|b| (b.target.clone(), b.bitmap.clone()))
        .collect();
    assert_eq!(
        orphans,
        [
            ("sda".to_string(), "stray".to_string()),
            ("sdb".to_string(), ckpt_id(2))
        ]
    );
    assert!(dry.inconsistent.is_empty());
    assert_eq!(dry.checkpoints.len(), 1);
    assert_eq!(dry.checkpoints[0].checkpoint, ckpt_id(1));
    assert_eq!(dry.checkpoints[0].disks, ["sdb"]);
    fake.reset_calls();
    let r = store.reclaim(fake.as_ref(), DOMAIN, true).unwrap();
    assert!(r.applied && r.txn.is_some());
    // c1 redefined; two removals, each a redefine and a real delete.
    assert_eq!(r.libvirt_calls, 5, "{r:?}");
    assert_eq!((fake.calls(Op::Redefine), fake.calls(Op::Purge)), (3, 2));
    assert_eq!(
        fake.peek(DOMAIN),
        [
            def(0, None, &["sda", "sdb"]),
            def(1, Some(0), &["sda"]),
            def(2, Some(1), &["sda"]),
        ]
    );
    let mut sda = fake.bitmaps(DOMAIN, "sda");
    sda.sort();
    assert_eq!(sda, [ckpt_id(0), ckpt_id(1), ckpt_id(2)]);
    assert_eq!(fake.bitmaps(DOMAIN, "sdb"), [ckpt_id(0)]);
    let report = validate_with(&store, fake.as_ref(), DOMAIN, &FakeImages(fake.clone())).unwrap();
    assert!(report.ok, "{report:?}");
}
