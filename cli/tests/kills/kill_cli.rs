//! SIGKILL of the real `ckptstore` binary against the real daemon.
//!
//! Each round puts a shut-off domain's checkpoints into a pre-state (empty,
//! prefix, conflicting or extra; through the library), spawns
//! `ckptstore sync` of a 100-checkpoint chain, and SIGKILLs it (by its pid)
//! after a random delay. Then `ckptstore recover` (resume or `--rollback`),
//! itself SIGKILLed at random in part of the rounds and run again, must
//! leave libvirt's checkpoints equal to the full target or the exact
//! before-image (by content) — the one the policy asks for —, `status` with
//! nothing incomplete, the journal's last transaction agreeing with libvirt,
//! and `PRAGMA integrity_check` = ok.
//!
//! The delays come from a printed seed; `CKPTSTORE_KILL_SEED=N` replays the
//! same choices (the moment a delay hits depends on the machine's speed).
//! Rounds go on until `CKPTSTORE_KILL_ROUNDS` syncs (default 52) were
//! really killed (a sync that ends before its kill is a round too).

use crate::rel;
use testkit::support;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ckptstore::testing::plan;
use ckptstore::{CheckpointDef, LibvirtBackend};
use rel::{Landed, Pre, Running, PRES};
use support::{TestDomain, SYSTEM_URI};
use testkit::rng::Rng;

const CHECKPOINTS: usize = 100;
/// The budget of one libvirt call when guessing how long a run takes.
const CALL_MS: u64 = 25;

struct Setup {
    pre: Pre,
    dom: TestDomain,
    file: String,
    target: Vec<CheckpointDef>,
    before: Vec<CheckpointDef>,
    /// Calls of a whole sync from the pre-state.
    calls: u64,
}

#[derive(Default)]
struct Counts {
    rounds: u32,
    sync_killed: u32,
    sync_finished_first: u32,
    killed_before_intent: u32,
    killed_mid_txn: u32,
    killed_after_commit: u32,
    recover_killed: u32,
    recover_finished_first: u32,
    outcomes: BTreeMap<String, u32>,
    landed: BTreeMap<Landed, u32>,
    by_pre: BTreeMap<String, u32>,
}

#[test]
fn sigkill_sync_and_recover_on_qemu() {
    let _daemon = testkit::daemon::shared();
    let kills: u32 = std::env::var("CKPTSTORE_KILL_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(52);
    let seed = testkit::rng::seed("CKPTSTORE_KILL_SEED");
    println!(
        "kill rounds: seed {seed} (CKPTSTORE_KILL_SEED={seed} replays), until {kills} syncs are killed, \
         {CHECKPOINTS}-checkpoint chain"
    );
    let conn = support::system();
    let dir = tempfile::Builder::new()
        .prefix("ckptstore-kill-")
        .tempdir()
        .unwrap();
    // One journal for every domain, as one agent on a host has.
    let db = dir.path().join("journal.db");
    let backend = LibvirtBackend::connect(SYSTEM_URI).unwrap();
    let setups: Vec<Setup> = PRES
        .iter()
        .map(|&pre| {
            let dom = TestDomain::define(&conn, &format!("kill-{pre:?}").to_lowercase(), 1);
            let chain = rel::chain(&dom.name, CHECKPOINTS, &["vda"]);
            let file = rel::write_chain(dir.path(), &format!("{}.json", dom.name), &chain);
            let target = rel::defs(&chain);
            let before = rel::pre_state(pre, &target);
            let calls = plan(&before, &target).steps.len() as u64;
            rel::reset(&backend, &dom.name, &before);
            Setup {
                pre,
                dom,
                file,
                target,
                before,
                calls,
            }
        })
        .collect();

    let counts = Mutex::new(Counts::default());
    let started = Instant::now();
    // Two workers (the machine has two cores; libvirtd does the work),
    // each with its own domains: rounds r with r % 2 == w, pre-state r % 4,
    // until enough syncs were killed.
    std::thread::scope(|s| {
        for w in 0..2usize {
            let (setups, counts, db) = (&setups, &counts, &db);
            s.spawn(move || {
                let backend = LibvirtBackend::connect(SYSTEM_URI).unwrap();
                let mut rng = Rng::new(seed ^ (0x5eed_0000 + w as u64));
                for r in (w..).step_by(2) {
                    if counts.lock().unwrap().sync_killed >= kills || r >= 4 * kills as usize {
                        break;
                    }
                    round(r, &setups[r % 4], &backend, db, &mut rng, counts);
                }
            });
        }
    });
    let c = counts.into_inner().unwrap();
    assert!(c.sync_killed >= kills, "{} syncs killed", c.sync_killed);
    println!(
        "kill rounds: {} rounds in {:.0} s (seed {seed}): sync SIGKILLed {} times ({} before the intent was committed, \
         {} mid-transaction, {} after the commit), {} syncs finished before their kill; recover SIGKILLed {} times \
         ({} finished first); libvirt ended at the target {} times and at the before-image {} times; partial states: 0",
        c.rounds,
        started.elapsed().as_secs_f64(),
        c.sync_killed,
        c.killed_before_intent,
        c.killed_mid_txn,
        c.killed_after_commit,
        c.sync_finished_first,
        c.recover_killed,
        c.recover_finished_first,
        c.landed.get(&Landed::Target).unwrap_or(&0),
        c.landed.get(&Landed::Before).unwrap_or(&0),
    );
    println!("kill rounds by pre-state: {:?}", c.by_pre);
    for (what, n) in &c.outcomes {
        println!("kill rounds: {n:>3} × {what}");
    }
    assert!(
        c.sync_killed * 10 >= c.rounds * 8,
        "most syncs must really be killed"
    );
    assert!(
        c.killed_mid_txn * 2 >= c.rounds,
        "most kills must hit an open transaction"
    );
    assert!(c.recover_killed > 0, "some recoveries must be killed");
}

fn round(
    r: usize,
    s: &Setup,
    backend: &LibvirtBackend,
    db: &Path,
    rng: &mut Rng,
    counts: &Mutex<Counts>,
) {
    let name = s.dom.name.as_str();
    rel::reset(backend, name, &s.before);
    let prev = rel::last_txn(db, name).map(|t| t["txn"].clone());
    let rollback = rng.probability(0.5);
    let kill_recover = rng.probability(0.4);
    // Kill early: now and then while the process starts and plans, mostly
    // somewhere in the first 60% of its calls.
    let window = 80 + s.calls * CALL_MS;
    let delay = if rng.probability(0.15) {
        rng.millis(0, 80)
    } else {
        rng.millis(80, window * 6 / 10)
    };
    let recover_at = rng.next_u64();

    let (out, killed) =
        Running::spawn(rel::command(db, &["sync", "--chain", &s.file])).kill_at(delay);
    let ctx = format!(
        "round {r} ({:?}, sync killed at {} ms)",
        s.pre,
        delay.as_millis()
    );
    if !killed {
        assert_eq!(
            out.code(),
            Some(0),
            "{ctx}: sync that was not killed: {out:#?}"
        );
    }
    let status = rel::run(db, &["status", "--domain", name, "--json"])
        .expect(0, &ctx)
        .json();
    let open = status["incomplete"].as_array().unwrap().first().cloned();
    let mut line = format!(
        "round {r:>2} {:<11} sync {} at {:>4} ms",
        format!("{:?}", s.pre),
        if killed { "killed" } else { "ended " },
        delay.as_millis()
    );
    let (landed, what) = match open {
        Some(t) => {
            assert_eq!(
                t["owner_alive"], false,
                "{ctx}: the killed owner must be seen dead"
            );
            let (done, total) = (t["done"].as_u64().unwrap(), t["total"].as_u64().unwrap());
            line += &format!(" ({done}/{total} steps recorded)");
            let mut args = vec!["recover", "--domain", name];
            if rollback {
                args.push("--rollback");
            }
            let mut recover_killed = None;
            if kill_recover {
                // A rollback mostly deletes (~2 ms a call); a resume redefines.
                let window = if rollback {
                    40 + (done + 1) * 10
                } else {
                    60 + (total - done) * CALL_MS * 4 / 5
                };
                let at = Duration::from_millis(recover_at % window);
                let (o, k) = Running::spawn(rel::command(db, &args)).kill_at(at);
                if !k {
                    assert_eq!(
                        o.code(),
                        Some(0),
                        "{ctx}: recover that was not killed: {o:#?}"
                    );
                }
                recover_killed = Some((k, at));
            }
            let o = rel::run(db, &[&args[..], &["--json"]].concat()).expect(0, &ctx);
            let left_open = o.json()["left_open"].clone();
            assert_eq!(
                left_open,
                serde_json::json!([]),
                "{ctx}: recover left a transaction open"
            );
            let landed = rel::check_invariant(backend, db, name, &s.target, &s.before, &ctx);
            let want = if rollback {
                Landed::Before
            } else {
                Landed::Target
            };
            assert_eq!(
                landed,
                want,
                "{ctx}: recover {} must end at {want:?}",
                if rollback { "--rollback" } else { "" }
            );
            let policy = if rollback { "rollback" } else { "resume" };
            let mut c = counts.lock().unwrap();
            c.killed_mid_txn += 1;
            let rk = match recover_killed {
                Some((true, at)) => {
                    c.recover_killed += 1;
                    line += &format!(", recover --{policy} killed at {} ms", at.as_millis());
                    ", recover killed then run again"
                }
                Some((false, _)) => {
                    c.recover_finished_first += 1;
                    line += &format!(", recover --{policy} ended before its kill");
                    ""
                }
                None => {
                    line += &format!(", recover --{policy}");
                    ""
                }
            };
            (
                landed,
                format!("sync killed mid-transaction, recover {policy}{rk} → {landed:?}"),
            )
        }
        None => {
            let landed = rel::check_invariant(backend, db, name, &s.target, &s.before, &ctx);
            let mut c = counts.lock().unwrap();
            let what = match (killed, landed) {
                (false, Landed::Target) => {
                    c.sync_finished_first += 1;
                    "sync ended before its kill → Target"
                }
                (true, Landed::Before) => {
                    c.killed_before_intent += 1;
                    "sync killed before its intent was committed → Before"
                }
                (true, Landed::Target) => {
                    c.killed_after_commit += 1;
                    "sync killed after its commit → Target"
                }
                (false, Landed::Before) => {
                    panic!("{ctx}: a sync that ended left libvirt at the before-image")
                }
            };
            (landed, what.to_string())
        }
    };
    // The journal agrees with libvirt: a new transaction ended committed
    // (target) or rolled back (before-image); no new one means the process
    // died before its intent was committed.
    match rel::last_txn(db, name) {
        Some(t) if Some(&t["txn"]) != prev.as_ref() => {
            let want = if landed == Landed::Target {
                "committed"
            } else {
                "rolled_back"
            };
            assert_eq!(
                t["state"], want,
                "{ctx}: the journal's last transaction: {t}"
            );
        }
        _ => assert_eq!(
            landed,
            Landed::Before,
            "{ctx}: libvirt changed without a transaction"
        ),
    }
    line += &format!(" → {landed:?}");
    println!("{line}");
    let mut c = counts.lock().unwrap();
    c.rounds += 1;
    if killed {
        c.sync_killed += 1;
    }
    *c.landed.entry(landed).or_default() += 1;
    *c.outcomes.entry(what).or_default() += 1;
    *c.by_pre.entry(format!("{:?}", s.pre)).or_default() += 1;
}
