//! End to end on the real daemon (`qemu:///system`): the store's `sync`,
//! `resync`, rollback and `recover` against real libvirt, on shut-off
//! domains with real qcow2 images, and on running (TCG) domains where only a
//! real checkpoint shows libvirt's hidden current checkpoint.
//!
//! - `sync_of_100_checkpoints_on_4_disks`: a 100 × 4 chain, then a no-op
//!   re-sync (no libvirt call) and a `resync` that redefines only what
//!   libvirt lost;
//! - `rollback_after_a_crash_restores_the_conflict_and_the_extra` and
//!   `a_step_libvirt_refuses_rolls_back_the_conflict_and_the_extra`: a sync
//!   that replaces a conflicting checkpoint and deletes an extra one, undone
//!   exactly;
//! - `libvirtd_killed_during_a_sync_then_recover` and
//!   `libvirtd_killed_during_a_sync_that_waits_for_it`: `kill -9` of the
//!   daemon at a seeded moment of a 100-checkpoint sync, then a restart
//!   (`CKPTSTORE_E2E_SEED=N` replays one);
//! - `a_backup_after_sync_and_rollback_hangs_off_the_leaf`,
//!   `a_backup_after_a_tree_sync_hangs_off_the_leaf`: the order of a sync,
//!   seen through the parent libvirt gives a real checkpoint;
//! - `a_daemon_restart_recomputes_the_current_checkpoint`: libvirt's rule
//!   (the leaf of a single line, else none), on the daemon and on the fake.
//!
//! Tests that stop the daemon hold it exclusively (the others in this
//! binary wait), keep the outage short, and restart it from a guard even
//! when they fail.

use testkit::sim;
use testkit::support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chrono::DateTime;
use ckptstore::testing::render_checkpoint;
use ckptstore::testing::same_content;
use ckptstore::testing::Hook;
use ckptstore::FakeBackend;
use ckptstore::Owner;
use ckptstore::PlanStep;
use ckptstore::{
    Backend, BackendErrorKind as K, BitmapPolicy, Chain, Checkpoint, CheckpointDef, Error,
    LibvirtBackend, Outcome, Policy, Store, StoreOptions,
};
use sim::{run_crashing, Rng, SimCrash};
use support::TestDomain;
use testkit::daemon::{exclusive as daemon_exclusive, shared as daemon_shared};
use uuid::Uuid;

// ---------------------------------------------------------------------------
// The daemon: shared by most tests, stopped by a few (the lock is the
// binary's: `libvirt_reconnect` holds it too).

/// The pid of the daemon `tests/support/libvirt.sh` started.
fn daemon_pid() -> u32 {
    let out = support::libvirt_sh("pid");
    let pid = String::from_utf8_lossy(&out.stdout).trim().to_string();
    pid.parse().unwrap_or_else(|_| {
        panic!("no libvirtd pid: run `bash tests/support/libvirt.sh start` (as root)")
    })
}

/// `libvirt.sh start`: idempotent, returns once `qemu:///system` answers.
fn start_daemon() {
    let out = support::libvirt_sh("start");
    assert!(
        out.status.success(),
        "libvirt.sh start failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `kill -9` the daemon, start it again; returns how long it was away.
fn kill_and_restart(pid: u32) -> Duration {
    let t = Instant::now();
    let out = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .output()
        .expect("kill runs");
    assert!(
        out.status.success(),
        "kill -KILL {pid}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    start_daemon();
    t.elapsed()
}

/// A daemon outage armed on a signal: when the signal comes, wait `delay`,
/// kill the daemon and restart it. Dropping the guard waits for that and
/// starts the daemon again in any case, so a failing test never leaves it
/// down.
struct Outage {
    thread: Option<JoinHandle<Option<Duration>>>,
}

impl Outage {
    fn arm(signal: mpsc::Receiver<()>, delay: Duration) -> Outage {
        let pid = daemon_pid();
        let thread = std::thread::spawn(move || {
            // No signal within the time limit (or the sender is gone): the
            // sync never got there, nothing to do.
            signal.recv_timeout(Duration::from_secs(120)).ok()?;
            std::thread::sleep(delay);
            Some(kill_and_restart(pid))
        });
        Outage {
            thread: Some(thread),
        }
    }

    /// Wait for the outage to end; its length, if there was one.
    fn join(&mut self) -> Option<Duration> {
        self.thread.take().and_then(|t| t.join().ok().flatten())
    }
}

impl Drop for Outage {
    fn drop(&mut self) {
        let _ = self.join();
        let out = support::libvirt_sh("start");
        if !out.status.success() {
            eprintln!(
                "cannot restart libvirtd: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

// ---------------------------------------------------------------------------
// Chains, stores, checks.

fn disk_id(i: usize) -> String {
    Uuid::from_u128(0xd15c_0000 + i as u128).to_string()
}

fn ckpt_id(i: usize) -> String {
    Uuid::from_u128(0xc4e0_0000 + i as u128).to_string()
}

/// The libvirt name of checkpoint `i`.
fn name(i: usize) -> String {
    ckpt_id(i)
}

/// A line: checkpoint i's parent is i - 1.
fn line(n: usize) -> Vec<Option<usize>> {
    (0..n).map(|i| i.checked_sub(1)).collect()
}

/// The chain of `dom` whose checkpoint i has parent `parents[i]`, taken an
/// hour after its parent, on every disk of the domain.
fn chain(dom: &TestDomain, parents: &[Option<usize>]) -> Chain {
    Chain {
        scope: None,
        vm_id: Uuid::parse_str(&dom.uuid).unwrap(),
        domain: Some(dom.name.clone()),
        disks: dom
            .targets
            .iter()
            .enumerate()
            .map(|(i, t)| (disk_id(i), t.clone()))
            .collect(),
        checkpoints: parents
            .iter()
            .enumerate()
            .map(|(i, p)| Checkpoint {
                id: ckpt_id(i),
                parent: p.map(ckpt_id),
                created: DateTime::from_timestamp(1_700_000_000 + i as i64 * 3600, 0).unwrap(),
                description: Some(format!("backup {i}")),
                disks: (0..dom.targets.len()).map(disk_id).collect(),
            })
            .collect(),
    }
}

fn defs(chain: &Chain) -> Vec<CheckpointDef> {
    chain.clone().validate().unwrap().defs()
}

/// A checkpoint outside any chain, on the first disk.
fn extra(name: &str, parent: Option<&str>, creation_time: i64) -> CheckpointDef {
    CheckpointDef {
        name: name.into(),
        parent: parent.map(Into::into),
        creation_time,
        description: Some(format!("extra {name}")),
        disks: [("vda".to_string(), name.to_string())].into(),
    }
}

/// Redefine `defs` straight into libvirt, in the order given.
fn put(backend: &dyn Backend, domain: &str, defs: &[CheckpointDef]) {
    for d in defs {
        backend
            .redefine(domain, &render_checkpoint(d), false)
            .unwrap_or_else(|e| panic!("redefine {}: {e}", d.name));
    }
}

fn journal_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("ckpt-e2e-journal-")
        .tempdir()
        .unwrap()
}

fn journal(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("journal.db")
}

/// A store acting as simulated process `owner`; every other owner is dead.
fn store_as(path: &Path, owner: u32, hook: Option<Hook>) -> Store {
    let opts = StoreOptions {
        seams: ckptstore::testing::Seams {
            owner: Some(Owner {
                pid: owner,
                boot_id: "e2e".into(),
                start: u64::from(owner),
            }),
            liveness: Some(Arc::new(|_| false)),
            hook,
            ..Default::default()
        },
        ..metadata_only()
    };
    Store::open_with(path, opts).unwrap()
}

/// The options of these tests: they drive the metadata loop over blank
/// images (a redefine on a shut-off domain never looks at the bitmaps), so
/// the bitmap check is off; `bitmaps_*` tests below turn it on with real
/// bitmaps.
fn metadata_only() -> StoreOptions {
    StoreOptions {
        bitmaps: BitmapPolicy::Ignore,
        ..StoreOptions::default()
    }
}

/// A hook that runs `f` when crash point `point` is passed the `nth` time.
fn at_point(point: &'static str, nth: u64, f: impl Fn() + Send + Sync + 'static) -> Hook {
    let seen = AtomicU64::new(0);
    Arc::new(move |p| {
        if p == point && seen.fetch_add(1, Ordering::SeqCst) + 1 == nth {
            f();
        }
    })
}

/// The 1-based position of the step on `checkpoint` in the plan.
fn step_number(steps: &[PlanStep], checkpoint: &str) -> u64 {
    1 + steps
        .iter()
        .position(|s| s.checkpoint() == checkpoint)
        .expect("the plan has the step") as u64
}

fn ops(steps: &[PlanStep], names: &dyn Fn(&str) -> String) -> Vec<String> {
    steps
        .iter()
        .map(|s| match s {
            PlanStep::Delete { checkpoint, .. } => format!("-{}", names(checkpoint)),
            PlanStep::Redefine {
                checkpoint,
                forced: false,
                ..
            } => format!("+{}", names(checkpoint)),
            PlanStep::Redefine {
                checkpoint,
                forced: true,
                ..
            } => format!("={}", names(checkpoint)),
        })
        .collect()
}

/// `c<i>` for chain checkpoints, the name itself for others.
fn short(n: &str) -> String {
    match Uuid::parse_str(n) {
        Ok(u) => format!("c{}", u.as_u128() - 0xc4e0_0000),
        Err(_) => n.to_string(),
    }
}

/// After recovery: libvirt equals the target (and the journal's committed
/// chain) or the before-image, nothing is incomplete, the journal is sound.
fn assert_settled(
    store: &Store,
    backend: &dyn Backend,
    domain: &str,
    target: &[CheckpointDef],
    before: &[CheckpointDef],
) -> Outcome {
    let now = backend.list(domain).unwrap();
    let status = store.status(Some(domain)).unwrap();
    assert!(
        status.incomplete.is_empty(),
        "still incomplete: {:?}",
        status.incomplete
    );
    assert_eq!(store.journal().integrity_check().unwrap(), "ok");
    if same_content(&now, target) {
        let committed = store.committed(domain).unwrap().expect("a committed chain");
        assert!(
            same_content(&committed.defs, target),
            "the journal's committed chain is not the target"
        );
        Outcome::Committed
    } else {
        assert!(
            same_content(&now, before),
            "libvirt is neither the target nor the before-image: {now:#?}"
        );
        Outcome::RolledBack
    }
}

fn seed(test: &str) -> u64 {
    let seed = testkit::rng::seed("CKPTSTORE_E2E_SEED");
    println!("{test}: seed {seed} (replay with CKPTSTORE_E2E_SEED={seed})");
    seed
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

// ---------------------------------------------------------------------------
// Shut-off domains.

#[test]
fn sync_of_100_checkpoints_on_4_disks() {
    let _daemon = daemon_shared();
    // Redefine on a shut-off domain is metadata only: libvirt never looks
    // for the bitmaps, so the images stay blank.
    let dom = TestDomain::define(&support::system(), "e2e-100x4", 4);
    let backend = LibvirtBackend::connect(support::SYSTEM_URI).unwrap();
    let dir = journal_dir();
    let store = Store::open_with(journal(&dir), metadata_only()).unwrap();
    let chain = chain(&dom, &line(100));
    let target = defs(&chain);

    let t = Instant::now();
    let report = store.sync(&backend, chain.clone()).unwrap();
    let sync_time = t.elapsed();
    assert_eq!(report.outcome, Outcome::Committed);
    assert_eq!(report.libvirt_calls, 100);
    assert_eq!(
        report.redefined,
        target.iter().map(|d| d.name.clone()).collect::<Vec<_>>()
    );
    assert!(report.deleted.is_empty() && report.unchanged.is_empty());
    // libvirt lists a line parent first: exactly the chain, 4 disks each.
    let listed = backend.list(&dom.name).unwrap();
    assert_eq!(listed, target);
    assert!(listed.iter().all(|d| d.disks.len() == 4));

    // Nothing to do: one list, no redefine.
    let t = Instant::now();
    let again = store.sync(&backend, chain).unwrap();
    let noop_time = t.elapsed();
    assert_eq!(again.outcome, Outcome::Unchanged);
    assert_eq!(again.libvirt_calls, 0);
    assert!(again.redefined.is_empty());
    assert_eq!(again.unchanged.len(), 100);

    // libvirt loses the newest three: resync redefines those only.
    for i in (97..100).rev() {
        backend.delete(&dom.name, &name(i)).unwrap();
    }
    let t = Instant::now();
    let resync = store.resync(&backend, &dom.name).unwrap();
    let resync_time = t.elapsed();
    assert_eq!(resync.outcome, Outcome::Committed);
    assert_eq!(resync.libvirt_calls, 3);
    assert_eq!(resync.redefined, vec![name(97), name(98), name(99)]);
    assert_eq!(backend.list(&dom.name).unwrap(), target);

    let status = store.status(Some(&dom.name)).unwrap();
    assert!(status.incomplete.is_empty());
    assert_eq!(status.domains.len(), 1);
    assert_eq!(
        (
            status.domains[0].checkpoints,
            status.domains[0].leaf.clone()
        ),
        (100, Some(name(99)))
    );
    assert_eq!(store.journal().integrity_check().unwrap(), "ok");
    println!(
        "sync 100 × 4 disks: {:.2} s ({:.1} ms per redefine); no-op re-sync: {:.1} ms; resync of 3: {:.1} ms",
        sync_time.as_secs_f64(),
        ms(sync_time) / 100.0,
        ms(noop_time),
        ms(resync_time),
    );
}

/// libvirt holds c0..c9 with c5 stale and an extra x on c3; the target is
/// c0..c11. Returns the domain, the chain, the target and the before-image.
fn conflict_and_extra(
    tag: &str,
) -> (
    TestDomain,
    LibvirtBackend,
    Chain,
    Vec<CheckpointDef>,
    Vec<CheckpointDef>,
) {
    let dom = TestDomain::define(&support::system(), tag, 2);
    let backend = LibvirtBackend::connect(support::SYSTEM_URI).unwrap();
    let chain = chain(&dom, &line(12));
    let target = defs(&chain);
    let mut pre: Vec<CheckpointDef> = target[..10].to_vec();
    pre[5].creation_time += 1000;
    pre[5].description = Some("stale".into());
    pre.push(extra("x", Some(&name(3)), 1_600_000_000));
    put(&backend, &dom.name, &pre);
    let before = backend.list(&dom.name).unwrap();
    assert!(same_content(&before, &pre));
    (dom, backend, chain, target, before)
}

/// The plan of the conflict-and-extra sync: the extra goes first (the
/// current checkpoint, c9, stays), then the path on from c9 — which moves
/// the current checkpoint to c11 from c9 or from none, after a restart —
/// and c5 is replaced last.
const CONFLICT_PLAN: [&str; 4] = ["-x", "+c10", "+c11", "+c5"];

#[test]
fn rollback_after_a_crash_restores_the_conflict_and_the_extra() {
    let _daemon = daemon_shared();
    let (dom, backend, chain, target, before) = conflict_and_extra("e2e-crash-rollback");
    let dir = journal_dir();
    let plan = store_as(&journal(&dir), 1, None)
        .plan(&backend, chain.clone())
        .unwrap();
    assert_eq!(ops(&plan.steps, &short), CONFLICT_PLAN);

    // The process dies just before the last call: x is deleted, c10 and
    // c11 added, c5 still stale.
    let last = step_number(&plan.steps, &name(5));
    let crashing = store_as(
        &journal(&dir),
        1,
        Some(at_point("step.before_call", last, || {
            std::panic::panic_any(SimCrash)
        })),
    );
    assert!(
        run_crashing(|| crashing.sync(&backend, chain.clone())).is_none(),
        "the sync reached its crash point"
    );
    drop(crashing);
    let mid = backend.list(&dom.name).unwrap();
    let mut expected = target.clone();
    expected[5] = before.iter().find(|d| d.name == name(5)).unwrap().clone();
    assert!(
        same_content(&mid, &expected),
        "c0..c11 with the stale c5, no x: {mid:#?}"
    );

    let t = Instant::now();
    let rec = store_as(&journal(&dir), 2, None);
    let recovered = rec
        .recover(&backend, Policy::Rollback, Some(&dom.name))
        .unwrap()
        .recovered;
    let rollback_time = t.elapsed();
    assert_eq!(recovered.len(), 1);
    assert_eq!(recovered[0].outcome, Outcome::RolledBack);
    // Delete c11 and c10, put back x.
    assert_eq!(recovered[0].libvirt_calls, 3);
    assert_eq!(
        assert_settled(&rec, &backend, &dom.name, &target, &before),
        Outcome::RolledBack
    );
    let now = backend.list(&dom.name).unwrap();
    let by_name = |n: &str| now.iter().find(|d| d.name == n).cloned();
    assert_eq!(
        by_name(&name(5)).unwrap().description.as_deref(),
        Some("stale")
    );
    assert_eq!(by_name("x"), before.iter().find(|d| d.name == "x").cloned());
    println!(
        "rollback of a crashed sync (3 calls): {:.1} ms",
        ms(rollback_time)
    );
}

#[test]
fn a_step_libvirt_refuses_rolls_back_the_conflict_and_the_extra() {
    let _daemon = daemon_shared();
    let (dom, backend, chain, target, before) = conflict_and_extra("e2e-refused");
    let dir = journal_dir();
    let plan = store_as(&journal(&dir), 1, None)
        .plan(&backend, chain.clone())
        .unwrap();
    assert_eq!(ops(&plan.steps, &short), CONFLICT_PLAN);

    // Just before c11 is redefined another client deletes its parent c10:
    // libvirt refuses c11 for real ("parent ... not found").
    let other = Arc::new(LibvirtBackend::connect(support::SYSTEM_URI).unwrap());
    let (domain, c10) = (dom.name.clone(), name(10));
    let last = step_number(&plan.steps, &name(11));
    let hook = at_point("step.before_call", last, move || {
        other.delete(&domain, &c10).unwrap();
    });
    let store = store_as(&journal(&dir), 1, Some(hook));
    let err = store.sync(&backend, chain).unwrap_err();
    match &err {
        Error::Refused {
            checkpoint,
            source,
            rolled_back: true,
            ..
        } => {
            assert_eq!(checkpoint, &name(11));
            assert_eq!(
                (source.kind, source.code),
                (K::InvalidArgument, 8),
                "{source:?}"
            );
            assert_eq!(
                source.message,
                format!(
                    "invalid argument: parent {} for moment {} not found",
                    name(10),
                    name(11)
                )
            );
        }
        e => panic!("expected a refusal rolled back, got {e}"),
    }
    assert_eq!(
        assert_settled(&store, &backend, &dom.name, &target, &before),
        Outcome::RolledBack
    );
    let history = store.history(&dom.name, 1).unwrap().transactions;
    assert!(
        history[0]
            .error
            .as_deref()
            .unwrap_or("")
            .contains("not found"),
        "{history:?}"
    );
}

/// `kill -9` the daemon after the `k`-th call of a 100-checkpoint sync
/// (plus up to 40 ms, so it lands inside a call or between two), restart
/// it, and check the invariant. `attempts`: how many lost connections the
/// sync itself waits for.
fn kill_during_sync(test: &str, attempts: u32) {
    let _daemon = daemon_exclusive();
    let seed = seed(test);
    let mut rng = Rng::new(seed);
    let k = 5 + rng.below(86);
    let delay = Duration::from_millis(rng.below(41));
    let policy = if rng.chance(50) {
        Policy::Resume
    } else {
        Policy::Rollback
    };
    println!(
        "{test}: kill after call {k} + {} ms; recover (if needed) with {policy:?}",
        delay.as_millis()
    );

    let dom = TestDomain::define(&support::system(), "e2e-kill", 4);
    let backend = LibvirtBackend::connect(support::SYSTEM_URI).unwrap();
    let chain = chain(&dom, &line(100));
    let target = defs(&chain);
    let (tx, rx) = mpsc::channel();
    let mut outage = Outage::arm(rx, delay);
    let tx = Mutex::new(Some(tx));
    let hook = at_point("step.after_call", k, move || {
        if let Some(tx) = tx.lock().unwrap().take() {
            let _ = tx.send(());
        }
    });
    let dir = journal_dir();
    let opts = StoreOptions {
        seams: ckptstore::testing::Seams {
            hook: Some(hook),
            ..Default::default()
        },
        reconnect_attempts: attempts,
        reconnect_delay: Duration::from_millis(100),
        ..metadata_only()
    };
    let store = Store::open_with(journal(&dir), opts).unwrap();

    let t = Instant::now();
    let result = store.sync(&backend, chain);
    let sync_time = t.elapsed();
    let away = outage.join();
    println!(
        "{test}: sync returned after {:.2} s: {}; daemon away {:.0} ms",
        sync_time.as_secs_f64(),
        match &result {
            Ok(r) => format!("{:?} with {} calls", r.outcome, r.libvirt_calls),
            Err(e) => e.to_string(),
        },
        away.map_or(0.0, ms),
    );
    assert!(away.is_some(), "the daemon was killed");
    drop(store);

    let store = Store::open_with(journal(&dir), metadata_only()).unwrap();
    match result {
        Ok(report) => {
            // It rode the outage out (or the kill came after its last call).
            assert_eq!(report.outcome, Outcome::Committed);
            assert!(report.libvirt_calls >= 100, "{report:?}");
            assert_eq!(
                assert_settled(&store, &backend, &dom.name, &target, &[]),
                Outcome::Committed
            );
        }
        Err(e) => {
            assert!(
                attempts < 10,
                "the sync should have waited for the daemon: {e}"
            );
            assert!(e.is_unreachable(), "{e}");
            let txn = e.txn().expect("the transaction is left open");
            let open = store.status(Some(&dom.name)).unwrap().incomplete;
            assert_eq!(open.len(), 1);
            assert_eq!(open[0].txn, txn);
            let t = Instant::now();
            let recovered = store
                .recover(&backend, policy, Some(&dom.name))
                .unwrap()
                .recovered;
            let expected = if policy == Policy::Resume {
                Outcome::Committed
            } else {
                Outcome::RolledBack
            };
            assert_eq!(recovered.len(), 1);
            assert_eq!(recovered[0].outcome, expected);
            assert_eq!(
                assert_settled(&store, &backend, &dom.name, &target, &[]),
                expected
            );
            println!(
                "{test}: recover ({policy:?}) made {} calls in {:.2} s",
                recovered[0].libvirt_calls,
                t.elapsed().as_secs_f64()
            );
        }
    }
}

#[test]
fn libvirtd_killed_during_a_sync_then_recover() {
    // The sync gives up at the first lost connection and leaves the
    // transaction open.
    kill_during_sync("libvirtd_killed_during_a_sync_then_recover", 0);
}

#[test]
fn libvirtd_killed_during_a_sync_that_waits_for_it() {
    // The sync waits (up to 30 s) for the daemon to come back.
    kill_during_sync("libvirtd_killed_during_a_sync_that_waits_for_it", 300);
}

// ---------------------------------------------------------------------------
// Running domains: a real checkpoint shows where the current one was.

/// Create a real checkpoint, as a backup does, and delete it again (its
/// parent becomes current again); the parent it got.
fn backup_parent(backend: &LibvirtBackend, domain: &str) -> Option<String> {
    static N: AtomicU64 = AtomicU64::new(0);
    let probe = format!(
        "probe-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    );
    let xml = format!("<domaincheckpoint><name>{probe}</name></domaincheckpoint>");
    let created = backend.create_checkpoint(domain, &xml).unwrap();
    backend.delete(domain, &probe).unwrap();
    created.parent
}

#[test]
fn a_backup_after_sync_and_rollback_hangs_off_the_leaf() {
    let _daemon = daemon_shared();
    let dom = TestDomain::define(&support::system(), "e2e-order", 1);
    dom.start();
    let backend = LibvirtBackend::connect(support::SYSTEM_URI).unwrap();
    let c = |i: usize| name(i);

    // libvirt holds c0..c3 and an extra branch x1 <- x2 on c1, made after
    // c3 (as a backup tool makes them), so that the current checkpoint is
    // x2, the newest leaf.
    let line6 = defs(&chain(&dom, &line(6)));
    let x1 = extra("x1", Some(&c(1)), 1_800_000_001);
    let x2 = extra("x2", Some("x1"), 1_800_000_002);
    put(
        &backend,
        &dom.name,
        &[
            line6[0].clone(),
            line6[1].clone(),
            x1,
            x2,
            line6[2].clone(),
            line6[3].clone(),
        ],
    );
    assert_eq!(backup_parent(&backend, &dom.name).as_deref(), Some("x2"));

    // Sync to c0..c5: the branch goes (children first), which leaves c1
    // current, off the path to c5; c5 hops there: first under c1 (it
    // becomes current), then, after c4, under c4 (it stays current). A
    // backup hangs off c5.
    let dir = journal_dir();
    let store = store_as(&journal(&dir), 1, None);
    let chain1 = chain(&dom, &line(6));
    let plan = store.plan(&backend, chain1.clone()).unwrap();
    assert_eq!(
        ops(&plan.steps, &short),
        ["-x2", "-x1", "+c5", "+c4", "+c5"]
    );
    let report = store.sync(&backend, chain1).unwrap();
    assert_eq!(
        (report.outcome, report.libvirt_calls),
        (Outcome::Committed, 5)
    );
    assert_eq!(backend.list(&dom.name).unwrap(), line6);
    assert_eq!(backup_parent(&backend, &dom.name), Some(c(5)));

    // Another client adds y on c2. A sync to c0..c7 with c3 edited (and y
    // gone) dies before its last call (c3); recover rolls it back. A
    // backup still hangs off c5, the before-image's leaf.
    put(
        &backend,
        &dom.name,
        &[extra("y", Some(&c(2)), 1_600_000_003)],
    );
    let before = backend.list(&dom.name).unwrap();
    let mut chain2 = chain(&dom, &line(8));
    chain2.checkpoints[3].description = Some("edited".into());
    let target2 = defs(&chain2);
    let plan = store.plan(&backend, chain2.clone()).unwrap();
    assert_eq!(ops(&plan.steps, &short), ["-y", "+c6", "+c7", "+c3"]);
    let last = step_number(&plan.steps, &c(3));
    let crashing = store_as(
        &journal(&dir),
        2,
        Some(at_point("step.before_call", last, || {
            std::panic::panic_any(SimCrash)
        })),
    );
    assert!(run_crashing(|| crashing.sync(&backend, chain2.clone())).is_none());
    drop(crashing);
    let rec = store_as(&journal(&dir), 3, None);
    let recovered = rec
        .recover(&backend, Policy::Rollback, Some(&dom.name))
        .unwrap()
        .recovered;
    assert_eq!(recovered[0].outcome, Outcome::RolledBack);
    assert_eq!(
        assert_settled(&rec, &backend, &dom.name, &target2, &before),
        Outcome::RolledBack
    );
    assert_eq!(backup_parent(&backend, &dom.name), Some(c(5)));

    // And a sync that commits c0..c7 leaves c7 current.
    let report = rec.sync(&backend, chain2).unwrap();
    assert_eq!(report.outcome, Outcome::Committed);
    assert_eq!(backup_parent(&backend, &dom.name), Some(c(7)));
}

/// The trees of issue 14 on the real daemon: a sync that deletes the
/// current checkpoint's branch tip and adds the leaf on another branch, and
/// one that adds a new root as the leaf. A backup hangs off the leaf.
#[test]
fn a_backup_after_a_branch_switch_or_a_new_root_hangs_off_the_leaf() {
    let _daemon = daemon_shared();
    let dom = TestDomain::define(&support::system(), "e2e-hop", 1);
    dom.start();
    let backend = LibvirtBackend::connect(support::SYSTEM_URI).unwrap();
    let dir = journal_dir();
    let store = store_as(&journal(&dir), 1, None);
    // c0 <- {c1, c2 <- c3}: c3 is current.
    let sync = |parents: &[Option<usize>], drop: &[usize]| {
        let mut chain = chain(&dom, parents);
        chain
            .checkpoints
            .retain(|c| !drop.iter().any(|i| c.id == ckpt_id(*i)));
        let r = store.sync(&backend, chain).unwrap();
        assert_eq!(r.outcome, Outcome::Committed);
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        r.libvirt_calls
    };
    assert_eq!(sync(&[None, Some(0), Some(0), Some(2)], &[]), 4);
    assert_eq!(backup_parent(&backend, &dom.name), Some(name(3)));
    // c3 goes and c4 comes under c1: deleting c3 makes c2 current, off the
    // path to c4. One delete, c4, and one hop.
    let switched = [None, Some(0), Some(0), Some(2), Some(1)];
    assert_eq!(sync(&switched, &[3]), 3);
    assert_eq!(backup_parent(&backend, &dom.name), Some(name(4)));
    // A new root c5 beside that tree: no redefine of a root becomes current
    // while c4 is; c5 hops under c4, then becomes a root again.
    let rooted = [None, Some(0), Some(0), Some(2), Some(1), None];
    assert_eq!(sync(&rooted, &[3]), 2);
    assert_eq!(backup_parent(&backend, &dom.name), Some(name(5)));
    // Retention: c0 goes and libvirt makes c1 and c2 roots itself; c5 is
    // redefined as it is, in case a daemon restart left none current (the
    // checkpoints branch). Two calls.
    assert_eq!(
        sync(&[None, None, None, Some(2), Some(1), None], &[0, 3]),
        2
    );
    assert_eq!(backup_parent(&backend, &dom.name), Some(name(5)));
}

#[test]
fn a_backup_after_a_tree_sync_hangs_off_the_leaf() {
    let _daemon = daemon_shared();
    let dom = TestDomain::define(&support::system(), "e2e-tree", 1);
    dom.start();
    let backend = LibvirtBackend::connect(support::SYSTEM_URI).unwrap();
    // c0 <- c1 (an older branch), c0 <- c2 <- c3 (the newest leaf).
    let tree = chain(&dom, &[None, Some(0), Some(0), Some(2)]);
    let dir = journal_dir();
    let store = store_as(&journal(&dir), 1, None);
    let report = store.sync(&backend, tree).unwrap();
    assert_eq!(
        (report.outcome, report.libvirt_calls),
        (Outcome::Committed, 4)
    );
    assert_eq!(backup_parent(&backend, &dom.name), Some(name(3)));
}

/// Where a test can make libvirt forget its current checkpoint.
trait Restartable {
    fn backend(&self) -> &dyn Backend;
    fn backup_parent(&self, domain: &str) -> Option<String>;
    fn restart(&self);
}

struct Real {
    backend: LibvirtBackend,
    domain: String,
}

impl Restartable for Real {
    fn backend(&self) -> &dyn Backend {
        &self.backend
    }
    fn backup_parent(&self, domain: &str) -> Option<String> {
        backup_parent(&self.backend, domain)
    }
    fn restart(&self) {
        let away = kill_and_restart(daemon_pid());
        println!("daemon restarted in {:.0} ms", ms(away));
        // The backend learns of the lost connection on its next call, then
        // opens a new one.
        if let Err(e) = self.backend.list(&self.domain) {
            assert_eq!(e.kind, K::ConnectionLost, "{e:?}");
        }
    }
}

struct Fake {
    fake: FakeBackend,
}

impl Restartable for Fake {
    fn backend(&self) -> &dyn Backend {
        &self.fake
    }
    fn backup_parent(&self, domain: &str) -> Option<String> {
        static N: AtomicU64 = AtomicU64::new(0);
        let probe = format!("probe-{}", N.fetch_add(1, Ordering::Relaxed));
        let parent = self.fake.create(domain, &probe, 1_800_000_000).unwrap();
        self.fake.delete(domain, &probe).unwrap();
        parent
    }
    fn restart(&self) {
        self.fake.restart();
    }
}

/// A restart makes the single leaf current when the checkpoints form one
/// line, and leaves none current when they branch.
fn restart_scenario(w: &dyn Restartable, domain: &str) {
    let b = w.backend();
    // c0 <- a (current), c0 <- s; deleting a makes c0 current: a line
    // c0 <- s whose current checkpoint is not its leaf.
    put(
        b,
        domain,
        &[
            extra("c0", None, 1),
            extra("a", Some("c0"), 2),
            extra("s", Some("c0"), 3),
        ],
    );
    assert_eq!(w.backup_parent(domain).as_deref(), Some("a"));
    b.delete(domain, "a").unwrap();
    assert_eq!(w.backup_parent(domain).as_deref(), Some("c0"));
    w.restart();
    assert_eq!(
        w.backup_parent(domain).as_deref(),
        Some("s"),
        "one line: its leaf is current"
    );

    // A branch: c0 <- s and c0 <- t. Before a restart s stays current...
    put(b, domain, &[extra("t", Some("c0"), 4)]);
    assert_eq!(w.backup_parent(domain).as_deref(), Some("s"));
    w.restart();
    // ...after it none is, and a new checkpoint becomes a root.
    assert_eq!(w.backup_parent(domain), None, "two leaves: none is current");
}

#[test]
fn a_daemon_restart_recomputes_the_current_checkpoint() {
    {
        let _daemon = daemon_exclusive();
        let dom = TestDomain::define(&support::system(), "e2e-restart", 1);
        dom.start();
        let real = Real {
            backend: LibvirtBackend::connect(support::SYSTEM_URI).unwrap(),
            domain: dom.name.clone(),
        };
        let _restart_anyway = Outage { thread: None };
        restart_scenario(&real, &dom.name);
    }
    // The fake forgets its current checkpoint alike.
    let fake = Fake {
        fake: FakeBackend::new(),
    };
    fake.fake
        .define_domain("restart", &Uuid::new_v4().to_string(), &["vda"], true);
    restart_scenario(&fake, "restart");
}

/// Backup tools name their checkpoints as they like: virtnbdbackup's
/// `virtnbdbackup.N`, OpenNebula's `one-<vm>-<n>`, a date. Each chain syncs
/// on the real daemon with the bitmaps it names in the images, and a second
/// sync makes no call.
#[test]
fn chains_named_like_real_backup_tools_sync() {
    let _daemon = daemon_shared();
    let dom = TestDomain::define(&support::system(), "e2e-names", 2);
    let backend = LibvirtBackend::connect(support::SYSTEM_URI).unwrap();
    let dir = journal_dir();
    let store = Store::open(journal(&dir)).unwrap();
    for names in [
        ["virtnbdbackup.0", "virtnbdbackup.1", "virtnbdbackup.2"],
        ["one-31-0", "one-31-1", "one-31-2"],
        ["nightly-20261130", "nightly-20261201", "nightly-20261202"],
    ] {
        for n in names {
            dom.add_bitmap_everywhere(n);
        }
        let mut c = chain(&dom, &line(3));
        // Disk ids are any string: here the target names themselves.
        c.disks = dom.targets.iter().map(|t| (t.clone(), t.clone())).collect();
        for (i, cp) in c.checkpoints.iter_mut().enumerate() {
            cp.id = names[i].to_string();
            cp.parent = i.checked_sub(1).map(|p| names[p].to_string());
            cp.disks = dom.targets.clone();
        }
        let report = store.sync(&backend, c.clone()).unwrap();
        assert_eq!(report.outcome, Outcome::Committed);
        let listed = backend.list(&dom.name).unwrap();
        assert_eq!(listed, defs(&c));
        assert_eq!(
            listed.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(),
            names
        );
        let again = store.sync(&backend, c).unwrap();
        assert_eq!(
            (again.outcome, again.libvirt_calls),
            (Outcome::Unchanged, 0)
        );
    }
}

/// `qemu-img bitmap --remove IMAGE NAME`.
fn remove_bitmap(image: &Path, name: &str) {
    let out = std::process::Command::new("qemu-img")
        .args(["bitmap", "--remove"])
        .arg(image)
        .arg(name)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// The check before the intent on the real daemon. Shut off, the images
/// are read in-process: `degrade` leaves out each disk whose bitmap is gone
/// (a checkpoint with none left goes, its child hangs off the one before),
/// `strict` refuses before any call, and validate finds nothing afterwards.
/// Running, libvirt checks: a checkpoint whose bitmap is gone is refused by
/// `REDEFINE_VALIDATE` and the sync rolls back.
#[test]
fn bitmaps_are_checked_before_the_intent_on_qemu() {
    let _daemon = daemon_shared();
    let dom = TestDomain::define(&support::system(), "e2e-bitmaps", 2);
    let backend = LibvirtBackend::connect(support::SYSTEM_URI).unwrap();
    let chain = chain(&dom, &line(4));
    for i in 0..4 {
        dom.add_bitmap_everywhere(&name(i));
    }
    remove_bitmap(&dom.images[1], &name(1));
    remove_bitmap(&dom.images[0], &name(2));
    remove_bitmap(&dom.images[1], &name(2));

    let dir = journal_dir();
    let strict = Store::open_with(
        journal(&dir),
        StoreOptions {
            bitmaps: BitmapPolicy::Strict,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    let err = strict.sync(&backend, chain.clone()).unwrap_err();
    assert!(
        matches!(err, Error::MissingBitmaps { ref disks, .. } if disks.len() == 3),
        "{err:?}"
    );
    assert!(backend.list(&dom.name).unwrap().is_empty());
    drop(strict);

    let store = Store::open(journal(&dir)).unwrap();
    let r = store.sync(&backend, chain.clone()).unwrap();
    assert_eq!(r.outcome, Outcome::Committed);
    let gone: Vec<(String, String)> = r
        .degraded
        .iter()
        .map(|d| (d.checkpoint.clone(), d.disk.clone()))
        .collect();
    assert_eq!(
        gone,
        vec![
            (name(1), "vdb".to_string()),
            (name(2), "vda".to_string()),
            (name(2), "vdb".to_string())
        ]
    );
    assert!(
        r.degraded[0].reason.contains("not in the top image"),
        "{:?}",
        r.degraded
    );
    let held = backend.list(&dom.name).unwrap();
    assert_eq!(
        held.iter()
            .map(|d| (d.name.clone(), d.parent.clone(), d.disks.len()))
            .collect::<Vec<_>>(),
        vec![
            (name(0), None, 2),
            (name(1), Some(name(0)), 1),
            (name(3), Some(name(1)), 2)
        ]
    );
    let report = ckptstore::validate(&store, &backend, &dom.name).unwrap();
    assert!(report.ok, "{report:#?}");
    assert_eq!(report.usable.as_deref(), Some(name(3).as_str()));

    // Running: checkpoints libvirt lacks (c2, and c4 whose bitmap no image
    // holds) are redefined with REDEFINE_VALIDATE. Under degrade each
    // refusal is rolled back and the sync applied again without that disk:
    // libvirt ends as it was.
    dom.start();
    let longer = self::chain(&dom, &line(5));
    let r = store.sync(&backend, longer.clone()).unwrap();
    let mut gone: Vec<(String, String)> = r
        .degraded
        .iter()
        .map(|d| (d.checkpoint.clone(), d.disk.clone()))
        .collect();
    gone.sort();
    assert_eq!(
        gone,
        vec![
            (name(1), "vdb".to_string()),
            (name(2), "vda".to_string()),
            (name(2), "vdb".to_string()),
            (name(4), "vda".to_string()),
            (name(4), "vdb".to_string())
        ]
    );
    assert_eq!(backend.list(&dom.name).unwrap(), held);
    // Under strict, the first refusal rolls the sync back.
    let strict = Store::open_with(
        journal(&dir),
        StoreOptions {
            bitmaps: BitmapPolicy::Strict,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    let err = strict.sync(&backend, longer).unwrap_err();
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
    assert!(
        err.to_string().contains("missing or broken bitmap"),
        "{err}"
    );
    assert_eq!(backend.list(&dom.name).unwrap(), held);
}
