//! The daemon dies: libvirtd is SIGKILLed (by the pid in the pid file of
//! tests/support/libvirt.sh, never by name) at a random moment while the
//! real `ckptstore` binary runs a `sync` or a `recover`, and restarted with
//! the same script. The command either waits for the daemon, reconciles by
//! listing what libvirt has (a call cut off by the kill has an unknown
//! outcome and is never assumed done or undone) and finishes, or gives up
//! with exit 4 and leaves its transaction open; then `recover` must reach
//! the invariant: libvirt equals the target or the exact before-image (the
//! one the policy asks for), nothing incomplete, `PRAGMA integrity_check` =
//! ok.
//!
//! The test holds the daemon exclusively (`testkit::daemon`), so no other
//! test of its binary meets the dead daemon; a guard restarts the daemon whatever happens. The moments come
//! from a printed seed (`CKPTSTORE_DAEMON_SEED=N` replays the choices);
//! `CKPTSTORE_DAEMON_ROUNDS` sets the number of kills (default 8, half
//! during `sync`, half during `recover`; in a quarter of them the daemon
//! stays down longer than the command waits for it).

use crate::rel;
use testkit::support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use ckptstore::testing::plan;
use ckptstore::LibvirtBackend;
use rel::{Landed, Pre, Running};
use support::{TestDomain, SYSTEM_URI};
use testkit::rng::Rng;

const CHECKPOINTS: usize = 60;
/// Restarts the daemon when dropped, if it is not running.
struct Restart;

impl Drop for Restart {
    fn drop(&mut self) {
        if support::daemon_pid().is_none() {
            let out = support::libvirt_sh("start");
            if !out.status.success() {
                eprintln!(
                    "cannot restart libvirtd: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
}

/// SIGKILL the daemon by its pid and wait until it is gone.
fn kill_daemon() -> u32 {
    let pid = support::daemon_pid().expect("libvirtd runs (tests/support/libvirt.sh start)");
    let st = Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success(), "kill -KILL {pid}");
    let t = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "libvirtd {pid} does not die"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    pid
}

/// Start the daemon again; returns how long it took to answer.
fn start_daemon() -> Duration {
    let t = Instant::now();
    let out = support::libvirt_sh("start");
    assert!(
        out.status.success(),
        "libvirt.sh start: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    t.elapsed()
}

/// Wait until the open transaction of the journal has `k` steps of
/// `phase` recorded done (read from the journal, which readers never
/// block); false when the command ended first.
fn wait_steps(db: &Path, running: &Running, phase: &str, k: u64) -> bool {
    let t = Instant::now();
    let mut conn = None;
    loop {
        if conn.is_none() && db.exists() {
            conn = rusqlite::Connection::open_with_flags(
                db,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )
            .ok();
        }
        let done: u64 = conn.as_ref().map_or(0, |c| {
            c.query_row(
                "SELECT count(*) FROM steps s JOIN txns t ON s.txn_id = t.id \
                 WHERE t.state IN ('applying', 'rolling_back') AND s.phase = ?1 AND s.state = 'done'",
                [phase],
                |r| r.get(0),
            )
            .unwrap_or(0)
        });
        if done >= k {
            return true;
        }
        if running.ended() {
            return false;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no progress to {k} {phase} steps"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Kill the daemon once the command has recorded `k` steps of `phase`;
/// returns its pid and whether the command still ran when it died.
fn kill_daemon_at(db: &Path, running: &Running, phase: &str, k: u64) -> (u32, bool) {
    wait_steps(db, running, phase, k);
    let mid = !running.ended();
    (kill_daemon(), mid)
}

/// Connections the command saw break in the middle of a transaction, so
/// that a call's outcome was unknown (its `-v` log warns at each attempt to
/// reconnect; the first attempt counts).
fn unknown_outcomes(out: &rel::Out) -> usize {
    out.stderr
        .lines()
        .filter(|l| {
            l.contains("outcome is unknown") && l.split_whitespace().any(|w| w == "attempt=1")
        })
        .count()
}

#[test]
fn libvirtd_killed_during_sync_and_recover_on_qemu() {
    let _daemon = testkit::daemon::exclusive();
    let _restart = Restart;
    let rounds: usize = std::env::var("CKPTSTORE_DAEMON_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let seed = testkit::rng::seed("CKPTSTORE_DAEMON_SEED");
    println!("daemon kills: seed {seed} (CKPTSTORE_DAEMON_SEED={seed} replays), {rounds} kills of libvirtd");
    let mut rng = Rng::new(seed);
    let conn = support::system();
    let dom = TestDomain::define(&conn, "daemon-kill", 1);
    drop(conn);
    let name = dom.name.clone();
    let dir = tempfile::Builder::new()
        .prefix("ckptstore-daemon-")
        .tempdir()
        .unwrap();
    let db = dir.path().join("journal.db");
    let chain = rel::chain(&name, CHECKPOINTS, &["vda"]);
    let file = rel::write_chain(dir.path(), "chain.json", &chain);
    let target = rel::defs(&chain);
    let backend = LibvirtBackend::connect(SYSTEM_URI).unwrap();

    let mut outcomes: BTreeMap<String, u32> = BTreeMap::new();
    let mut unknown = 0;
    let mut mid_command = 0u32;
    let mut restarts = Vec::new();
    let started = Instant::now();
    for r in 0..rounds {
        let during_sync = r % 2 == 0;
        // In a quarter of the rounds the daemon stays down longer than the
        // command waits for it (10 attempts, 500 ms apart): it gives up.
        let down = if (r / 2) % 4 == 2 {
            Duration::from_millis(6500)
        } else {
            Duration::ZERO
        };
        let pre = if r % 4 < 2 { Pre::Empty } else { Pre::Prefix };
        let before = rel::pre_state(pre, &target);
        rel::reset(&backend, &name, &before);
        let prev = rel::last_txn(&db, &name).map(|t| t["txn"].clone());
        let calls = plan(&before, &target).steps.len() as u64;
        // Recover meets the dying daemon resuming and rolling back in turn.
        let rollback = if during_sync {
            rng.probability(0.5)
        } else {
            r % 4 == 3
        };
        let policy = if rollback { "rollback" } else { "resume" };
        let mut recover_args = vec!["recover", "--domain", name.as_str(), "-v"];
        if rollback {
            recover_args.push("--rollback");
        }
        let ctx = format!(
            "round {r} ({pre:?}, libvirtd killed during {})",
            if during_sync { "sync" } else { "recover" }
        );
        let line;
        let first_exit;
        if during_sync {
            // The daemon dies once the sync has recorded k of its steps.
            let k = 1 + rng.below(calls * 7 / 10);
            let running = Running::spawn(rel::command(&db, &["sync", "--chain", &file, "-v"]));
            let (pid, mid) = kill_daemon_at(&db, &running, "apply", k);
            std::thread::sleep(down);
            restarts.push(start_daemon());
            let out = running.wait();
            unknown += unknown_outcomes(&out);
            let code = out
                .code()
                .unwrap_or_else(|| panic!("{ctx}: sync died: {out:#?}"));
            assert!(code == 0 || code == 4, "{ctx}: sync exit {code}: {out:#?}");
            if code == 4 {
                assert_eq!(
                    out.stderr
                        .lines()
                        .last()
                        .map(|l| l.starts_with("ckptstore: ")),
                    Some(true),
                    "{out:#?}"
                );
            }
            mid_command += u32::from(mid);
            first_exit = Some(code);
            line = format!(
                "round {r} {pre:?}: libvirtd (pid {pid}) killed after {k} of {calls} steps of sync{}, down {} s; \
                 sync exit {code}",
                if mid { "" } else { " (had ended)" },
                down.as_secs_f64()
            );
        } else {
            // An interrupted sync first (SIGKILL once it has recorded k1
            // steps), then the daemon dies after k2 steps of recover.
            let k1 = calls / 4 + rng.below(calls / 4);
            let sync = Running::spawn(rel::command(&db, &["sync", "--chain", &file]));
            assert!(
                wait_steps(&db, &sync, "apply", k1),
                "{ctx}: the sync ended before {k1} steps"
            );
            let (_, killed) = sync.kill_at(Duration::ZERO);
            assert!(killed, "{ctx}: the sync ended before its kill");
            let (phase, k2) = if rollback {
                ("rollback", 1 + rng.below(k1 / 2))
            } else {
                ("apply", k1 + 1 + rng.below(calls - k1 - 1))
            };
            let running = Running::spawn(rel::command(&db, &recover_args));
            let (pid, mid) = kill_daemon_at(&db, &running, phase, k2);
            std::thread::sleep(down);
            restarts.push(start_daemon());
            let out = running.wait();
            unknown += unknown_outcomes(&out);
            let code = out
                .code()
                .unwrap_or_else(|| panic!("{ctx}: recover died: {out:#?}"));
            assert!(
                code == 0 || code == 4,
                "{ctx}: recover exit {code}: {out:#?}"
            );
            mid_command += u32::from(mid);
            first_exit = Some(code);
            line = format!(
                "round {r} {pre:?}: sync SIGKILLed after {k1} of {calls} steps, libvirtd (pid {pid}) killed after {k2} \
                 {phase} steps of recover --{policy}{}, down {} s; recover exit {code}",
                if mid { "" } else { " (had ended)" },
                down.as_secs_f64()
            );
        }
        // Whatever is still open is recovered now that the daemon is back.
        let open = !rel::run(&db, &["status", "--domain", &name, "--json"])
            .expect(0, &ctx)
            .json()["incomplete"]
            .as_array()
            .unwrap()
            .is_empty();
        if open {
            let out = rel::run(&db, &recover_args).expect(0, &ctx);
            unknown += unknown_outcomes(&out);
        }
        let landed = rel::check_invariant(&backend, &db, &name, &target, &before, &ctx);
        let by_policy = if rollback {
            Landed::Before
        } else {
            Landed::Target
        };
        let want = match (during_sync, open, first_exit) {
            (false, _, _) | (true, true, _) => by_policy,
            (true, false, Some(0)) => Landed::Target,
            // The sync found no daemon before its intent was committed.
            (true, false, _) => Landed::Before,
        };
        assert_eq!(landed, want, "{ctx}");
        // The journal agrees with libvirt.
        match rel::last_txn(&db, &name) {
            Some(t) if Some(&t["txn"]) != prev.as_ref() => {
                let state = if landed == Landed::Target {
                    "committed"
                } else {
                    "rolled_back"
                };
                assert_eq!(
                    t["state"], state,
                    "{ctx}: the journal's last transaction: {t}"
                );
            }
            _ => assert_eq!(
                landed,
                Landed::Before,
                "{ctx}: libvirt changed without a transaction"
            ),
        }
        println!(
            "daemon kills: {line}; {}recovered → {landed:?}",
            if open { "left open, " } else { "" }
        );
        *outcomes
            .entry(format!(
                "during {}{}, command exit {}, {} → {landed:?}",
                if during_sync { "sync" } else { "recover" },
                if down.is_zero() {
                    ""
                } else {
                    " (daemon down 6.5 s)"
                },
                first_exit.unwrap_or(-1),
                if open {
                    format!("recover --{policy}")
                } else {
                    "no recover needed".into()
                }
            ))
            .or_default() += 1;
    }
    let max = restarts.iter().max().copied().unwrap_or_default();
    assert!(
        mid_command as usize * 4 >= rounds * 3,
        "the daemon must die while the command runs"
    );
    println!(
        "daemon kills: {rounds} kills of libvirtd in {:.0} s (seed {seed}), {mid_command} while the command ran; restarts took up to {:.1} s; {unknown} \
         connection losses inside a transaction (a call's outcome unknown), all reconciled by listing; partial \
         states: 0",
        started.elapsed().as_secs_f64(),
        max.as_secs_f64()
    );
    for (what, n) in &outcomes {
        println!("daemon kills: {n} × {what}");
    }
    drop(backend);
}
