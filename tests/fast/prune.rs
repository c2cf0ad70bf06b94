//! `prune` on the fake: retention on a running domain (libvirt's real
//! delete) and a shut-off one (bitmap removal, then a metadata delete);
//! a crash at every point of a prune, then `recover` (resume and
//! rollback) — and a second crash during that recovery — ends with the
//! pruned checkpoints and their bitmaps gone, or with nothing changed; a
//! dry run changes nothing; hostile input changes nothing.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use ckptstore::testing::FakeBackend;
use ckptstore::{CheckpointDef, ErrorKind, Policy, Retention, TxnState};
use testkit::sim::{ckpt_id, fake_list, linear_chain, run_crashing, TempJournal, DOMAIN, VM_UUID};

const TARGETS: [&str; 2] = ["sda", "sdb"];

/// A domain with 5 checkpoints c0 <- … <- c4 synced from a chain (with
/// their bitmaps on both disks), running or shut off.
fn world(running: bool) -> (Arc<FakeBackend>, TempJournal) {
    let fake = Arc::new(FakeBackend::new());
    fake.define_domain(DOMAIN, VM_UUID, &TARGETS, true);
    for i in 0..5 {
        for t in TARGETS {
            fake.add_bitmap(DOMAIN, t, &ckpt_id(i));
        }
    }
    let j = TempJournal::new();
    let store = j.store_with_images(1, &fake, ckptstore::BitmapPolicy::Degrade);
    store.sync(&*fake, linear_chain(5, 2)).unwrap();
    fake.set_running(DOMAIN, running);
    (fake, j)
}

fn bitmaps(fake: &FakeBackend) -> BTreeMap<&'static str, Vec<String>> {
    TARGETS
        .iter()
        .map(|t| (*t, fake.bitmaps(DOMAIN, t)))
        .collect()
}

fn names(defs: &[CheckpointDef]) -> Vec<String> {
    defs.iter().map(|d| d.name.clone()).collect()
}

/// What a finished prune of `--keep 2` must leave.
fn assert_pruned(label: &str, fake: &FakeBackend, j: &TempJournal) {
    let after = fake_list(fake);
    assert_eq!(names(&after), [ckpt_id(3), ckpt_id(4)], "{label}");
    assert_eq!(after[0].parent, None, "{label}: the new oldest is a root");
    assert_eq!(after[1].parent.as_deref(), Some(ckpt_id(3).as_str()));
    for (t, b) in bitmaps(fake) {
        assert_eq!(b, [ckpt_id(3), ckpt_id(4)], "{label}: bitmaps of {t}");
    }
    let committed = j.store(900).committed(DOMAIN).unwrap().unwrap();
    assert!(
        ckptstore::testing::same_content(&committed.defs, &after),
        "{label}"
    );
    let chain = committed.chain.expect("a synced chain keeps its shape");
    let ids: Vec<(String, Option<String>)> = chain
        .checkpoints
        .iter()
        .map(|c| (c.id.clone(), c.parent.clone()))
        .collect();
    assert_eq!(
        ids,
        [(ckpt_id(3), None), (ckpt_id(4), Some(ckpt_id(3)))],
        "{label}"
    );
    assert_eq!(chain.disks.len(), 2, "{label}");
}

fn assert_unchanged(label: &str, fake: &FakeBackend, before: &[CheckpointDef]) {
    assert!(
        ckptstore::testing::same_content(&fake_list(fake), before),
        "{label}: libvirt changed"
    );
    for (t, b) in bitmaps(fake) {
        assert_eq!(b.len(), 5, "{label}: bitmaps of {t}");
    }
}

#[test]
fn keep_two_on_a_running_domain_purges_the_oldest_and_the_next_checkpoint_hangs_off_the_leaf() {
    let (fake, j) = world(true);
    let store = j.store_with_images(2, &fake, ckptstore::BitmapPolicy::Degrade);
    let r = store
        .prune(&*fake, DOMAIN, Retention::Keep(2), true)
        .unwrap();
    assert!(r.applied && r.txn.is_some());
    assert_eq!(r.pruned, [ckpt_id(0), ckpt_id(1), ckpt_id(2)]);
    assert_eq!(r.kept, [ckpt_id(3), ckpt_id(4)]);
    assert!(r.bitmaps_removed.is_empty(), "libvirt removed them");
    assert_eq!(r.libvirt_calls, 3);
    assert_eq!(fake.calls(ckptstore::testing::Op::Purge), 3);
    assert_pruned("running", &fake, &j);
    let parent = fake.create(DOMAIN, "next", 1_700_000_000).unwrap();
    assert_eq!(parent, Some(ckpt_id(4)));
    // Again: nothing to prune, no call.
    let again = store
        .prune(&*fake, DOMAIN, Retention::Keep(3), true)
        .unwrap();
    assert!(again.pruned.is_empty());
    assert_eq!(again.libvirt_calls, 0);
}

#[test]
fn keep_two_on_a_shut_off_domain_removes_the_bitmaps_then_the_metadata() {
    let (fake, j) = world(false);
    let store = j.store_with_images(2, &fake, ckptstore::BitmapPolicy::Degrade);
    let dry = store
        .prune(&*fake, DOMAIN, Retention::Keep(2), false)
        .unwrap();
    let r = store
        .prune(&*fake, DOMAIN, Retention::Keep(2), true)
        .unwrap();
    assert_eq!(r.pruned, dry.pruned);
    assert_eq!(r.bitmaps_removed, dry.bitmaps_removed);
    assert_eq!(r.bitmaps_removed.len(), 6, "3 checkpoints × 2 disks");
    assert_eq!(
        r.bitmaps_removed[1].image,
        std::path::Path::new(&format!("/fake/{DOMAIN}/sdb.qcow2"))
    );
    assert_eq!(r.libvirt_calls, 3, "three metadata deletes");
    assert_eq!(fake.calls(ckptstore::testing::Op::Purge), 0);
    assert_pruned("shut off", &fake, &j);
    fake.set_running(DOMAIN, true);
    assert_eq!(
        fake.create(DOMAIN, "next", 1_700_000_000).unwrap(),
        Some(ckpt_id(4))
    );
}

#[test]
fn a_dry_run_changes_nothing_not_even_the_journal() {
    for running in [true, false] {
        let (fake, j) = world(running);
        let before = fake_list(&fake);
        let store = j.store_with_images(2, &fake, ckptstore::BitmapPolicy::Degrade);
        let history = store.history(DOMAIN, 100).unwrap().transactions.len();
        let r = store
            .prune(&*fake, DOMAIN, Retention::Keep(1), false)
            .unwrap();
        assert!(!r.applied && r.txn.is_none());
        assert_eq!(r.pruned.len(), 4);
        assert_eq!(r.kept, [ckpt_id(4)]);
        assert_eq!(r.bitmaps_removed.len(), if running { 0 } else { 8 });
        assert_unchanged("dry run", &fake, &before);
        assert_eq!(
            store.history(DOMAIN, 100).unwrap().transactions.len(),
            history
        );
    }
}

#[test]
fn older_than_never_prunes_the_newest() {
    let (fake, j) = world(true);
    let store = j.store_with_images(2, &fake, ckptstore::BitmapPolicy::Degrade);
    // The chain's checkpoints are from 2020: all older than a day.
    let r = store
        .prune(
            &*fake,
            DOMAIN,
            Retention::OlderThan(Duration::from_secs(86_400)),
            true,
        )
        .unwrap();
    assert_eq!(r.kept, [ckpt_id(4)]);
    assert_eq!(r.pruned.len(), 4);
    // A duration longer than their age prunes nothing.
    let (fake, j) = world(true);
    let store = j.store_with_images(2, &fake, ckptstore::BitmapPolicy::Degrade);
    let r = store
        .prune(
            &*fake,
            DOMAIN,
            Retention::OlderThan(Duration::from_secs(100 * 365 * 86_400)),
            true,
        )
        .unwrap();
    assert!(r.pruned.is_empty());
    assert_eq!(fake_list(&fake).len(), 5);
}

#[test]
fn hostile_input_is_refused_before_any_change() {
    let (fake, j) = world(false);
    let before = fake_list(&fake);
    let store = j.store_with_images(2, &fake, ckptstore::BitmapPolicy::Degrade);
    let history = store.history(DOMAIN, 100).unwrap().transactions.len();
    let e = store
        .prune(&*fake, DOMAIN, Retention::Keep(0), true)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::BadInput);
    assert!(e.to_string().contains("--keep 0"), "{e}");
    let e = store
        .prune(&*fake, "no-such-domain", Retention::Keep(2), true)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unreachable, "{e}");
    // Another process holds one disk's image: QEMU's lock refuses it.
    fake.hold_image(DOMAIN, "sdb", true);
    let e = store
        .prune(&*fake, DOMAIN, Retention::Keep(2), true)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::BadInput, "{e}");
    assert!(
        matches!(e, ckptstore::Error::ImageInUse { txn: None, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("sdb.qcow2"), "{e}");
    assert_unchanged("refused", &fake, &before);
    assert_eq!(
        store.history(DOMAIN, 100).unwrap().transactions.len(),
        history
    );
    assert!(store.status(None).unwrap().incomplete.is_empty());
}

/// Crash at every point of a prune, then recover with `policy`; and crash
/// again at every point of that recovery, then recover for good.
fn crash_everywhere(running: bool, policy: Policy) -> (u64, BTreeMap<String, u64>) {
    let (fake, j) = world(running);
    let (store, points) = j.store_with_images_counting(2, &fake);
    store
        .prune(&*fake, DOMAIN, Retention::Keep(2), true)
        .unwrap();
    let total = points.count();
    let mut scenarios = 0;
    let mut outcomes = BTreeMap::new();
    let mut check = |label: &str, fake: &FakeBackend, j: &TempJournal, before: &[CheckpointDef]| {
        let store = j.store(901);
        assert!(store.status(None).unwrap().incomplete.is_empty(), "{label}");
        let last = &store.history(DOMAIN, 1).unwrap().transactions[0];
        let outcome = if fake_list(fake).len() == 5 {
            assert_unchanged(label, fake, before);
            assert_eq!(last.state, TxnState::RolledBack, "{label}");
            "unchanged"
        } else {
            assert_pruned(label, fake, j);
            "pruned"
        };
        *outcomes.entry(outcome.to_string()).or_insert(0) += 1;
        scenarios += 1;
    };
    for k in 1..=total {
        let (fake, j) = world(running);
        let before = fake_list(&fake);
        let crashed = j.store_with_images_crashing_at(100, &fake, k);
        let r = run_crashing(|| crashed.prune(&*fake, DOMAIN, Retention::Keep(2), true));
        assert!(r.is_none(), "prune did not reach point {k}");
        drop(crashed);
        let (rec, rpoints) = j.store_with_images_counting(200, &fake);
        let out = rec.recover(&*fake, policy, None).unwrap();
        assert!(out.failed.is_empty(), "{out:?}");
        let rtotal = rpoints.count();
        drop(rec);
        check(&format!("crash at {k}"), &fake, &j, &before);
        for r2 in 1..=rtotal {
            let (fake, j) = world(running);
            let crashed = j.store_with_images_crashing_at(100, &fake, k);
            assert!(
                run_crashing(|| crashed.prune(&*fake, DOMAIN, Retention::Keep(2), true)).is_none()
            );
            drop(crashed);
            let rec = j.store_with_images_crashing_at(200, &fake, r2);
            assert!(run_crashing(|| rec.recover(&*fake, policy, None)).is_none());
            drop(rec);
            let (fin, _) = j.store_with_images_counting(300, &fake);
            let out = fin.recover(&*fake, policy, None).unwrap();
            assert!(out.failed.is_empty(), "{out:?}");
            check(
                &format!("crash at {k}, then at {r2} of recover"),
                &fake,
                &j,
                &before,
            );
        }
    }
    (scenarios, outcomes)
}

#[test]
fn every_crash_point_of_a_prune_then_recover() {
    let mut all = 0;
    for running in [true, false] {
        for policy in [Policy::Resume, Policy::Rollback] {
            let (n, outcomes) = crash_everywhere(running, policy);
            println!("prune crash simulation (running: {running}, {policy:?}): {n} scenarios, {outcomes:?}");
            if policy == Policy::Resume {
                assert_eq!(
                    outcomes.get("unchanged"),
                    None,
                    "resume finishes every prune"
                );
            } else {
                assert!(
                    outcomes.contains_key("unchanged"),
                    "a rollback before any removal restores"
                );
                assert!(
                    outcomes.contains_key("pruned"),
                    "a removal made is rolled forward"
                );
            }
            all += n;
        }
    }
    println!("prune crash simulation: {all} scenarios");
    assert!(all > 100);
}
