//! Deterministic kill points in the real binary, against the real daemon.
//!
//! Built only with `--features failpoints` (see `required-features` in
//! Cargo.toml; release builds never enable it): the binary then arms the
//! store's named crash points (`CRASH_POINTS`) from the `fail` crate's
//! `FAILPOINTS` variable, and a point armed with `panic` aborts the process
//! on the spot (src/cli/failpoints.rs).
//!
//! The walk, in the way SQLite and redb test theirs: for every named point
//! and every occurrence k = 1, 2, ... of it, run the command with
//! `FAILPOINTS='<point>=<k-1>*off->panic'` until a run ends without dying
//! there (so the point has k-1 occurrences). After each death a clean
//! `recover` must reach the invariant: libvirt equals the target or the
//! exact before-image (the one the policy asks for), nothing incomplete,
//! `PRAGMA integrity_check` = ok.
//!
//! 1. one `sync` of a 4-checkpoint chain whose pre-state has two extra
//!    checkpoints to delete, one to replace and two to add, each death
//!    followed by `recover` and by `recover --rollback`;
//! 2. one `recover` (and one `recover --rollback`) of that sync killed just
//!    after its third libvirt call and before recording it (outcome
//!    unknown), each death followed by a clean `recover` of the same policy;
//! 3. one `sync` that finds that interrupted transaction and recovers it
//!    first, each death followed by a clean `recover`.
//!
//! Run: `cargo test --features failpoints --test kill_points -- --nocapture`.

mod rel;
use testkit::support;

use std::collections::BTreeMap;
use std::path::Path;

use ckptstore::CRASH_POINTS;
use ckptstore::{CheckpointDef, LibvirtBackend};
use rel::{Landed, Out, Pre};
use support::{TestDomain, SYSTEM_URI};

const CHECKPOINTS: usize = 4;

/// `FAILPOINTS` that lets `k - 1` passes of `point` go and kills at the k-th.
fn spec(point: &str, k: u32) -> String {
    if k == 1 {
        format!("{point}=panic")
    } else {
        format!("{point}={}*off->panic", k - 1)
    }
}

/// Run `ckptstore ARGS` with `FAILPOINTS`; true when it died at `point`,
/// false when it ran to a successful end.
fn run_armed(db: &Path, args: &[&str], failpoints: &str, point: &str) -> (bool, Out) {
    let mut cmd = rel::command(db, args);
    cmd.env("FAILPOINTS", failpoints);
    let out = rel::run_cmd(cmd);
    if out.signal() == Some(libc::SIGABRT) {
        let line = format!("ckptstore: killed at crash point {point}\n");
        assert!(
            out.stderr.ends_with(&line),
            "{args:?} with {failpoints}: died elsewhere: {out:#?}"
        );
        (true, out)
    } else {
        assert_eq!(out.code(), Some(0), "{args:?} with {failpoints}: {out:#?}");
        assert!(!out.stderr.contains("crash point"), "{out:#?}");
        (false, out)
    }
}

struct World {
    dom: TestDomain,
    backend: LibvirtBackend,
    db: std::path::PathBuf,
    file: String,
    target: Vec<CheckpointDef>,
    before: Vec<CheckpointDef>,
    _dir: tempfile::TempDir,
}

impl World {
    fn name(&self) -> &str {
        &self.dom.name
    }

    fn reset(&self) {
        rel::reset(&self.backend, self.name(), &self.before);
    }

    /// Is a transaction of the domain open (its owner dead)?
    fn open(&self) -> bool {
        let st = rel::run(&self.db, &["status", "--domain", self.name(), "--json"])
            .expect(0, "status")
            .json();
        match st["incomplete"].as_array().unwrap().as_slice() {
            [] => false,
            [t] => {
                assert_eq!(t["owner_alive"], false);
                true
            }
            more => panic!("more than one open transaction: {more:?}"),
        }
    }

    fn recover(&self, rollback: bool) -> Out {
        let mut args = vec!["recover", "--domain", self.name(), "--json"];
        if rollback {
            args.push("--rollback");
        }
        let out = rel::run(&self.db, &args).expect(0, "recover");
        assert_eq!(out.json()["left_open"], serde_json::json!([]), "{out:#?}");
        out
    }

    fn check(&self, ctx: &str) -> Landed {
        rel::check_invariant(
            &self.backend,
            &self.db,
            self.name(),
            &self.target,
            &self.before,
            ctx,
        )
    }
}

fn world(conn: &virt::connect::Connect) -> World {
    let dom = TestDomain::define(conn, "killpoints", 2);
    let dir = tempfile::Builder::new()
        .prefix("ckptstore-killpoints-")
        .tempdir()
        .unwrap();
    let chain = rel::chain(&dom.name, CHECKPOINTS, &["vda", "vdb"]);
    let file = rel::write_chain(dir.path(), "chain.json", &chain);
    let target = rel::defs(&chain);
    // c0 as in the target, c1 with other content, and two extras: the sync
    // deletes two checkpoints, replaces one and adds two.
    let mut before = rel::pre_state(Pre::Extra, &target);
    before[1].description = Some("an older definition".into());
    let backend = LibvirtBackend::connect(SYSTEM_URI).unwrap();
    let db = dir.path().join("journal.db");
    let w = World {
        dom,
        backend,
        db,
        file,
        target,
        before,
        _dir: dir,
    };
    w.reset();
    w
}

#[test]
fn every_crash_point_of_sync_and_recover_on_qemu() {
    assert!(CRASH_POINTS.len() >= 8);
    let w = world(&support::system());
    let plan = ckptstore::testing::plan(&w.before, &w.target);
    println!(
        "kill points: {} named points; the sync makes {} libvirt calls ({} deletes, {} redefines)",
        CRASH_POINTS.len(),
        plan.steps.len(),
        plan.deleted().len(),
        plan.redefined().len()
    );
    let mut scenarios = 0u32;
    let mut landed: BTreeMap<Landed, u32> = BTreeMap::new();

    // 1. Every point of one sync, then recover with each policy.
    let mut sync_counts: Option<BTreeMap<&str, u32>> = None;
    for rollback in [false, true] {
        let policy = if rollback { "rollback" } else { "resume" };
        let mut counts = BTreeMap::new();
        for &point in CRASH_POINTS {
            let mut k = 1;
            loop {
                w.reset();
                let fp = spec(point, k);
                let (killed, _) = run_armed(&w.db, &["sync", "--chain", &w.file], &fp, point);
                let ctx = format!("sync killed by {fp}, recover {policy}");
                if !killed {
                    assert_eq!(w.check(&ctx), Landed::Target);
                    counts.insert(point, k - 1);
                    break;
                }
                let open = w.open();
                w.recover(rollback);
                let got = w.check(&ctx);
                let want = if open && rollback {
                    Landed::Before
                } else {
                    Landed::Target
                };
                // Dying before the intent is committed is the one way to
                // stay at the before-image without a transaction.
                assert!(
                    open || point == "txn.finished",
                    "{ctx}: no open transaction after a kill at {point}"
                );
                assert_eq!(got, want, "{ctx}");
                *landed.entry(got).or_default() += 1;
                scenarios += 1;
                k += 1;
            }
        }
        println!("kill points: sync, then recover --{policy}: deaths per point {counts:?}");
        if let Some(first) = &sync_counts {
            assert_eq!(first, &counts, "the walk is deterministic");
        }
        sync_counts = Some(counts);
    }
    let sync_counts = sync_counts.unwrap();
    for p in [
        "txn.intent_committed",
        "step.before_call",
        "step.after_call",
        "step.recorded",
        "txn.finished",
    ] {
        assert!(sync_counts[p] > 0, "a sync passes {p}");
    }
    assert_eq!(sync_counts["step.before_call"] as usize, plan.steps.len());

    // 2. Every point of one recover of an interrupted sync: the sync dies
    // after its third libvirt call, before recording it.
    let interrupt = spec("step.after_call", 3);
    for rollback in [false, true] {
        let policy = if rollback { "rollback" } else { "resume" };
        let mut args = vec!["recover", "--domain", w.name()];
        if rollback {
            args.push("--rollback");
        }
        let mut counts = BTreeMap::new();
        for &point in CRASH_POINTS {
            let mut k = 1;
            loop {
                w.reset();
                let (killed, _) = run_armed(
                    &w.db,
                    &["sync", "--chain", &w.file],
                    &interrupt,
                    "step.after_call",
                );
                assert!(killed && w.open());
                let fp = spec(point, k);
                let (killed, _) = run_armed(&w.db, &args, &fp, point);
                let ctx = format!("sync killed by {interrupt}, recover --{policy} killed by {fp}");
                if killed {
                    w.recover(rollback);
                }
                let got = w.check(&ctx);
                assert_eq!(
                    got,
                    if rollback {
                        Landed::Before
                    } else {
                        Landed::Target
                    },
                    "{ctx}"
                );
                if !killed {
                    counts.insert(point, k - 1);
                    break;
                }
                *landed.entry(got).or_default() += 1;
                scenarios += 1;
                k += 1;
            }
        }
        println!(
            "kill points: recover --{policy} of an interrupted sync: deaths per point {counts:?}"
        );
        assert!(
            counts["recover.taken_over"] == 1 && counts["txn.finished"] == 1,
            "{counts:?}"
        );
        if rollback {
            assert_eq!(counts["txn.rollback_begun"], 1);
        }
    }
    // 3. Every point of a sync that finds the interrupted transaction and
    // recovers it first (then has nothing left to do).
    let mut counts = BTreeMap::new();
    for &point in CRASH_POINTS {
        let mut k = 1;
        loop {
            w.reset();
            let (killed, _) = run_armed(
                &w.db,
                &["sync", "--chain", &w.file],
                &interrupt,
                "step.after_call",
            );
            assert!(killed && w.open());
            let fp = spec(point, k);
            let (killed, _) = run_armed(&w.db, &["sync", "--chain", &w.file], &fp, point);
            let ctx = format!("sync killed by {interrupt}, the next sync killed by {fp}");
            if killed {
                w.recover(false);
            }
            assert_eq!(w.check(&ctx), Landed::Target, "{ctx}");
            if !killed {
                counts.insert(point, k - 1);
                break;
            }
            *landed.entry(Landed::Target).or_default() += 1;
            scenarios += 1;
            k += 1;
        }
    }
    println!(
        "kill points: a sync that recovers an interrupted one first: deaths per point {counts:?}"
    );
    assert_eq!(counts["recover.taken_over"], 1);
    println!(
        "kill points: {scenarios} deaths of the real binary, each recovered: {} at the target, {} at the before-image; \
         partial states: 0",
        landed.get(&Landed::Target).unwrap_or(&0),
        landed.get(&Landed::Before).unwrap_or(&0)
    );
}
