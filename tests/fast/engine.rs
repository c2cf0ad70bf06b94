//! The engine's promises on the fake backend: economy (calls counted),
//! one writer per domain, import and re-sync, history, threads.

use testkit::sim;

use std::sync::Arc;

use ckptstore::testing::same_content;
use ckptstore::testing::Hook;
use ckptstore::testing::{FakeBackend, Op};
use ckptstore::Owner;
use ckptstore::{Backend, BitmapPolicy, Error, Outcome, Policy, Store, StoreOptions};
use sim::*;

fn fake_with_domain() -> FakeBackend {
    let fake = FakeBackend::new();
    fake.define_domain(DOMAIN, VM_UUID, &["sda", "sdb"], false);
    fake
}

fn defs(n: usize) -> Vec<ckptstore::CheckpointDef> {
    linear_chain(n, 2).validate().unwrap().defs()
}

#[test]
fn a_sync_redefines_each_missing_checkpoint_once_and_a_resync_nothing() {
    let fake = fake_with_domain();
    let j = TempJournal::new();
    let store = j.store(1);
    let r = store.sync(&fake, linear_chain(20, 2)).unwrap();
    assert_eq!(r.outcome, Outcome::Committed);
    assert_eq!(r.libvirt_calls, 20);
    assert_eq!(fake.calls(Op::Redefine), 20);
    assert!(same_content(&fake.peek(DOMAIN), &defs(20)));

    fake.reset_calls();
    let r = store.sync(&fake, linear_chain(20, 2)).unwrap();
    assert_eq!(r.outcome, Outcome::Unchanged);
    assert_eq!(
        (
            r.libvirt_calls,
            fake.calls(Op::Redefine),
            fake.calls(Op::Delete)
        ),
        (0, 0, 0)
    );
    assert_eq!(r.unchanged.len(), 20);
}

#[test]
fn a_long_sync_is_driven_by_its_journaled_steps_a_batch_at_a_time() {
    // More steps than one batch read back from the journal, and not a
    // multiple of it: every one made once, parent first, each marked done.
    let fake = fake_with_domain();
    let j = TempJournal::new();
    let store = j.store(1);
    let r = store.sync(&fake, linear_chain(600, 2)).unwrap();
    assert_eq!(r.outcome, Outcome::Committed);
    assert_eq!((r.libvirt_calls, fake.calls(Op::Redefine)), (600, 600));
    assert!(same_content(&fake.peek(DOMAIN), &defs(600)));
    let h = &store.history(DOMAIN, 1).unwrap().transactions[0];
    assert_eq!((h.done, h.total, h.checkpoints), (600, 600, 600));
}

#[test]
fn a_journaled_step_that_cannot_be_read_back_is_planned_again_from_libvirt() {
    // Someone damages the step row 300 of the intent just committed: the
    // steps before it are made as journaled, then the phase plans the rest
    // from libvirt, and the sync still ends with libvirt at its target.
    let fake = fake_with_domain();
    let j = TempJournal::new();
    let path = j.path();
    let hook: Hook = Arc::new(move |p| {
        if p == "txn.intent_committed" {
            let conn = rusqlite::Connection::open(&path).unwrap();
            let n = conn
                .execute(
                    "UPDATE steps SET xml = '<domaincheckpoint' WHERE seq = 300",
                    [],
                )
                .unwrap();
            assert_eq!(n, 1);
        }
    });
    let store = Store::open_with(
        j.path(),
        StoreOptions {
            seams: ckptstore::testing::Seams {
                hook: Some(hook),
                ..Default::default()
            },
            ..StoreOptions::default()
        },
    )
    .unwrap();
    let r = store.sync(&fake, linear_chain(600, 2)).unwrap();
    assert_eq!(r.outcome, Outcome::Committed);
    assert_eq!(fake.calls(Op::Redefine), 600, "each checkpoint once");
    assert!(same_content(&fake.peek(DOMAIN), &defs(600)));
    assert!(store.status(None).unwrap().incomplete.is_empty());
}

#[test]
fn a_prefix_costs_only_the_rest() {
    let fake = fake_with_domain();
    fake.set_checkpoints(DOMAIN, defs(12)[..7].to_vec());
    let store = TempJournal::new().store(1);
    let r = store.sync(&fake, linear_chain(12, 2)).unwrap();
    assert_eq!(r.redefined.len(), 5);
    assert_eq!(fake.calls(Op::Redefine), 5);
}

#[test]
fn a_resume_issues_only_the_remaining_calls() {
    for k in [3u64, 10, 17] {
        let fake = fake_with_domain();
        let j = TempJournal::new();
        // Die after the k-th recorded step of a 20-checkpoint sync.
        let seen = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let s2 = seen.clone();
        let hook: Hook = Arc::new(move |p| {
            if p == "step.recorded" && s2.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == k
            {
                std::panic::panic_any(SimCrash);
            }
        });
        let crashed = Store::open_with(
            j.path(),
            StoreOptions {
                seams: ckptstore::testing::Seams {
                    owner: Some(Owner {
                        pid: 1,
                        boot_id: "gone".into(),
                        start: 1,
                    }),
                    liveness: Some(Arc::new(|_| false)),
                    hook: Some(hook),
                    ..Default::default()
                },
                ..StoreOptions::default()
            },
        )
        .unwrap();
        assert!(run_crashing(|| crashed.sync(&fake, linear_chain(20, 2))).is_none());
        drop(crashed);
        fake.reset_calls();
        let rec = j.store(2);
        let status = rec.status(None).unwrap();
        assert_eq!(status.incomplete.len(), 1);
        assert_eq!(
            (status.incomplete[0].done, status.incomplete[0].total),
            (k, 20)
        );
        let out = rec.recover(&fake, Policy::Resume, None).unwrap().recovered;
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].outcome, Outcome::Committed);
        assert_eq!(fake.calls(Op::Redefine), 20 - k, "resume after {k} steps");
        assert_eq!(out[0].libvirt_calls, 20 - k);
        assert!(same_content(&fake.peek(DOMAIN), &defs(20)));
    }
}

#[test]
fn a_live_owner_makes_the_domain_busy_and_a_dead_one_is_recovered_first() {
    let fake = fake_with_domain();
    let j = TempJournal::new();
    // An open transaction owned by a process that is alive: this one, seen
    // from another store identity.
    let me = Owner::current();
    let hook: Hook = Arc::new(|p| {
        if p == "txn.intent_committed" {
            std::panic::panic_any(SimCrash);
        }
    });
    let holder = Store::open_with(
        j.path(),
        StoreOptions {
            seams: ckptstore::testing::Seams {
                owner: Some(me.clone()),
                hook: Some(hook),
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .unwrap();
    assert!(run_crashing(|| holder.sync(&fake, linear_chain(3, 1))).is_none());
    drop(holder);
    // Another process (a different identity whose liveness check is real).
    let other = Store::open_with(
        j.path(),
        StoreOptions {
            seams: ckptstore::testing::Seams {
                owner: Some(Owner {
                    pid: 2,
                    boot_id: "x".into(),
                    start: 2,
                }),
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .unwrap();
    let err = other.sync(&fake, linear_chain(3, 1)).unwrap_err();
    assert!(err.is_busy(), "{err}");
    assert!(matches!(&err, Error::Busy { owner: Some(owner), .. } if *owner == me));
    assert_eq!(fake.calls(Op::Redefine), 0, "busy changes nothing");
    assert!(
        other
            .recover(&fake, Policy::Resume, None)
            .unwrap()
            .recovered
            .is_empty(),
        "a live owner is left alone"
    );

    // Once the owner is dead, a sync of the domain recovers it first.
    let later = Store::open_with(
        j.path(),
        StoreOptions {
            seams: ckptstore::testing::Seams {
                owner: Some(Owner {
                    pid: 3,
                    boot_id: "y".into(),
                    start: 3,
                }),
                liveness: Some(Arc::new(|_| false)),
                ..Default::default()
            },
            ..Default::default()
        },
    )
    .unwrap();
    let r = later.sync(&fake, linear_chain(4, 1)).unwrap();
    assert_eq!(r.recovered.len(), 1);
    assert_eq!(r.recovered[0].outcome, Outcome::Committed);
    assert!(same_content(
        &fake.peek(DOMAIN),
        &linear_chain(4, 1).validate().unwrap().defs()
    ));
    assert!(later.status(None).unwrap().incomplete.is_empty());
}

#[test]
fn a_refused_step_rolls_back_to_the_exact_before_image() {
    let fake = fake_with_domain();
    let mut before = defs(6)[..4].to_vec();
    before[2].description = Some("stale".into());
    before.push(extra_def("x", Some(&before[1].name), 99));
    fake.set_checkpoints(DOMAIN, before.clone());
    let target = defs(6);
    fake.refuse_def(DOMAIN, &target[5]);
    let store = TempJournal::new().store(1);
    let err = store.sync(&fake, linear_chain(6, 2)).unwrap_err();
    assert!(err.is_rolled_back(), "{err}");
    assert!(
        err.to_string().contains(&target[5].name),
        "the error names the checkpoint: {err}"
    );
    assert!(same_content(&fake.peek(DOMAIN), &before));
    let h = store.history(DOMAIN, 10).unwrap().transactions;
    assert_eq!(h[0].state, ckptstore::testing::TxnState::RolledBack);
    assert!(
        store.committed(DOMAIN).unwrap().is_none(),
        "a rolled-back sync commits no chain"
    );
}

#[test]
fn a_rollback_puts_libvirts_current_checkpoint_back_where_it_was() {
    // Before: c0 <- {c1, c2, c3}, current c3 (the newest leaf). The sync
    // drops c2 and c3 and adds c4 under c1; libvirt refuses c4.
    let fake = fake_with_domain();
    let before = tree_chain(&[None, Some(0), Some(0), Some(0)], 2)
        .validate()
        .unwrap()
        .defs();
    fake.set_checkpoints(DOMAIN, before.clone());
    let c3 = ckpt_id(3);
    assert_eq!(fake.current(DOMAIN), Some(c3.clone()));
    let mut chain = tree_chain(&[None, Some(0), Some(0), Some(0), Some(1)], 2);
    chain
        .checkpoints
        .retain(|c| c.id != ckpt_id(2) && c.id != ckpt_id(3));
    let target = chain.clone().validate().unwrap().defs();
    let c4 = target.iter().find(|d| d.name == ckpt_id(4));
    fake.refuse_def(DOMAIN, c4.unwrap());
    let store = TempJournal::new().store(1);
    let err = store.sync(&fake, chain).unwrap_err();
    assert!(err.is_rolled_back(), "{err}");
    assert!(same_content(&fake.peek(DOMAIN), &before));
    assert_eq!(
        fake.current(DOMAIN),
        Some(c3),
        "a backup's next checkpoint would hang off it"
    );
}

#[test]
fn bad_input_changes_nothing() {
    let fake = fake_with_domain();
    let j = TempJournal::new();
    let store = j.store(1);
    let mut chain = linear_chain(3, 2);
    chain.disks.insert(disk_id(9), "vdz".into());
    let err = store.sync(&fake, chain).unwrap_err();
    assert!(
        err.is_bad_input()
            && matches!(&err, Error::UnknownTarget { target, .. } if target == "vdz"),
        "{err}"
    );
    let mut chain = linear_chain(3, 2);
    chain.checkpoints[0].parent = Some(ckpt_id(2));
    assert!(store.sync(&fake, chain).unwrap_err().is_bad_input());
    assert_eq!(fake.calls(Op::Redefine) + fake.calls(Op::Delete), 0);
    assert!(store.history(DOMAIN, 10).unwrap().transactions.is_empty());
    let err = store
        .sync(
            &fake,
            ckptstore::Chain {
                domain: Some("nope".into()),
                ..linear_chain(1, 1)
            },
        )
        .unwrap_err();
    assert!(err.is_unreachable(), "{err}");
}

#[test]
fn detached_disks_are_left_out_and_reported() {
    let fake = fake_with_domain();
    let store = TempJournal::new().store(1);
    let mut chain = linear_chain(2, 2);
    chain.disks.remove(&disk_id(1));
    let r = store.sync(&fake, chain).unwrap();
    assert_eq!(r.warnings.len(), 2, "{:?}", r.warnings);
    assert!(fake.peek(DOMAIN).iter().all(|d| d.disks.len() == 1));
}

#[test]
fn import_adopts_and_resync_reapplies_after_the_domain_is_recreated() {
    let fake = fake_with_domain();
    let store = TempJournal::new().store(1);
    store.sync(&fake, linear_chain(5, 2)).unwrap();
    // A transient domain is destroyed and created again: metadata gone.
    fake.undefine_domain(DOMAIN);
    fake.define_domain(DOMAIN, VM_UUID, &["sda", "sdb"], false);
    let r = store.resync(&fake, DOMAIN).unwrap();
    assert_eq!((r.outcome, r.libvirt_calls), (Outcome::Committed, 5));
    assert!(same_content(&fake.peek(DOMAIN), &defs(5)));

    // import: adopt what libvirt has now.
    let mut odd = defs(5);
    odd.push(extra_def("manual", Some(&odd[4].name), 7_000));
    fake.set_checkpoints(DOMAIN, odd.clone());
    fake.reset_calls();
    let r = store.import(&fake, DOMAIN).unwrap();
    assert_eq!(r.libvirt_calls, 0);
    assert_eq!(fake.calls(Op::Redefine), 0);
    let c = store.committed(DOMAIN).unwrap().unwrap();
    assert!(same_content(&c.defs, &odd));
    assert!(c.chain.is_none());
    let st = store.status(Some(DOMAIN)).unwrap();
    assert_eq!(st.domains[0].checkpoints, 6);
    assert_eq!(st.domains[0].leaf.as_deref(), Some("manual"));
    assert_eq!(st.domains[0].root.as_deref(), Some(odd[0].name.as_str()));
    assert!(matches!(
        store.resync(&fake, "other").unwrap_err(),
        Error::NoCommittedChain { .. }
    ));
}

#[test]
fn history_is_pruned_but_open_transactions_never_are() {
    let fake = fake_with_domain();
    let j = TempJournal::new();
    let store = Store::open_with(
        j.path(),
        StoreOptions {
            seams: ckptstore::testing::Seams {
                owner: Some(Owner {
                    pid: 1,
                    boot_id: "h".into(),
                    start: 1,
                }),
                liveness: Some(Arc::new(|_| true)),
                ..Default::default()
            },
            history: 3,
            ..Default::default()
        },
    )
    .unwrap();
    for n in 1..=6 {
        store.sync(&fake, linear_chain(n, 1)).unwrap();
    }
    let h = store.history(DOMAIN, 100).unwrap().transactions;
    assert_eq!(h.len(), 3);
    assert_eq!(h[0].checkpoints, 6, "newest first");
}

#[test]
fn eight_threads_sync_eight_domains_on_one_store() {
    let fake = FakeBackend::new();
    let names: Vec<String> = (0..8).map(|i| format!("dom{i}")).collect();
    for (i, n) in names.iter().enumerate() {
        fake.define_domain(
            n,
            &uuid::Uuid::from_u128(i as u128 + 1).to_string(),
            &["sda", "sdb"],
            false,
        );
    }
    let j = TempJournal::new();
    let store = j.store(1);
    std::thread::scope(|s| {
        for n in &names {
            let (store, fake) = (&store, &fake);
            s.spawn(move || {
                for len in [5, 9, 4] {
                    let chain = ckptstore::Chain {
                        domain: Some(n.clone()),
                        ..linear_chain(len, 2)
                    };
                    let r = store.sync(fake, chain).unwrap();
                    assert_eq!(r.outcome, Outcome::Committed);
                }
            });
        }
    });
    for n in &names {
        assert_eq!(fake.peek(n).len(), 4);
        assert_eq!(store.history(n, 10).unwrap().transactions.len(), 3);
    }
    assert_eq!(store.journal().integrity_check().unwrap(), "ok");
    assert!(store.status(None).unwrap().incomplete.is_empty());
}

#[test]
fn recovery_of_many_domains_runs_in_parallel_and_finishes_all() {
    let fake = FakeBackend::new();
    let j = TempJournal::new();
    let names: Vec<String> = (0..6).map(|i| format!("p{i}")).collect();
    for (i, n) in names.iter().enumerate() {
        fake.define_domain(
            n,
            &uuid::Uuid::from_u128(100 + i as u128).to_string(),
            &["sda"],
            false,
        );
        let crashed = j.store_crashing_at(10 + i as u32, 7);
        let chain = ckptstore::Chain {
            domain: Some(n.clone()),
            ..linear_chain(8, 1)
        };
        assert!(run_crashing(|| crashed.sync(&fake, chain)).is_none());
    }
    let rec = j.store(99);
    assert_eq!(rec.status(None).unwrap().incomplete.len(), 6);
    let out = rec.recover(&fake, Policy::Resume, None).unwrap().recovered;
    assert_eq!(out.len(), 6);
    assert!(out.iter().all(|r| r.outcome == Outcome::Committed));
    for n in &names {
        assert_eq!(fake.peek(n).len(), 8);
    }
    let again = rec.resync_many(&fake, &names);
    assert!(again
        .iter()
        .all(|r| r.as_ref().is_ok_and(|r| r.outcome == Outcome::Unchanged)));
}

/// Runs `f` on a thread and fails the test when it has not returned within
/// `secs` seconds (a hang must fail, not stall the suite).
fn within<T: Send + 'static>(secs: u64, what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(secs))
        .unwrap_or_else(|_| panic!("{what} did not return within {secs} s: a hang"))
}

/// A hook that stops the calling thread at the first `step.before_call`
/// until the test lets it go.
fn pause_at_first_call() -> (Hook, Arc<std::sync::Barrier>, Arc<std::sync::Barrier>) {
    let reached = Arc::new(std::sync::Barrier::new(2));
    let go = Arc::new(std::sync::Barrier::new(2));
    let first = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (r, g) = (reached.clone(), go.clone());
    let hook: Hook = Arc::new(move |p| {
        if p == "step.before_call" && first.swap(false, std::sync::atomic::Ordering::SeqCst) {
            r.wait();
            g.wait();
        }
    });
    (hook, reached, go)
}

#[test]
fn a_shared_store_answers_busy_to_recover_and_a_second_sync_while_one_thread_syncs() {
    let fake = Arc::new(fake_with_domain());
    let j = TempJournal::new();
    let (hook, reached, go) = pause_at_first_call();
    let store = Arc::new(
        Store::open_with(
            j.path(),
            StoreOptions {
                seams: ckptstore::testing::Seams {
                    hook: Some(hook),
                    ..Default::default()
                },
                ..StoreOptions::default()
            },
        )
        .unwrap(),
    );
    let (s1, f1) = (store.clone(), fake.clone());
    let syncing = std::thread::spawn(move || s1.sync(&*f1, linear_chain(6, 2)));
    reached.wait();
    // The first thread is inside its transaction. recover() must leave it
    // alone, and a second sync of the same domain must be Busy.
    let (s2, f2) = (store.clone(), fake.clone());
    let recovered = within(20, "recover beside a running sync", move || {
        s2.recover(&*f2, Policy::Resume, None)
    })
    .unwrap();
    assert!(recovered.recovered.is_empty(), "{recovered:?}");
    let (s3, f3) = (store.clone(), fake.clone());
    let second = within(20, "a second sync of the same domain", move || {
        s3.sync(&*f3, linear_chain(3, 2))
    });
    assert!(
        second.as_ref().is_err_and(Error::is_busy),
        "a second sync of a domain a thread works on must be Busy: {second:?}"
    );
    go.wait();
    let first = within(20, "the first sync", move || syncing.join().unwrap()).unwrap();
    assert_eq!(first.outcome, Outcome::Committed);
    assert!(same_content(&fake.peek(DOMAIN), &defs(6)));
    assert!(store.status(None).unwrap().incomplete.is_empty());
}

#[test]
fn eight_threads_recover_and_sync_overlapping_domains_on_one_store_never_hang() {
    let fake = Arc::new(FakeBackend::new());
    let names: Vec<String> = (0..3).map(|i| format!("ov{i}")).collect();
    for (i, n) in names.iter().enumerate() {
        fake.define_domain(
            n,
            &uuid::Uuid::from_u128(500 + i as u128).to_string(),
            &["sda", "sdb"],
            false,
        );
    }
    let j = TempJournal::new();
    let store = Arc::new(Store::open(j.path()).unwrap());
    let (names2, fake2, store2) = (names.clone(), fake.clone(), store.clone());
    let (busy, done) = within(120, "8 threads on 3 domains", move || {
        let busy = std::sync::atomic::AtomicU64::new(0);
        let done = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|s| {
            for t in 0..8usize {
                let (names, fake, store, busy, done) = (&names2, &fake2, &store2, &busy, &done);
                s.spawn(move || {
                    for round in 0..12usize {
                        if (t + round) % 4 == 0 {
                            let r = store.recover(&**fake, Policy::Resume, None).unwrap();
                            assert!(r.failed.is_empty(), "{r:?}");
                            continue;
                        }
                        let n = &names[(t + round) % names.len()];
                        let chain = ckptstore::Chain {
                            domain: Some(n.clone()),
                            ..linear_chain(2 + (t + round) % 5, 2)
                        };
                        match store.sync(&**fake, chain) {
                            Ok(_) => done.fetch_add(1, std::sync::atomic::Ordering::SeqCst),
                            Err(e) if e.is_busy() => {
                                busy.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
                            }
                            Err(e) => panic!("thread {t} round {round}: {e}"),
                        };
                    }
                });
            }
        });
        (busy.into_inner(), done.into_inner())
    });
    println!("engine: 8 threads × 12 rounds on 3 domains: {done} syncs ended, {busy} busy");
    assert!(done > 0);
    assert!(store.status(None).unwrap().incomplete.is_empty());
    // Every domain's committed chain is what libvirt holds.
    for n in &names {
        let c = store.committed(n).unwrap().expect("a committed chain");
        assert!(same_content(&fake.peek(n), &c.defs), "domain {n}");
    }
}

/// A backend that stops in its first armed `list` call, after reading
/// libvirt, until the test lets it go: a writer caught between planning
/// and committing its intent.
struct SlowList<'a> {
    inner: &'a FakeBackend,
    armed: std::sync::atomic::AtomicBool,
    reached: std::sync::Barrier,
    go: std::sync::Barrier,
}

impl ckptstore::Backend for SlowList<'_> {
    fn list(&self, domain: &str) -> Result<Vec<ckptstore::CheckpointDef>, ckptstore::BackendError> {
        let r = self.inner.list(domain);
        if self.armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
            self.reached.wait();
            self.go.wait();
        }
        r
    }
    fn redefine(
        &self,
        domain: &str,
        xml: &str,
        validate: bool,
    ) -> Result<(), ckptstore::BackendError> {
        self.inner.redefine(domain, xml, validate)
    }
    fn delete(&self, domain: &str, name: &str) -> Result<(), ckptstore::BackendError> {
        self.inner.delete(domain, name)
    }
    fn domain_info(&self, domain: &str) -> Result<ckptstore::DomainInfo, ckptstore::BackendError> {
        self.inner.domain_info(domain)
    }
    fn describe(&self) -> String {
        "slow list".into()
    }
}

#[test]
fn no_writer_commits_between_another_writers_listing_and_its_intent() {
    // libvirt holds chain A (5 checkpoints), committed. Writer 1 re-syncs
    // A and is caught right after listing libvirt (nothing to do, it
    // thinks); writer 2 syncs chain B (8 checkpoints) meanwhile. Whatever
    // the outcome, the journal's committed chain must be what libvirt holds.
    {
        let fake = fake_with_domain();
        let j = TempJournal::new();
        let store = Store::open(j.path()).unwrap();
        store.sync(&fake, linear_chain(5, 2)).unwrap();
        let slow = SlowList {
            inner: &fake,
            armed: std::sync::atomic::AtomicBool::new(true),
            reached: std::sync::Barrier::new(2),
            go: std::sync::Barrier::new(2),
        };
        std::thread::scope(|s| {
            let w1 = s.spawn(|| store.sync(&slow, linear_chain(5, 2)));
            slow.reached.wait();
            let w2 = store.sync(&fake, linear_chain(8, 2));
            slow.go.wait();
            let w1 = w1.join().unwrap();
            assert!(
                w1.is_ok() || w2.is_ok(),
                "one of the writers must proceed: {w1:?} {w2:?}"
            );
            assert!(
                w2.as_ref().is_ok() || w2.as_ref().is_err_and(Error::is_busy),
                "{w2:?}"
            );
        });
        let committed = store.committed(DOMAIN).unwrap().unwrap();
        assert!(
            same_content(&fake.peek(DOMAIN), &committed.defs),
            "the journal's committed chain ({} checkpoints) is not what libvirt holds ({})",
            committed.defs.len(),
            fake.peek(DOMAIN).len()
        );
    }
}

#[test]
fn an_owner_whose_transaction_was_taken_over_stops_before_its_next_call() {
    let fake = fake_with_domain();
    let j = TempJournal::new();
    let (hook, reached, go) = pause_at_first_call();
    let me = Owner {
        pid: 41,
        boot_id: "a".into(),
        start: 41,
    };
    let holder = Store::open_with(
        j.path(),
        StoreOptions {
            seams: ckptstore::testing::Seams {
                owner: Some(me.clone()),
                hook: Some(hook),
                ..Default::default()
            },
            ..StoreOptions::default()
        },
    )
    .unwrap();
    std::thread::scope(|s| {
        let run = s.spawn(|| holder.sync(&fake, linear_chain(4, 2)));
        reached.wait();
        // Someone who did not see the lock (an older version, another lock
        // folder) takes the transaction over.
        let other = j.store(42);
        let open = other.status(None).unwrap().incomplete;
        assert_eq!(open.len(), 1);
        let taker = Owner {
            pid: 42,
            boot_id: "simulation".into(),
            start: 42,
        };
        assert!(other.journal().take_over(open[0].txn, &me, &taker).unwrap());
        go.wait();
        let err = run.join().unwrap().unwrap_err();
        assert!(matches!(err, Error::TakenOver { .. }), "{err}");
        assert!(err.is_busy());
    });
    assert_eq!(
        fake.calls(Op::Redefine) + fake.calls(Op::Delete),
        0,
        "no libvirt call after the takeover"
    );
}

#[test]
fn a_progress_callback_that_stops_leaves_the_transaction_open_for_recover() {
    for stop_at in [0u64, 1, 5, 8] {
        let fake = fake_with_domain();
        let j = TempJournal::new();
        let stopping = Store::open_with(
            j.path(),
            StoreOptions {
                progress: Some(Arc::new(move |p: &ckptstore::Progress| {
                    if p.done == stop_at {
                        std::ops::ControlFlow::Break(())
                    } else {
                        std::ops::ControlFlow::Continue(())
                    }
                })),
                ..StoreOptions::default()
            },
        )
        .unwrap();
        let err = stopping.sync(&fake, linear_chain(8, 2)).unwrap_err();
        assert!(matches!(err, Error::Aborted { .. }), "{err}");
        assert_eq!(err.kind(), ckptstore::ErrorKind::Unreachable);
        assert_eq!(err.kind().exit_code(), 4);
        // No call after the stop: exactly the calls reported done.
        assert_eq!(fake.calls(Op::Redefine), stop_at, "stopped at {stop_at}");
        let open = stopping.status(None).unwrap().incomplete;
        assert_eq!((open.len(), open[0].done), (1, stop_at));
        // The same process finishes it (no lock is held any more).
        let store = Store::open(j.path()).unwrap();
        let r = store.recover(&fake, Policy::Resume, None).unwrap();
        assert_eq!(r.recovered.len(), 1, "{r:?}");
        assert_eq!(r.recovered[0].libvirt_calls, 8 - stop_at);
        assert!(same_content(&fake.peek(DOMAIN), &defs(8)));
        let again = store.sync(&fake, linear_chain(8, 2)).unwrap();
        assert_eq!(
            (again.outcome, again.libvirt_calls),
            (Outcome::Unchanged, 0)
        );
    }
}

/// `export` gives back the committed chain as a chain file, and syncing it
/// changes nothing: for a chain a sync gave, and for one `import` adopted
/// from checkpoints a backup tool made (`virtnbdbackup.N`).
#[test]
fn export_round_trips_a_synced_and_an_imported_chain() {
    let fake = fake_with_domain();
    let store = TempJournal::new().store(1);
    assert!(matches!(
        store.export(&fake, DOMAIN).unwrap_err(),
        Error::NoCommittedChain { .. }
    ));
    let chain = linear_chain(5, 2);
    store.sync(&fake, chain.clone()).unwrap();
    assert_eq!(store.export(&fake, DOMAIN).unwrap(), chain);

    // A backup tool's checkpoints, made by libvirt on the running domain.
    let fake = fake_with_domain();
    fake.set_running(DOMAIN, true);
    for i in 0..4 {
        fake.create(DOMAIN, &format!("virtnbdbackup.{i}"), 1_700_000_000 + i)
            .unwrap();
    }
    let store = TempJournal::new().store(1);
    store.import(&fake, DOMAIN).unwrap();
    let exported = store.export(&fake, DOMAIN).unwrap();
    assert_eq!(exported.vm_id.to_string(), VM_UUID);
    assert_eq!(
        exported
            .checkpoints
            .iter()
            .map(|c| (c.id.as_str(), c.parent.as_deref()))
            .collect::<Vec<_>>(),
        vec![
            ("virtnbdbackup.0", None),
            ("virtnbdbackup.1", Some("virtnbdbackup.0")),
            ("virtnbdbackup.2", Some("virtnbdbackup.1")),
            ("virtnbdbackup.3", Some("virtnbdbackup.2")),
        ]
    );
    let text = serde_json::to_string(&exported).unwrap();
    let back: ckptstore::Chain = serde_json::from_str(&text).unwrap();
    fake.reset_calls();
    let r = store.sync(&fake, back).unwrap();
    assert_eq!(r.outcome, Outcome::Unchanged);
    assert_eq!((fake.calls(Op::Redefine), fake.calls(Op::Delete)), (0, 0));
}

/// `plan_resync` previews a re-apply with the document `plan` gives for
/// the same chain, and changes nothing.
#[test]
fn plan_resync_previews_the_reapply_as_plan_does() {
    let fake = fake_with_domain();
    let store = TempJournal::new().store(1);
    let chain = linear_chain(6, 2);
    store.sync(&fake, chain.clone()).unwrap();
    // libvirt loses the newest two.
    fake.delete(DOMAIN, &ckpt_id(5)).unwrap();
    fake.delete(DOMAIN, &ckpt_id(4)).unwrap();
    let before = fake.peek(DOMAIN);
    fake.reset_calls();
    let preview = store.plan_resync(&fake, DOMAIN).unwrap();
    assert_eq!(preview, store.plan(&fake, chain).unwrap());
    assert_eq!(preview.steps.len(), 2);
    assert_eq!((fake.calls(Op::Redefine), fake.calls(Op::Delete)), (0, 0));
    assert_eq!(fake.peek(DOMAIN), before);
    let r = store.resync(&fake, DOMAIN).unwrap();
    assert_eq!(r.redefined, vec![ckpt_id(4), ckpt_id(5)]);
}

// ---------------------------------------------------------------------------
// Bitmaps: the check before the intent, and the three policies.

/// A shut-off domain whose images hold every bitmap of a 4-checkpoint chain
/// on both disks, but c1's on sdb and all of c2's.
fn damaged_images() -> Arc<FakeBackend> {
    let fake = Arc::new(fake_with_domain());
    for i in 0..4 {
        for t in ["sda", "sdb"] {
            fake.add_bitmap(DOMAIN, t, &ckpt_id(i));
        }
    }
    fake.remove_bitmap(DOMAIN, "sdb", &ckpt_id(1));
    fake.remove_bitmap(DOMAIN, "sda", &ckpt_id(2));
    fake.remove_bitmap(DOMAIN, "sdb", &ckpt_id(2));
    fake
}

fn degraded_of(r: &[ckptstore::Degraded]) -> Vec<(String, String)> {
    r.iter()
        .map(|d| (d.checkpoint.clone(), d.disk.clone()))
        .collect()
}

#[test]
fn degrade_leaves_missing_bitmaps_out_and_rehangs_the_children() {
    let fake = damaged_images();
    let j = TempJournal::new();
    let store = j.store_with_images(1, &fake, BitmapPolicy::Degrade);
    let r = store.sync(fake.as_ref(), linear_chain(4, 2)).unwrap();
    assert_eq!(r.outcome, Outcome::Committed);
    assert_eq!(
        degraded_of(&r.degraded),
        vec![
            (ckpt_id(1), "sdb".to_string()),
            (ckpt_id(2), "sda".to_string()),
            (ckpt_id(2), "sdb".to_string()),
        ]
    );
    assert!(r.unverified.is_empty(), "{:?}", r.unverified);
    assert!(
        r.warnings
            .iter()
            .any(|w| w.contains(&ckpt_id(2)) && w.contains("not redefined")),
        "{:?}",
        r.warnings
    );
    // libvirt never holds a checkpoint naming a bitmap its image lacks.
    let held = fake.peek(DOMAIN);
    assert_eq!(
        held.iter()
            .map(|d| (
                d.name.clone(),
                d.parent.clone(),
                d.disks.keys().cloned().collect::<Vec<_>>()
            ))
            .collect::<Vec<_>>(),
        vec![
            (ckpt_id(0), None, vec!["sda".to_string(), "sdb".to_string()]),
            (ckpt_id(1), Some(ckpt_id(0)), vec!["sda".to_string()]),
            (
                ckpt_id(3),
                Some(ckpt_id(1)),
                vec!["sda".to_string(), "sdb".to_string()]
            ),
        ]
    );
    for d in &held {
        for (t, b) in &d.disks {
            assert!(
                fake.bitmaps(DOMAIN, t).contains(b),
                "{} names {b} on {t}",
                d.name
            );
        }
    }
    // The journal keeps the chain as asked; a re-apply degrades the same
    // way and finds nothing to do.
    let committed = store.committed(DOMAIN).unwrap().unwrap();
    assert_eq!(committed.chain.unwrap().checkpoints.len(), 4);
    assert_eq!(committed.defs, held);
    fake.reset_calls();
    let again = store.resync(fake.as_ref(), DOMAIN).unwrap();
    assert_eq!(
        (again.outcome, again.libvirt_calls),
        (Outcome::Unchanged, 0)
    );
    assert_eq!(again.degraded.len(), 3);
    // plan shows the same before any call.
    let preview = store.plan(fake.as_ref(), linear_chain(4, 2)).unwrap();
    assert_eq!(degraded_of(&preview.degraded), degraded_of(&r.degraded));
    assert!(preview.steps.is_empty());
}

#[test]
fn strict_refuses_before_any_call_and_changes_nothing() {
    let fake = damaged_images();
    let j = TempJournal::new();
    let store = j.store_with_images(1, &fake, BitmapPolicy::Strict);
    let err = store.sync(fake.as_ref(), linear_chain(4, 2)).unwrap_err();
    assert_eq!(err.kind().exit_code(), 1, "{err}");
    let Error::MissingBitmaps { disks, .. } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(disks.len(), 3);
    assert!(err.to_string().contains("strict refuses the sync"), "{err}");
    assert_eq!(fake.calls(Op::Redefine) + fake.calls(Op::Delete), 0);
    assert!(fake.peek(DOMAIN).is_empty());
    assert!(store.history(DOMAIN, 10).unwrap().transactions.is_empty());
    assert!(matches!(
        store.plan(fake.as_ref(), linear_chain(4, 2)).unwrap_err(),
        Error::MissingBitmaps { .. }
    ));
    // With every bitmap present, strict syncs.
    fake.add_bitmap(DOMAIN, "sdb", &ckpt_id(1));
    fake.add_bitmap(DOMAIN, "sda", &ckpt_id(2));
    fake.add_bitmap(DOMAIN, "sdb", &ckpt_id(2));
    let r = store.sync(fake.as_ref(), linear_chain(4, 2)).unwrap();
    assert_eq!((r.outcome, r.redefined.len()), (Outcome::Committed, 4));
    assert!(r.degraded.is_empty());
}

#[test]
fn ignore_is_metadata_only() {
    let fake = damaged_images();
    let store = TempJournal::new().store_with_images(1, &fake, BitmapPolicy::Ignore);
    let r = store.sync(fake.as_ref(), linear_chain(4, 2)).unwrap();
    assert_eq!(r.redefined.len(), 4);
    assert!(r.degraded.is_empty() && r.unverified.is_empty());
    assert!(same_content(&fake.peek(DOMAIN), &defs(4)));
}

/// Images nobody can read are `unverified`: their checkpoints are defined
/// as asked, never taken as present or absent.
#[test]
fn images_that_cannot_be_read_are_unverified() {
    let fake = fake_with_domain();
    // The default reader: the fake's /fake/... paths do not exist.
    let store = TempJournal::new().store(1);
    let r = store.sync(&fake, linear_chain(3, 2)).unwrap();
    assert_eq!(r.redefined.len(), 3);
    assert_eq!(
        r.unverified
            .iter()
            .map(|u| u.disk.as_str())
            .collect::<Vec<_>>(),
        vec!["sda", "sdb"]
    );
    assert!(
        r.unverified[0].reason.contains("cannot be read"),
        "{:?}",
        r.unverified
    );
}

/// A running domain: libvirt checks the checkpoints it holds under the
/// same name (per disk), and redefines those it lacks with
/// `REDEFINE_VALIDATE`, whose refusal rolls the sync back.
#[test]
fn a_running_domain_is_checked_by_libvirt() {
    let fake = Arc::new(fake_with_domain());
    fake.set_running(DOMAIN, true);
    for i in 0..3 {
        for t in ["sda", "sdb"] {
            fake.add_bitmap(DOMAIN, t, &ckpt_id(i));
        }
    }
    let store = TempJournal::new().store_with_images(1, &fake, BitmapPolicy::Degrade);
    store.sync(fake.as_ref(), linear_chain(3, 2)).unwrap();
    // c2's bitmap on sdb goes; the chain changes c2's description.
    fake.remove_bitmap(DOMAIN, "sdb", &ckpt_id(2));
    let mut chain = linear_chain(3, 2);
    chain.checkpoints[2].description = Some("edited".into());
    let r = store.sync(fake.as_ref(), chain).unwrap();
    assert_eq!(
        degraded_of(&r.degraded),
        vec![(ckpt_id(2), "sdb".to_string())]
    );
    let c2 = fake.peek(DOMAIN).pop().unwrap();
    assert_eq!(c2.disks.keys().collect::<Vec<_>>(), vec!["sda"]);

    // A checkpoint libvirt lacks, without its bitmap: under strict,
    // libvirt refuses it and the sync rolls back.
    let before = fake.peek(DOMAIN);
    let mut chain = linear_chain(4, 2);
    chain.checkpoints[2].description = Some("edited".into());
    let strict = TempJournal::new().store_with_images(2, &fake, BitmapPolicy::Strict);
    let err = strict.sync(fake.as_ref(), chain.clone()).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Refused {
                rolled_back: true,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.kind().exit_code(), 1);
    assert_eq!(fake.peek(DOMAIN), before);
    // Under degrade, each refusal is rolled back and the sync applied
    // again without the refused disk: c3 has no disk left and goes.
    let r = store.sync(fake.as_ref(), chain).unwrap();
    assert_eq!(
        degraded_of(&r.degraded),
        vec![
            (ckpt_id(2), "sdb".to_string()),
            (ckpt_id(3), "sda".to_string()),
            (ckpt_id(3), "sdb".to_string()),
        ]
    );
    assert_eq!(
        r.warnings
            .iter()
            .filter(|w| w.contains("applied again"))
            .count(),
        3,
        "{:?}",
        r.warnings
    );
    assert_eq!(fake.peek(DOMAIN), before);
}

/// A chain with a scope manages only the checkpoints named in it: another
/// tool's checkpoints stay (foreign) through `sync --chain`, and a re-apply
/// with `prune_foreign` deletes only foreign checkpoints in the scope.
#[test]
fn a_scope_keeps_other_tools_checkpoints() {
    let fake = fake_with_domain();
    let j = TempJournal::new();
    let store = j.store(1);
    let mut chain = linear_chain(3, 2);
    chain.scope = Some("00000000-".into());
    // Another tool's checkpoint, outside the scope, and a stray one inside.
    fake.set_checkpoints(
        DOMAIN,
        vec![
            extra_def("tool-1", None, 1_500_000_000),
            extra_def("00000000-stray", None, 1_500_000_100),
        ],
    );
    let r = store.sync(&fake, chain.clone()).unwrap();
    assert_eq!(r.foreign, ["tool-1"]);
    assert_eq!(r.deleted, ["00000000-stray"]);
    let names: Vec<String> = fake.peek(DOMAIN).into_iter().map(|d| d.name).collect();
    assert!(names.contains(&"tool-1".to_string()), "{names:?}");
    assert_eq!(names.len(), 4);
    // An id outside its own scope is refused.
    let mut bad = chain.clone();
    bad.scope = Some("ovirt-".into());
    assert!(matches!(
        store.sync(&fake, bad).unwrap_err(),
        Error::Chain(ckptstore::ChainError::OutOfScope { .. })
    ));
    // A re-apply with prune deletes foreign checkpoints in scope only.
    fake.set_checkpoints(
        DOMAIN,
        fake.peek(DOMAIN)
            .into_iter()
            .chain([extra_def("00000000-late", None, 1_500_000_200)])
            .collect(),
    );
    let r = store.resync(&fake, DOMAIN).unwrap();
    assert_eq!(r.foreign, ["tool-1", "00000000-late"]);
    drop(store);
    let pruning = Store::open_with(
        j.path(),
        StoreOptions {
            prune_foreign: true,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    let r = pruning.resync(&fake, DOMAIN).unwrap();
    assert_eq!(r.deleted, ["00000000-late"]);
    assert_eq!(r.foreign, ["tool-1"]);
    assert_eq!(fake.peek(DOMAIN).len(), 4);
}
