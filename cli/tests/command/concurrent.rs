//! Concurrent agents on the real daemon, through the real binary.
//!
//! - Two processes `sync` the same domain at once: exactly one proceeds, the
//!   other exits 3 (busy) while the first still runs, nothing is lost.
//! - Eight threads of one process (the library, one shared `Store`) and
//!   four processes (the CLI) sync sixteen domains at once on one journal
//!   that does not exist yet: every transaction commits, no `SQLITE_BUSY`
//!   escapes as an error, the journal checks `ok`.
//! - Stale owners through `status`: a dead pid, a pid reused in this boot
//!   (other start time) and a pid of another boot (other boot id) show
//!   `owner_alive: false` and are recovered; a live owner shows `true` and
//!   is left alone until it dies.

use crate::rel;
use testkit::support;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use ckptstore::testing::Hook;
use ckptstore::Owner;
use ckptstore::{LibvirtBackend, Outcome, Store, StoreOptions};
use rel::Running;
use support::{TestDomain, SYSTEM_URI};

#[test]
fn two_processes_sync_one_domain_exactly_one_proceeds_on_qemu() {
    let conn = support::system();
    let dom = TestDomain::define(&conn, "race", 1);
    let dir = tempfile::Builder::new()
        .prefix("ckptstore-race-")
        .tempdir()
        .unwrap();
    let db = dir.path().join("journal.db");
    let chain = rel::chain(&dom.name, 100, &["vda"]);
    let file = rel::write_chain(dir.path(), "chain.json", &chain);
    let target = rel::defs(&chain);
    let backend = LibvirtBackend::connect(SYSTEM_URI).unwrap();
    let races = 4;
    let mut loser_ms = Vec::new();
    for race in 0..races {
        rel::reset(&backend, &dom.name, &[]);
        let history_before = history_len(&db, &dom.name);
        let staggered = race % 2 == 1;
        let json = race >= 2;
        let args: Vec<&str> = if json {
            vec!["sync", "--chain", &file, "--json"]
        } else {
            vec!["sync", "--chain", &file]
        };
        let mut a = Running::spawn(rel::command(&db, &args));
        if staggered {
            // The second starts once the first has committed its intent.
            let t = Instant::now();
            while status_incomplete(&db, &dom.name) == 0 {
                assert!(
                    t.elapsed() < Duration::from_secs(30),
                    "the first sync never began"
                );
                assert!(
                    a.child.try_wait().unwrap().is_none(),
                    "the first sync ended before it was seen"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let mut b = Running::spawn(rel::command(&db, &args));
        // The first to end must be the loser, exit 3, while the other runs.
        let (loser, winner) = loop {
            if b.child.try_wait().unwrap().is_some() {
                break (b, a);
            }
            if a.child.try_wait().unwrap().is_some() {
                break (a, b);
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let mut winner = winner;
        assert!(
            winner.child.try_wait().unwrap().is_none(),
            "race {race}: the loser did not exit at once"
        );
        let lost = loser.wait();
        assert_eq!(lost.code(), Some(3), "race {race}: the loser: {lost:#?}");
        assert_eq!(lost.stderr.lines().count(), 1, "{lost:#?}");
        assert!(
            lost.stderr.starts_with("ckptstore: domain ") && lost.stderr.contains("is busy"),
            "{lost:#?}"
        );
        if json {
            assert_eq!(lost.json()["error"]["exit_code"], 3);
        }
        loser_ms.push(lost.elapsed.as_millis());
        let won = winner.wait();
        assert_eq!(won.code(), Some(0), "race {race}: the winner: {won:#?}");
        if json {
            let j = won.json();
            assert_eq!(
                (j["outcome"].as_str(), j["libvirt_calls"].as_u64()),
                (Some("committed"), Some(100))
            );
        }
        // Nothing lost: libvirt has the chain, the journal one more
        // transaction (committed), the loser left nothing behind.
        let landed = rel::check_invariant(
            &backend,
            &db,
            &dom.name,
            &target,
            &[],
            &format!("race {race}"),
        );
        assert_eq!(landed, rel::Landed::Target);
        assert_eq!(
            history_len(&db, &dom.name),
            history_before + 1,
            "race {race}: one transaction per race"
        );
        assert_eq!(rel::last_txn(&db, &dom.name).unwrap()["state"], "committed");
        println!(
            "concurrent: race {race} ({}): one sync committed 100 checkpoints in {} ms, the other exited 3 after {} ms",
            if staggered { "second started after the first's intent" } else { "started together" },
            won.elapsed.as_millis(),
            lost.elapsed.as_millis()
        );
    }
    println!("concurrent: {races} races of two processes on one domain: {races} × exactly one proceeded, the other busy (exit 3) after {loser_ms:?} ms");
}

fn history_len(db: &Path, domain: &str) -> usize {
    if !db.exists() {
        return 0;
    }
    let h = rel::run(
        db,
        &["history", "--domain", domain, "--limit", "1000", "--json"],
    )
    .expect(0, "history")
    .json();
    h["transactions"].as_array().unwrap().len()
}

fn status_incomplete(db: &Path, domain: &str) -> usize {
    if !db.exists() {
        return 0;
    }
    let out = rel::run(db, &["status", "--domain", domain, "--json"]);
    if out.code() != Some(0) {
        // The journal may still be in creation.
        return 0;
    }
    out.json()["incomplete"].as_array().unwrap().len()
}

#[test]
fn eight_threads_and_four_processes_on_one_journal_on_qemu() {
    let conn = support::system();
    let lib_doms: Vec<TestDomain> = (0..8)
        .map(|i| TestDomain::define(&conn, &format!("lib{i}"), 1))
        .collect();
    let cli_doms: Vec<TestDomain> = (0..8)
        .map(|i| TestDomain::define(&conn, &format!("cli{i}"), 1))
        .collect();
    let dir = tempfile::Builder::new()
        .prefix("ckptstore-many-")
        .tempdir()
        .unwrap();
    // The journal does not exist yet: five processes create it at once.
    let db = dir.path().join("journal.db");
    let backend = LibvirtBackend::connect(SYSTEM_URI).unwrap();
    let sizes = [8usize, 16, 24];
    let store: Mutex<Option<Store>> = Mutex::new(None);
    let mut committed = 0;
    let started = Instant::now();
    for (round, &n) in sizes.iter().enumerate() {
        let files: Vec<String> = cli_doms
            .iter()
            .map(|d| {
                rel::write_chain(
                    dir.path(),
                    &format!("{}-{n}.json", d.name),
                    &rel::chain(&d.name, n, &["vda"]),
                )
            })
            .collect();
        let results: Mutex<Vec<String>> = Mutex::new(Vec::new());
        let t = Instant::now();
        std::thread::scope(|s| {
            // Four processes, two domains each, one after the other.
            for p in 0..4 {
                let (files, db, results) = (&files, &db, &results);
                s.spawn(move || {
                    for f in &files[2 * p..2 * p + 2] {
                        let out = rel::run(db, &["sync", "--chain", f, "--json"]);
                        assert_eq!(out.code(), Some(0), "round {round}: {out:#?}");
                        assert!(out.stderr.is_empty(), "round {round}: {out:#?}");
                        assert_eq!(out.json()["outcome"], "committed", "{out:#?}");
                        results.lock().unwrap().push(format!("process {p}"));
                    }
                });
            }
            // One store shared by eight threads, opened while the
            // processes start.
            let mut guard = store.lock().unwrap();
            if guard.is_none() {
                *guard = Some(
                    Store::open_with(
                        &db,
                        StoreOptions {
                            // Blank images: the metadata loop only.
                            bitmaps: ckptstore::BitmapPolicy::Ignore,
                            ..StoreOptions::default()
                        },
                    )
                    .expect("open the journal while four processes create it"),
                );
            }
            let st = guard.as_ref().unwrap();
            std::thread::scope(|s2| {
                for d in &lib_doms {
                    let (backend, results) = (&backend, &results);
                    s2.spawn(move || {
                        let report = st
                            .sync(backend, rel::chain(&d.name, n, &["vda"]))
                            .unwrap_or_else(|e| {
                                panic!(
                                    "round {round}, thread for {}: {e} (journal error: {})",
                                    d.name,
                                    e.is_journal()
                                )
                            });
                        assert_eq!(report.outcome, Outcome::Committed);
                        assert_eq!(report.libvirt_calls, 8);
                        results.lock().unwrap().push("thread".into());
                    });
                }
            });
        });
        let results = results.into_inner().unwrap();
        assert_eq!(results.len(), 16);
        committed += results.len();
        assert_eq!(rel::integrity(&db), "ok");
        println!(
            "concurrent: round {round}: 8 threads + 4 processes committed 16 transactions ({n} checkpoints each, 8 new) \
             in {} ms",
            t.elapsed().as_millis()
        );
    }
    let guard = store.lock().unwrap();
    let st = guard.as_ref().unwrap();
    let status = st.status(None).unwrap();
    assert!(status.incomplete.is_empty());
    assert_eq!(status.domains.len(), 16);
    for d in lib_doms.iter().chain(&cli_doms) {
        let target = rel::defs(&rel::chain(&d.name, sizes[2], &["vda"]));
        assert!(
            ckptstore::testing::same_content(&rel::list(&backend, &d.name), &target),
            "{}",
            d.name
        );
        let h = st.history(&d.name, 10).unwrap().transactions;
        assert_eq!(
            h.len(),
            sizes.len(),
            "{}: one transaction per round",
            d.name
        );
        assert!(
            h.iter()
                .all(|t| t.state == ckptstore::testing::TxnState::Committed),
            "{}",
            d.name
        );
        let c = st.committed(&d.name).unwrap().unwrap();
        assert_eq!(c.defs.len(), sizes[2]);
    }
    assert_eq!(st.journal().integrity_check().unwrap(), "ok");
    println!(
        "concurrent: {committed} of {committed} transactions committed by 8 threads and 4 processes on one journal in \
         {:.1} s; errors (SQLITE_BUSY or other): 0; integrity_check ok",
        started.elapsed().as_secs_f64()
    );
}

/// The payload of a crash injected into a store of this test process.
struct Crash;

/// A store on `db` acting as `owner` that dies (unwinds) right after its
/// first intent is committed, leaving the transaction open.
fn leave_open(db: &Path, owner: Owner, backend: &LibvirtBackend, dom: &TestDomain) {
    static QUIET: Once = Once::new();
    QUIET.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info.payload().downcast_ref::<Crash>().is_none() {
                default(info);
            }
        }));
    });
    let hook: Hook = Arc::new(|point| {
        if point == "txn.intent_committed" {
            std::panic::panic_any(Crash);
        }
    });
    let store = Store::open_with(
        db,
        StoreOptions {
            seams: ckptstore::testing::Seams {
                owner: Some(owner),
                hook: Some(hook),
                ..Default::default()
            },
            // Blank images: the metadata loop only.
            bitmaps: ckptstore::BitmapPolicy::Ignore,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    let r = catch_unwind(AssertUnwindSafe(|| {
        store.sync(backend, rel::chain(&dom.name, 3, &["vda"]))
    }));
    assert!(
        matches!(r, Err(p) if p.downcast_ref::<Crash>().is_some()),
        "the store should have died"
    );
}

/// Field 22 of /proc/PID/stat: the process's start time.
fn start_time(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 1..];
    rest.split_whitespace().nth(19).unwrap().parse().unwrap()
}

/// A live process (killed by its handle on drop).
struct Sleeper(Child);

impl Sleeper {
    fn spawn() -> Sleeper {
        Sleeper(Command::new("sleep").arg("120").spawn().unwrap())
    }

    fn owner(&self) -> Owner {
        let pid = self.0.id();
        Owner {
            pid,
            boot_id: Owner::current().boot_id,
            start: start_time(pid),
        }
    }
}

impl Drop for Sleeper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn stale_owners_are_seen_dead_by_status_on_qemu() {
    let conn = support::system();
    let backend = LibvirtBackend::connect(SYSTEM_URI).unwrap();
    let dir = tempfile::Builder::new()
        .prefix("ckptstore-owners-")
        .tempdir()
        .unwrap();
    let db = dir.path().join("journal.db");
    let doms: Vec<TestDomain> = ["dead", "reused", "reboot", "live"]
        .iter()
        .map(|t| TestDomain::define(&conn, t, 1))
        .collect();

    // A process that has died.
    let dead = {
        let s = Sleeper::spawn();
        s.owner()
    };
    // This boot, a live pid whose process started at another time: the pid
    // was reused.
    let keep = Sleeper::spawn();
    let reused = Owner {
        start: keep.owner().start + 1,
        ..keep.owner()
    };
    // A live pid with its own start time, but written in another boot: the
    // machine rebooted and the pid (and even the start time) came again.
    let rebooted = Owner {
        boot_id: "00000000-0000-4000-8000-000000000000".into(),
        ..keep.owner()
    };
    let live = Sleeper::spawn();
    let owners = [dead.clone(), reused, rebooted, live.owner()];
    for (dom, owner) in doms.iter().zip(&owners) {
        leave_open(&db, owner.clone(), &backend, dom);
    }

    let status = rel::run(&db, &["status", "--json"])
        .expect(0, "status")
        .json();
    let incomplete = status["incomplete"].as_array().unwrap();
    assert_eq!(incomplete.len(), 4);
    for (dom, owner) in doms.iter().zip(&owners) {
        let t = incomplete
            .iter()
            .find(|t| t["domain"] == dom.name.as_str())
            .unwrap();
        assert_eq!(t["owner"]["pid"], owner.pid);
        assert_eq!(t["owner"]["boot_id"], owner.boot_id.as_str());
        let alive = dom.name.ends_with("-live");
        assert_eq!(t["owner_alive"], alive, "{}: {t}", dom.name);
    }
    let human = rel::run(&db, &["status"]).expect(0, "status").stdout;
    assert_eq!(human.matches(" dead\n").count(), 3, "{human}");

    // recover takes over the three dead owners' transactions and leaves
    // the live one's alone ...
    let out = rel::run(&db, &["recover", "--json"])
        .expect(0, "recover")
        .json();
    assert_eq!(out["recovered"].as_array().unwrap().len(), 3, "{out}");
    let left = out["left_open"].as_array().unwrap();
    assert_eq!(
        (left.len(), &left[0]["owner_alive"]),
        (1, &serde_json::json!(true)),
        "{out}"
    );
    // ... and a sync of the live owner's domain is busy.
    let file = rel::write_chain(
        dir.path(),
        "live.json",
        &rel::chain(&doms[3].name, 3, &["vda"]),
    );
    rel::run(&db, &["sync", "--chain", &file]).expect(3, "sync of a live owner's domain");
    drop(live);
    let out = rel::run(&db, &["recover", "--json"])
        .expect(0, "recover")
        .json();
    assert_eq!(out["recovered"].as_array().unwrap().len(), 1, "{out}");
    for dom in &doms {
        let target = rel::defs(&rel::chain(&dom.name, 3, &["vda"]));
        rel::check_invariant(&backend, &db, &dom.name, &target, &[], &dom.name);
    }
    drop(keep);
    println!("concurrent: stale owners: dead pid, reused pid, pid of another boot → owner_alive false and recovered; live owner → true, busy, recovered once dead");
}

#[test]
fn a_new_journal_opened_by_eight_processes_at_once() {
    let tmp = tempfile::Builder::new()
        .prefix("ckptstore-create-")
        .tempdir()
        .unwrap();
    let rounds = 20;
    for r in 0..rounds {
        // A folder that does not exist either: created, 0700, by whoever
        // comes first.
        let db = tmp.path().join(format!("r{r}/journal.db"));
        let running: Vec<Running> = (0..8)
            .map(|_| Running::spawn(rel::command(&db, &["status", "--json"])))
            .collect();
        for p in running {
            let out = p.wait();
            assert_eq!(out.code(), Some(0), "round {r}: {out:#?}");
            assert!(out.stderr.is_empty(), "{out:#?}");
        }
        assert_eq!(rel::integrity(&db), "ok");
    }
    println!("concurrent: {rounds} new journals each created by 8 processes at once: 0 errors");
}

/// `cmd` run by `unshare --pid --fork --mount-proc`: the process is pid 1
/// of a new pid namespace with its own `/proc`, as in a container.
fn in_new_pid_namespace(cmd: &Command) -> Command {
    let mut u = Command::new("unshare");
    u.args(["--pid", "--fork", "--mount-proc", "--kill-child"])
        .arg(cmd.get_program())
        .args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => u.env(k, v),
            None => u.env_remove(k),
        };
    }
    if let Some(d) = cmd.get_current_dir() {
        u.current_dir(d);
    }
    u.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    u
}

#[test]
fn an_owner_in_another_pid_namespace_is_live_on_qemu() {
    let conn = support::system();
    let dom = TestDomain::define(&conn, "pidns", 1);
    let dir = tempfile::Builder::new()
        .prefix("ckptstore-pidns-")
        .tempdir()
        .unwrap();
    let db = dir.path().join("journal.db");
    let chain = rel::chain(&dom.name, 100, &["vda"]);
    let file = rel::write_chain(dir.path(), "chain.json", &chain);
    let target = rel::defs(&chain);
    let backend = LibvirtBackend::connect(SYSTEM_URI).unwrap();
    rel::reset(&backend, &dom.name, &[]);
    let mut holder = Running::spawn(in_new_pid_namespace(&rel::command(
        &db,
        &["sync", "--chain", &file, "--json"],
    )));
    let t = Instant::now();
    while status_incomplete(&db, &dom.name) == 0 {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the holder never began"
        );
        assert!(
            holder.child.try_wait().unwrap().is_none(),
            "the holder ended before it was seen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Seen from this namespace, the holder's pid means nothing; its lock
    // says it is alive.
    let st = rel::run(&db, &["status", "--domain", &dom.name, "--json"])
        .expect(0, "status")
        .json();
    assert_eq!(st["incomplete"][0]["owner_alive"], true, "{st:#}");
    let rec = rel::run(&db, &["recover", "--json"]).expect(0, "recover");
    let rec = rec.json();
    assert_eq!(rec["recovered"].as_array().unwrap().len(), 0, "{rec:#}");
    assert_eq!(rec["left_open"].as_array().unwrap().len(), 1, "{rec:#}");
    let second = rel::run(&db, &["sync", "--chain", &file]);
    assert_eq!(second.code(), Some(3), "a second writer: {second:#?}");
    assert!(
        holder.child.try_wait().unwrap().is_none(),
        "the holder must still run (the checks above took too long)"
    );
    let won = holder.wait();
    assert_eq!(won.code(), Some(0), "the holder: {won:#?}");
    let j = won.json();
    assert_eq!(
        (j["outcome"].as_str(), j["libvirt_calls"].as_u64()),
        (Some("committed"), Some(100))
    );
    let landed = rel::check_invariant(&backend, &db, &dom.name, &target, &[], "pid namespace");
    assert_eq!(landed, rel::Landed::Target);
    println!(
        "concurrent: a holder in its own pid namespace was seen alive, recover left it alone, a second sync exited 3; it committed 100 checkpoints in {} ms",
        won.elapsed.as_millis()
    );
}

#[test]
fn recover_reports_every_transaction_when_one_domain_is_gone_on_qemu() {
    let conn = support::system();
    let backend = LibvirtBackend::connect(SYSTEM_URI).unwrap();
    let dir = tempfile::Builder::new()
        .prefix("ckptstore-gone-")
        .tempdir()
        .unwrap();
    let db = dir.path().join("journal.db");
    let kept = TestDomain::define(&conn, "kept", 1);
    let gone = TestDomain::define(&conn, "gone", 1);
    let dead = Sleeper::spawn().owner();
    leave_open(&db, dead.clone(), &backend, &kept);
    leave_open(&db, dead, &backend, &gone);
    // One domain is undefined for good while its transaction is open.
    let name = gone.name.clone();
    drop(gone);
    for _ in 0..2 {
        let out = rel::run(&db, &["recover", "--json"]);
        assert_eq!(out.code(), Some(4), "the worst failure's code: {out:#?}");
        assert_eq!(out.stderr.lines().count(), 1, "{out:#?}");
        let doc = out.json();
        let recovered = doc["recovered"].as_array().unwrap();
        let failed = doc["failed"].as_array().unwrap();
        let left = doc["left_open"].as_array().unwrap();
        assert_eq!(failed.len(), 1, "{doc:#}");
        assert_eq!(failed[0]["domain"], name.as_str());
        assert_eq!(failed[0]["error"]["exit_code"], 4);
        assert_eq!(left.len(), 1, "the failed one stays open: {doc:#}");
        assert_eq!(left[0]["domain"], name.as_str());
        assert_eq!(doc["error"]["exit_code"], 4);
        // The first run finished the other domain; the second had nothing else.
        assert!(recovered.len() <= 1, "{doc:#}");
    }
    let target = rel::defs(&rel::chain(&kept.name, 3, &["vda"]));
    rel::check_invariant(&backend, &db, &kept.name, &target, &[], "kept");
    let human = rel::run(&db, &["recover"]);
    assert_eq!(human.code(), Some(4));
    assert!(
        human
            .stdout
            .contains(&format!("on domain {name}: failed, still open")),
        "{human:#?}"
    );
    println!("concurrent: recover with one domain undefined: the other committed, the gone one reported as failed (exit 4) and left open, every run");
}
