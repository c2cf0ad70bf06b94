//! `ensure` on the fake: the per-disk modes under each policy on a running
//! and a shut-off domain, the parent libvirt lacks, idempotence, the hidden
//! current checkpoint for the next backup, bad input, and every crash point.

use testkit::sim;

use std::sync::Arc;

use ckptstore::testing::{FakeBackend, Op};
use ckptstore::{BitmapPolicy, CheckpointDef, DiskMode, EnsureReport, Error, Policy, TxnKind};
use sim::*;

/// A domain (running or not) whose 3-checkpoint chain c0 ← c1 ← c2 over
/// sda and sdb was synced with every bitmap present; then libvirt lost
/// every checkpoint's metadata, and sdb lost c2's bitmap.
fn lost_world(running: bool) -> (Arc<FakeBackend>, TempJournal) {
    let fake = Arc::new(FakeBackend::new());
    fake.define_domain(DOMAIN, VM_UUID, &["sda", "sdb"], running);
    for i in 0..3 {
        for t in ["sda", "sdb"] {
            fake.add_bitmap(DOMAIN, t, &ckpt_id(i));
        }
    }
    let j = TempJournal::new();
    j.store_with_images(1, &fake, BitmapPolicy::Degrade)
        .sync(fake.as_ref(), linear_chain(3, 2))
        .unwrap();
    fake.set_checkpoints(DOMAIN, Vec::new());
    fake.remove_bitmap(DOMAIN, "sdb", &ckpt_id(2));
    fake.reset_calls();
    (fake, j)
}

fn modes(r: &EnsureReport) -> Vec<(String, DiskMode)> {
    r.disks.iter().map(|d| (d.target.clone(), d.mode)).collect()
}

fn shape(defs: &[CheckpointDef]) -> Vec<(String, Option<String>, Vec<String>)> {
    defs.iter()
        .map(|d| {
            (
                d.name.clone(),
                d.parent.clone(),
                d.disks.keys().cloned().collect(),
            )
        })
        .collect()
}

fn changing_calls(fake: &FakeBackend) -> u64 {
    fake.calls(Op::Redefine) + fake.calls(Op::Delete)
}

/// What each run below must leave: c2 alone, a root (c1 is gone), on sda.
fn c2_on_sda() -> Vec<(String, Option<String>, Vec<String>)> {
    vec![(ckpt_id(2), None, vec!["sda".to_string()])]
}

fn expect_degraded(r: &EnsureReport) {
    assert_eq!(
        modes(r),
        vec![
            ("sda".to_string(), DiskMode::Incremental),
            ("sdb".to_string(), DiskMode::Full)
        ]
    );
    assert_eq!(r.disks[0].reason, None);
    assert!(r.disks[1].reason.is_some());
    // The chain's disk ids.
    assert_eq!(r.disks[0].disk, disk_id(0));
    assert_eq!(r.disks[1].disk, disk_id(1));
}

#[test]
fn degrade_on_a_running_domain_redefines_the_base_without_the_disk_libvirt_refuses() {
    let (fake, j) = lost_world(true);
    let store = j.store_with_images(2, &fake, BitmapPolicy::Degrade);
    let r = store
        .ensure(fake.as_ref(), DOMAIN, &ckpt_id(2), None)
        .unwrap();
    expect_degraded(&r);
    assert!(
        r.disks[1]
            .reason
            .as_deref()
            .unwrap()
            .contains("REDEFINE_VALIDATE"),
        "{r:?}"
    );
    assert!(r.redefined);
    assert_eq!(r.libvirt_calls, 1);
    assert!(
        r.warnings.iter().any(|w| w.contains("redefined as a root")),
        "{:?}",
        r.warnings
    );
    assert_eq!(shape(&fake.peek(DOMAIN)), c2_on_sda());
    // The refused attempt (one call) and the one that committed.
    assert_eq!(fake.calls(Op::Redefine), 2);
    // An ensure leaves the committed chain as the sync made it.
    let committed = store.committed(DOMAIN).unwrap().unwrap();
    assert_eq!(committed.defs.len(), 3);
    let history = store.history(DOMAIN, 10).unwrap().transactions;
    assert_eq!(history[0].kind, TxnKind::Ensure);

    // Again: libvirt already holds it, checked by libvirt: no call.
    fake.reset_calls();
    let again = store
        .ensure(fake.as_ref(), DOMAIN, &ckpt_id(2), None)
        .unwrap();
    expect_degraded(&again);
    assert!(!again.redefined);
    assert_eq!((again.libvirt_calls, changing_calls(&fake)), (0, 0));
    assert_eq!(shape(&fake.peek(DOMAIN)), c2_on_sda());
}

#[test]
fn degrade_on_a_shut_off_domain_reads_the_images() {
    let (fake, j) = lost_world(false);
    let store = j.store_with_images(2, &fake, BitmapPolicy::Degrade);
    let r = store
        .ensure(fake.as_ref(), DOMAIN, &ckpt_id(2), None)
        .unwrap();
    expect_degraded(&r);
    assert!(r.redefined);
    // The image said so before any call: one redefine, no refusal.
    assert_eq!((r.libvirt_calls, fake.calls(Op::Redefine)), (1, 1));
    assert_eq!(shape(&fake.peek(DOMAIN)), c2_on_sda());
    fake.reset_calls();
    let again = store
        .ensure(fake.as_ref(), DOMAIN, &ckpt_id(2), None)
        .unwrap();
    expect_degraded(&again);
    assert_eq!((again.libvirt_calls, changing_calls(&fake)), (0, 0));
}

#[test]
fn strict_refuses_with_no_call_and_ignore_takes_every_disk() {
    let (fake, j) = lost_world(false);
    let strict = j.store_with_images(2, &fake, BitmapPolicy::Strict);
    let before = strict.history(DOMAIN, 10).unwrap().transactions.len();
    let err = strict
        .ensure(fake.as_ref(), DOMAIN, &ckpt_id(2), None)
        .unwrap_err();
    let Error::MissingBitmaps { disks, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(disks.len(), 1);
    assert_eq!(
        (disks[0].checkpoint.as_str(), disks[0].disk.as_str()),
        (ckpt_id(2).as_str(), "sdb")
    );
    assert_eq!(err.kind().exit_code(), 1);
    assert_eq!(changing_calls(&fake), 0);
    assert!(fake.peek(DOMAIN).is_empty());
    assert_eq!(
        strict.history(DOMAIN, 10).unwrap().transactions.len(),
        before
    );

    // Running, libvirt lacking the checkpoint: its REDEFINE_VALIDATE
    // refuses, libvirt stays as it was, and strict says which disk.
    fake.set_running(DOMAIN, true);
    let err = strict
        .ensure(fake.as_ref(), DOMAIN, &ckpt_id(2), None)
        .unwrap_err();
    let Error::MissingBitmaps { disks, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(disks[0].disk, "sdb");
    assert!(fake.peek(DOMAIN).is_empty());

    let ignore = j.store_with_images(3, &fake, BitmapPolicy::Ignore);
    let r = ignore
        .ensure(fake.as_ref(), DOMAIN, &ckpt_id(2), None)
        .unwrap();
    assert!(r.disks.iter().all(|d| d.mode == DiskMode::Incremental));
    assert_eq!(
        shape(&fake.peek(DOMAIN)),
        vec![(ckpt_id(2), None, vec!["sda".to_string(), "sdb".to_string()])]
    );
}

#[test]
fn no_usable_disk_leaves_the_checkpoint_out_and_exits_zero() {
    for running in [false, true] {
        let (fake, j) = lost_world(running);
        fake.remove_bitmap(DOMAIN, "sda", &ckpt_id(2));
        let store = j.store_with_images(2, &fake, BitmapPolicy::Degrade);
        let r = store
            .ensure(fake.as_ref(), DOMAIN, &ckpt_id(2), None)
            .unwrap();
        assert!(r.disks.iter().all(|d| d.mode == DiskMode::Full), "{r:?}");
        assert!(r.disks.iter().all(|d| d.reason.is_some()), "{r:?}");
        assert!(!r.redefined);
        assert!(fake.peek(DOMAIN).is_empty(), "running {running}");
    }
}

#[test]
fn the_parent_stays_when_libvirt_has_it_and_nothing_is_deleted() {
    let (fake, j) = lost_world(true);
    // libvirt kept c0 and a checkpoint of another tool's.
    let c0 = linear_chain(3, 2).validate().unwrap().defs()[0].clone();
    let other = extra_def("other", None, 1_500_000_000);
    fake.add_bitmap(DOMAIN, "sda", "other");
    fake.set_checkpoints(DOMAIN, vec![other.clone(), c0.clone()]);
    let store = j.store_with_images(2, &fake, BitmapPolicy::Degrade);
    let r = store
        .ensure(fake.as_ref(), DOMAIN, &ckpt_id(1), None)
        .unwrap();
    assert_eq!(
        modes(&r),
        vec![
            ("sda".to_string(), DiskMode::Incremental),
            ("sdb".to_string(), DiskMode::Incremental)
        ]
    );
    assert!(r.redefined);
    assert_eq!(fake.calls(Op::Delete), 0);
    let held = fake.peek(DOMAIN);
    let c1 = held.iter().find(|d| d.name == ckpt_id(1)).unwrap();
    assert_eq!(c1.parent, Some(ckpt_id(0)));
    assert!(held.contains(&other) && held.contains(&c0));
    assert_eq!(held.len(), 3);
}

/// The next backup's checkpoint hangs off libvirt's hidden current
/// checkpoint: the ensured one when it is the newest libvirt has,
/// libvirt's newest otherwise.
#[test]
fn the_next_backup_hangs_off_the_newest_checkpoint() {
    // The ensured checkpoint is the newest.
    let (fake, j) = lost_world(true);
    let store = j.store_with_images(2, &fake, BitmapPolicy::Degrade);
    store
        .ensure(fake.as_ref(), DOMAIN, &ckpt_id(2), None)
        .unwrap();
    assert_eq!(fake.current(DOMAIN), Some(ckpt_id(2)));
    assert_eq!(
        fake.create(DOMAIN, "next", 1_700_000_000).unwrap(),
        Some(ckpt_id(2))
    );

    // libvirt holds a newer one (c2, a root since c1 is gone): ensuring
    // the older c1 (a root too, c0 is gone) leaves the current one on c2.
    let (fake, j) = lost_world(true);
    let c2 = CheckpointDef {
        parent: None,
        ..linear_chain(3, 2).validate().unwrap().defs()[2].clone()
    };
    fake.add_bitmap(DOMAIN, "sdb", &ckpt_id(2));
    fake.set_checkpoints(DOMAIN, vec![c2]);
    assert_eq!(fake.current(DOMAIN), Some(ckpt_id(2)));
    let store = j.store_with_images(2, &fake, BitmapPolicy::Degrade);
    let r = store
        .ensure(fake.as_ref(), DOMAIN, &ckpt_id(1), None)
        .unwrap();
    assert!(r.redefined);
    assert_eq!(fake.peek(DOMAIN).len(), 2);
    assert_eq!(fake.current(DOMAIN), Some(ckpt_id(2)));
    assert_eq!(
        fake.create(DOMAIN, "next", 1_700_000_000).unwrap(),
        Some(ckpt_id(2))
    );
}

#[test]
fn bad_input_changes_nothing() {
    let (fake, j) = lost_world(true);
    let store = j.store_with_images(2, &fake, BitmapPolicy::Degrade);
    let history = store.history(DOMAIN, 100).unwrap();
    let committed = store.committed(DOMAIN).unwrap();
    let err = store
        .ensure(fake.as_ref(), DOMAIN, "no-such-checkpoint", None)
        .unwrap_err();
    assert!(matches!(err, Error::UnknownCheckpoint { .. }), "{err:?}");
    assert_eq!(err.kind().exit_code(), 2);
    assert_eq!(
        err.to_string(),
        format!("checkpoint no-such-checkpoint is not in domain {DOMAIN}'s committed chain")
    );
    // A chain file for another domain, and one without the checkpoint.
    let mut other = linear_chain(3, 2);
    other.domain = Some("elsewhere".into());
    let err = store
        .ensure(fake.as_ref(), DOMAIN, &ckpt_id(2), Some(other))
        .unwrap_err();
    assert!(matches!(err, Error::OtherDomain { .. }), "{err:?}");
    assert_eq!(err.kind().exit_code(), 2);
    let err = store
        .ensure(fake.as_ref(), DOMAIN, &ckpt_id(5), Some(linear_chain(3, 2)))
        .unwrap_err();
    assert!(err.to_string().contains("chain file"), "{err}");
    // A domain the journal has no chain for, and one libvirt lacks.
    let err = store
        .ensure(fake.as_ref(), "unknown-domain", &ckpt_id(2), None)
        .unwrap_err();
    assert!(matches!(err, Error::NoCommittedChain { .. }), "{err:?}");
    let err = store
        .ensure(
            fake.as_ref(),
            "unknown-domain",
            &ckpt_id(2),
            Some({
                let mut c = linear_chain(3, 2);
                c.domain = Some("unknown-domain".into());
                c
            }),
        )
        .unwrap_err();
    assert_eq!(err.kind().exit_code(), 4, "{err:?}");
    assert_eq!(changing_calls(&fake), 0);
    assert!(fake.peek(DOMAIN).is_empty());
    assert_eq!(store.history(DOMAIN, 100).unwrap(), history);
    assert_eq!(store.committed(DOMAIN).unwrap(), committed);

    // A chain file of this domain gives the definition.
    let r = store
        .ensure(fake.as_ref(), DOMAIN, &ckpt_id(2), Some(linear_chain(3, 2)))
        .unwrap();
    expect_degraded(&r);
}

/// Crash an ensure (the running domain's refusal, rollback and retry
/// included) at every crash point, then recover (resume and rollback), and
/// also crash that recovery at each of its own points before a final one:
/// libvirt is unchanged or holds the base usable, never a checkpoint naming
/// a missing bitmap; a new ensure then ends where an uninterrupted one does.
#[test]
fn every_crash_point_of_an_ensure() {
    let total = {
        let (fake, j) = lost_world(true);
        let (store, points) = j.store_counting(2);
        store
            .ensure(fake.as_ref(), DOMAIN, &ckpt_id(2), None)
            .unwrap();
        points.count()
    };
    assert!(total >= 10, "{total}");
    let crashed_world = |k: u64| {
        let (fake, j) = lost_world(true);
        let crashed = j.store_crashing_at(100, k);
        let r = run_crashing(|| crashed.ensure(fake.as_ref(), DOMAIN, &ckpt_id(2), None));
        assert!(r.is_none(), "ensure did not reach point {k}");
        (fake, j)
    };
    let mut scenarios = 0;
    let mut second = 0;
    for k in 1..=total {
        for policy in [Policy::Resume, Policy::Rollback] {
            let (fake, j) = crashed_world(k);
            let (rec, points) = j.store_counting(200);
            let out = rec.recover(fake.as_ref(), policy, None).unwrap();
            let rtotal = points.count();
            settle(&fake, &j, out, &format!("point {k} {policy:?}"));
            scenarios += 1;
            for r2 in 1..=rtotal {
                let (fake, j) = crashed_world(k);
                let rec = j.store_crashing_at(150, r2);
                let r = run_crashing(|| rec.recover(fake.as_ref(), policy, None));
                assert!(r.is_none(), "recovery did not reach point {r2}");
                drop(rec);
                let out = j.store(300).recover(fake.as_ref(), policy, None).unwrap();
                settle(&fake, &j, out, &format!("point {k}, then {r2} {policy:?}"));
                scenarios += 1;
                second += 1;
            }
        }
    }
    println!(
        "ensure crash simulation: {total} crash points, {scenarios} scenarios ({second} with a second crash during the recovery)"
    );
}

/// After the final recovery: nothing open; libvirt holds nothing or the
/// base on sda only, every bitmap it names present; a new ensure ends
/// where an uninterrupted one does, the base current.
fn settle(fake: &Arc<FakeBackend>, j: &TempJournal, out: ckptstore::RecoverReport, label: &str) {
    assert!(
        out.failed.is_empty() && out.left_open.is_empty(),
        "{label}: {out:?}"
    );
    let held = shape(&fake.peek(DOMAIN));
    assert!(held.is_empty() || held == c2_on_sda(), "{label}: {held:?}");
    for d in fake.peek(DOMAIN) {
        for (t, b) in &d.disks {
            assert!(fake.bitmaps(DOMAIN, t).contains(b), "{label}");
        }
    }
    let r = j
        .store(400)
        .ensure(fake.as_ref(), DOMAIN, &ckpt_id(2), None)
        .unwrap();
    expect_degraded(&r);
    assert_eq!(shape(&fake.peek(DOMAIN)), c2_on_sda(), "{label}");
    assert_eq!(fake.current(DOMAIN), Some(ckpt_id(2)), "{label}");
}
