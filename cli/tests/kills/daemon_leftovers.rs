//! libvirt's own crash leftovers, end to end on the real daemon.
//!
//! libvirt rewrites a checkpoint's metadata by writing `NAME.xml.new`,
//! syncing it and renaming it over `NAME.xml`; a daemon killed in between
//! leaves the `.xml.new` file, and every later start of the daemon loads it,
//! so a checkpoint deleted since comes back. Here libvirtd is SIGKILLed (by
//! the pid in the pid file of tests/support/libvirt.sh, never by name) at
//! the moment such a file exists, while the real `ckptstore` binary's
//! `sync` deletes and redefines checkpoints; the daemon is restarted (at
//! once, or after the command gave up, and `recover` finishes); then it is
//! restarted twice more, and libvirt must still hold exactly the chain the
//! journal committed, with no leftover file in its folder. A second part
//! kills the daemon under another client's deletes and redefines, and
//! checks that `validate` reports the leftover and the next `sync` repairs
//! it, with a warning.
//!
//! The test holds the daemon exclusively (`testkit::daemon`), so no other
//! test of its binary meets the dead daemon; a guard restarts the daemon whatever happens. The choices come
//! from a printed seed (`CKPTSTORE_LEFTOVER_SEED=N` replays them);
//! `CKPTSTORE_LEFTOVER_ROUNDS` sets the number of syncs (default 8).

use crate::rel;
use testkit::support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use chrono::DateTime;
use ckptstore::testing::render_checkpoint;
use ckptstore::testing::same_content;
use ckptstore::{Backend, Chain, Checkpoint, CheckpointDef, LibvirtBackend};
use support::{TestDomain, SYSTEM_URI};
use testkit::rng::Rng;

const CHECKPOINT_DIR: &str = "/var/lib/libvirt/qemu/checkpoint";
/// Checkpoints of the chains, and how many they share.
const LEN: usize = 24;
const SHARED: usize = 8;

/// Once the test domain is gone (dropped after it), removes what a failed
/// run left in its metadata folder: leftover files, then the folder.
struct Sweep(Option<PathBuf>);

impl Drop for Sweep {
    fn drop(&mut self) {
        if let Some(dir) = &self.0 {
            for f in leftover_files(dir) {
                let _ = std::fs::remove_file(dir.join(f));
            }
            let _ = std::fs::remove_dir(dir);
        }
    }
}

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

fn start_daemon() {
    let out = support::libvirt_sh("start");
    assert!(
        out.status.success(),
        "libvirt.sh start: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Stop the daemon the ordinary way and start it again: it loads its
/// metadata files anew.
fn restart_daemon() {
    let out = support::libvirt_sh("stop");
    assert!(
        out.status.success(),
        "libvirt.sh stop: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    start_daemon();
}

/// A SIGKILL of `pid` (a libvirtd, checked by the caller) made ready in
/// advance: a shell blocked reading its input kills the pid the moment a
/// line arrives, some microseconds rather than the milliseconds of
/// starting `kill` — a metadata write lasts a few milliseconds.
struct Killer {
    pid: u32,
    shell: std::process::Child,
}

impl Killer {
    fn ready(pid: u32) -> Killer {
        let shell = Command::new("sh")
            .args(["-c", &format!("read _ && kill -KILL {pid}")])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("sh");
        Killer { pid, shell }
    }

    /// Kill now and wait until the daemon is gone.
    fn fire(mut self) {
        use std::io::Write;
        let mut stdin = self.shell.stdin.take().unwrap();
        stdin.write_all(b"\n").unwrap();
        drop(stdin);
        let st = self.shell.wait().unwrap();
        assert!(st.success(), "kill -KILL {}", self.pid);
        let t = Instant::now();
        loop {
            let stat =
                std::fs::read_to_string(format!("/proc/{}/stat", self.pid)).unwrap_or_default();
            let dead = stat
                .rsplit_once(')')
                .is_none_or(|(_, rest)| rest.trim_start().starts_with('Z'));
            if dead {
                return;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "libvirtd {} does not die",
                self.pid
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Killer {
    fn drop(&mut self) {
        // Not fired: its input closes, `read` fails, nothing is killed.
        drop(self.shell.stdin.take());
        let _ = self.shell.wait();
    }
}

/// The `.xml.new` files in the domain's metadata folder.
fn leftover_files(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(std::result::Result::ok)
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".xml.new"))
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

/// Poll the folder until a `.xml.new` file shows (libvirt is rewriting a
/// checkpoint's metadata) and SIGKILL the daemon at that moment; with
/// `first_write`, only the first file of a new checkpoint counts (no
/// `NAME.xml` yet). Gives up when `done` says the writer has ended.
/// Returns the leftovers found once the daemon is dead (the rename may
/// still have won the race).
fn kill_while_writing(
    dir: &Path,
    pid: u32,
    first_write: bool,
    done: impl Fn() -> bool,
) -> Option<Vec<String>> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let killer = Killer::ready(pid);
    loop {
        if let Ok(entries) = std::fs::read_dir(dir) {
            let names: Vec<String> = entries
                .filter_map(std::result::Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            let writing = names.iter().any(|n| {
                n.strip_suffix(".new").is_some_and(|xml| {
                    Path::new(xml).extension().is_some_and(|e| e == "xml")
                        && !(first_write && names.iter().any(|m| m == xml))
                })
            });
            if writing {
                killer.fire();
                return Some(leftover_files(dir));
            }
        }
        if done() || Instant::now() > deadline {
            return None;
        }
        // A metadata write lasts milliseconds (it is fsynced): a short
        // pause between looks loses none, and leaves the core to the daemon.
        std::thread::sleep(Duration::from_micros(100));
    }
}

/// The open transaction's steps recorded done, and the op of the next one.
fn progress(db: &Path) -> (u64, Option<String>) {
    let Ok(c) =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
    else {
        return (0, None);
    };
    let open = "SELECT id FROM txns WHERE state IN ('applying', 'rolling_back')";
    let done = c
        .query_row(
            &format!("SELECT count(*) FROM steps WHERE txn_id IN ({open}) AND state = 'done'"),
            [],
            |r| r.get(0),
        )
        .unwrap_or(0);
    let next = c
        .query_row(
            &format!(
                "SELECT op FROM steps WHERE txn_id IN ({open}) AND state = 'pending' ORDER BY phase, seq LIMIT 1"
            ),
            [],
            |r| r.get(0),
        )
        .ok();
    (done, next)
}

/// Chain A: a line of `LEN`. Chain B: A's first `SHARED`, then a branch of
/// its own, so going from one to the other deletes and redefines
/// `LEN - SHARED` checkpoints each.
fn chains(domain: &str) -> (Chain, Chain) {
    let a = rel::chain(domain, LEN, &["vda"]);
    let mut b = a.clone();
    b.checkpoints.truncate(SHARED);
    for i in SHARED..LEN {
        let id = rel::ckpt_id(1000 + i);
        let parent = if i == SHARED {
            rel::ckpt_id(SHARED - 1)
        } else {
            rel::ckpt_id(1000 + i - 1)
        };
        b.checkpoints.push(Checkpoint {
            id,
            parent: Some(parent),
            created: DateTime::from_timestamp(1_750_000_000 + i as i64 * 60, 0).unwrap(),
            description: Some(format!("branch {i}")),
            disks: vec![rel::disk_id(0)],
        });
    }
    (a, b)
}

/// libvirt's checkpoints equal `want`, also after the daemon starts twice
/// more (it loads its files anew: nothing comes back); then no leftover is
/// in the folder.
fn check_clean(
    backend: &LibvirtBackend,
    dir: &Path,
    name: &str,
    want: &[CheckpointDef],
    ctx: &str,
) {
    for restarts in 0..3 {
        if restarts > 0 {
            restart_daemon();
        }
        let now = rel::list(backend, name);
        assert!(
            same_content(&now, want),
            "{ctx}, after {restarts} restart(s): libvirt has {:?}, the committed chain {:?}",
            now.iter().map(|d| &d.name).collect::<Vec<_>>(),
            want.iter().map(|d| &d.name).collect::<Vec<_>>()
        );
    }
    assert_eq!(
        leftover_files(dir),
        Vec::<String>::new(),
        "{ctx}: leftovers remain"
    );
}

/// Warnings about libvirt's leftovers in a sync, import or recover document.
fn leftover_warnings(doc: &serde_json::Value) -> Vec<String> {
    let mut all: Vec<&serde_json::Value> =
        doc["warnings"].as_array().into_iter().flatten().collect();
    for r in doc["recovered"].as_array().into_iter().flatten() {
        all.extend(r["warnings"].as_array().into_iter().flatten());
    }
    all.into_iter()
        .filter_map(|w| w.as_str())
        .filter(|w| w.contains(".xml.new"))
        .map(String::from)
        .collect()
}

#[test]
fn leftovers_of_a_killed_libvirtd_are_repaired_and_nothing_comes_back() {
    let _daemon = testkit::daemon::exclusive();
    let _restart = Restart;
    let rounds: usize = std::env::var("CKPTSTORE_LEFTOVER_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(8);
    let seed = testkit::rng::seed("CKPTSTORE_LEFTOVER_SEED");
    println!(
        "daemon leftovers: seed {seed} (CKPTSTORE_LEFTOVER_SEED={seed} replays), {rounds} syncs"
    );
    let mut rng = Rng::new(seed);
    let conn = support::system();
    // Declared before the domain, so dropped after it.
    let mut sweep = Sweep(None);
    let dom = TestDomain::define(&conn, "leftovers", 1);
    drop(conn);
    let name = dom.name.clone();
    sweep.0 = Some(Path::new(CHECKPOINT_DIR).join(&name));
    let dir = tempfile::Builder::new()
        .prefix("ckptstore-leftovers-")
        .tempdir()
        .unwrap();
    let db = dir.path().join("journal.db");
    let folder: PathBuf = Path::new(CHECKPOINT_DIR).join(&name);
    let (a, b) = chains(&name);
    let files = [
        rel::write_chain(dir.path(), "a.json", &a),
        rel::write_chain(dir.path(), "b.json", &b),
    ];
    let defs = [rel::defs(&a), rel::defs(&b)];
    let backend = LibvirtBackend::connect(SYSTEM_URI).unwrap();
    rel::run(&db, &["sync", "--chain", &files[0]]).expect(0, "the first sync");

    let started = Instant::now();
    let (mut kills, mut produced, mut warned, mut gave_up) = (0, 0, 0, 0);
    let mut during = std::collections::BTreeMap::<String, u32>::new();
    let calls = 2 * (LEN - SHARED) as u64;
    let mut at = 0;
    for r in 0..rounds {
        let to = 1 - at;
        // Every fourth round the daemon stays down longer than the command
        // waits for it: it gives up, and `recover --rollback` deletes what
        // the sync redefined.
        let (down, rollback) = if r % 4 == 3 {
            (Duration::from_millis(6500), true)
        } else {
            (Duration::ZERO, false)
        };
        // Where the kill lands: at the last call (the leaf's redefine: no
        // later redefine of a child rewrites its file, which libvirt does
        // for the old current checkpoint) in half the rounds and in every
        // rollback round, otherwise after a seeded number of calls (half
        // are deletes, half redefines).
        let last = rollback || rng.probability(0.5);
        let k = if last {
            calls - 1
        } else {
            rng.below(calls - 1)
        };
        // Mostly at a new checkpoint's first write: a complete file there
        // is loaded at the restart, so nothing redefines that checkpoint
        // again (a rewrite of an existing checkpoint is repeated by the
        // resumed transaction, which replaces its file).
        let first_write = last || rng.probability(0.75);
        let ctx = format!(
            "round {r} (sync to chain {}{})",
            ["A", "B"][to],
            if rollback {
                ", then recover --rollback"
            } else {
                ""
            }
        );
        let pid = support::daemon_pid().expect("libvirtd runs (tests/support/libvirt.sh start)");
        let running = rel::Running::spawn(rel::command(
            &db,
            &["sync", "--chain", &files[to], "--json", "-v"],
        ));
        while progress(&db).0 < k && !running.ended() {
            std::thread::sleep(Duration::from_millis(1));
        }
        let op = progress(&db).1.unwrap_or_else(|| "-".into());
        let killed = kill_while_writing(&folder, pid, first_write, || running.ended());
        if let Some(left) = &killed {
            kills += 1;
            produced += left.len();
            *during.entry(op.clone()).or_default() += 1;
            std::thread::sleep(down);
            start_daemon();
        }
        let out = running.wait();
        let code = out
            .code()
            .unwrap_or_else(|| panic!("{ctx}: sync died: {out:#?}"));
        assert!(code == 0 || code == 4, "{ctx}: sync exit {code}: {out:#?}");
        let mut warnings = if code == 0 {
            leftover_warnings(&out.json())
        } else {
            gave_up += 1;
            Vec::new()
        };
        // A transaction the sync left open is finished by recover.
        let status = rel::run(&db, &["status", "--domain", &name, "--json"])
            .expect(0, &ctx)
            .json();
        let mut landed = to;
        if !status["incomplete"].as_array().unwrap().is_empty() {
            let mut args = vec!["recover", "--domain", name.as_str(), "--json", "-v"];
            if rollback {
                args.push("--rollback");
                landed = at;
            }
            let rec = rel::run(&db, &args).expect(0, &ctx);
            warnings.extend(leftover_warnings(&rec.json()));
        }
        warned += warnings.len();
        let want = &defs[landed];
        check_clean(&backend, &folder, &name, want, &ctx);
        println!(
            "daemon leftovers: {ctx}: {}; sync exit {code}; {} warning(s) about leftovers: {:?}; \
             landed on chain {}, twice restarted: clean",
            match &killed {
                Some(left) => format!(
                    "libvirtd (pid {pid}) killed while writing {} metadata, after {k} of {calls} calls, next \
                     step a {op}, down {} s; left {left:?}",
                    if first_write { "a new checkpoint's" } else { "any" },
                    down.as_secs_f64()
                ),
                None => "the sync ended before a kill".into(),
            },
            warnings.len(),
            warnings
                .iter()
                .map(|w| w.rsplit_once(": ").map_or(w.as_str(), |(_, done)| done))
                .collect::<Vec<_>>(),
            ["A", "B"][landed]
        );
        at = landed;
    }
    assert!(
        kills * 4 >= rounds * 3,
        "the daemon must die while the syncs run: {kills} kills in {rounds} rounds"
    );
    assert!(
        produced > 0,
        "no kill left a leftover in {kills} kills: cannot reproduce libvirt's leftovers here"
    );

    // Part 2: the daemon dies under another client, which gives up at its
    // first error (the library, deleting chain A's branch and redefining
    // chain B's, without ckptstore); validate reports what the kill left,
    // the next sync repairs it.
    let mut attempts = 0;
    let left = loop {
        attempts += 1;
        assert!(
            attempts <= 10,
            "10 kills under the library left no leftover"
        );
        rel::reset(&backend, &name, &defs[0]);
        let pid = support::daemon_pid().unwrap();
        let writer = std::thread::spawn({
            let (name, a, b) = (name.clone(), defs[0].clone(), defs[1].clone());
            move || {
                let backend = LibvirtBackend::new(SYSTEM_URI);
                let deletes = a[SHARED..]
                    .iter()
                    .rev()
                    .map(|d| backend.delete(&name, &d.name));
                let redefines = b[SHARED..]
                    .iter()
                    .map(|d| backend.redefine(&name, &render_checkpoint(d), false));
                deletes.chain(redefines).find_map(Result::err)
            }
        });
        let killed = kill_while_writing(&folder, pid, true, || writer.is_finished());
        if killed.is_some() {
            start_daemon();
        }
        let error = writer.join().expect("the library's calls");
        let left = leftover_files(&folder);
        println!(
            "daemon leftovers: part 2, attempt {attempts}: {}; the library stopped at {error:?}; left: {left:?}",
            match &killed {
                Some(at_kill) => format!("libvirtd (pid {pid}) killed while writing a new checkpoint's metadata, leaving {at_kill:?}"),
                None => "the library ended before a kill".into(),
            }
        );
        if killed.is_some() && !left.is_empty() {
            break (left, 1);
        }
    };
    let (left, chain) = left;
    // Both restarts of the daemon load what the kill left; validate says so.
    let report = rel::run(&db, &["validate", "--domain", &name, "--json"]).json();
    let findings: Vec<(String, String)> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["kind"] == "libvirt_leftover")
        .map(|f| {
            (
                f["image"].as_str().unwrap().to_string(),
                f["detail"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let mut paths: Vec<String> = findings.iter().map(|(p, _)| p.clone()).collect();
    paths.sort();
    let expected: Vec<String> = left
        .iter()
        .map(|f| folder.join(f).display().to_string())
        .collect();
    assert_eq!(paths, expected, "validate: {report:#}");
    assert_eq!(report["ok"], false);
    let out = rel::run(&db, &["sync", "--chain", &files[chain], "--json"])
        .expect(0, "the repairing sync");
    let warnings = leftover_warnings(&out.json());
    assert_eq!(warnings.len(), left.len(), "{warnings:#?}");
    check_clean(&backend, &folder, &name, &defs[chain], "part 2");
    println!(
        "daemon leftovers: part 2: {attempts} kill(s) under the library left {left:?}; validate reported {} \
         libvirt_leftover finding(s): {:?}; the next sync repaired them: {warnings:?}",
        findings.len(),
        findings.iter().map(|(_, d)| d).collect::<Vec<_>>()
    );
    println!(
        "daemon leftovers: {rounds} syncs in {:.0} s (seed {seed}): {kills} kills of libvirtd while it wrote \
         metadata ({during:?} as the next step), {produced} leftover file(s) there once it was dead; {gave_up} \
         sync(s) gave up and recover finished them; {warned} leftover(s) repaired by ckptstore with a warning (the \
         others were replaced by libvirt's own rewrites during the resumed transaction); after every round and \
         two restarts libvirt held exactly the committed chain and no leftover",
        started.elapsed().as_secs_f64()
    );
    drop(backend);
}
