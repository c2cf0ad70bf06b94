//! The `ckptstore` command, run as a real binary: whole outputs (stdout,
//! stderr, exit code; human and JSON) compared with snapshots under
//! `tests/snapshots/`, covering every exit code of the contract.
//!
//! Tests on `qemu:///system` use shut-off domains on real qcow2 images
//! (tests/support) and fail with the command that starts the daemon when it
//! is not running. `CKPTSTORE_UPDATE_SNAPSHOTS=1` rewrites the snapshots.

use crate::snap;
use testkit::support;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Once};

use chrono::DateTime;
use ckptstore::testing::same_content;
use ckptstore::testing::Hook;
use ckptstore::Owner;
use ckptstore::{Backend, Chain, Checkpoint, CheckpointDef, LibvirtBackend, Store, StoreOptions};
use snap::Snap;
use support::{TestDomain, SYSTEM_URI};
use uuid::Uuid;

/// A libvirt URI where nothing listens.
const NOWHERE: &str = "qemu+unix:///system?socket=/nonexistent/ckptstore.sock";

fn disk_id(i: usize) -> String {
    Uuid::from_u128(0xd15c_0000 + i as u128).to_string()
}

fn ckpt_id(i: usize) -> String {
    Uuid::from_u128(0xc4e0_0000 + i as u128).to_string()
}

/// A line of `n` hourly checkpoints of `domain` over disks with `targets`.
fn chain(domain: &str, n: usize, targets: &[&str]) -> Chain {
    Chain {
        scope: None,
        vm_id: Uuid::parse_str("93a5c045-6457-2c09-e56c-927cdf34e178").unwrap(),
        domain: Some(domain.to_string()),
        disks: targets
            .iter()
            .enumerate()
            .map(|(i, t)| (disk_id(i), t.to_string()))
            .collect(),
        checkpoints: (0..n)
            .map(|i| Checkpoint {
                id: ckpt_id(i),
                parent: i.checked_sub(1).map(ckpt_id),
                created: DateTime::from_timestamp(1_700_000_000 + i as i64 * 3600, 0).unwrap(),
                description: Some(format!("backup {i}")),
                disks: (0..targets.len()).map(disk_id).collect(),
            })
            .collect(),
    }
}

fn write_chain(s: &Snap, file: &str, c: &Chain) -> String {
    s.write(file, serde_json::to_string_pretty(c).unwrap())
        .display()
        .to_string()
}

fn defs(c: &Chain) -> Vec<CheckpointDef> {
    c.clone().validate().unwrap().defs()
}

fn libvirt(domain: &str) -> Vec<CheckpointDef> {
    LibvirtBackend::connect(SYSTEM_URI)
        .unwrap()
        .list(domain)
        .unwrap()
}

/// The payload of a crash injected into a store of this test process.
struct Crash;

/// Run `f`, which must die at an injected crash point.
fn crashes<T>(f: impl FnOnce() -> T) {
    static QUIET: Once = Once::new();
    QUIET.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info.payload().downcast_ref::<Crash>().is_none() {
                default(info);
            }
        }));
    });
    match catch_unwind(AssertUnwindSafe(f)) {
        Err(p) if p.downcast_ref::<Crash>().is_some() => {}
        Err(p) => std::panic::resume_unwind(p),
        Ok(_) => panic!("the store should have crashed"),
    }
}

/// A store on `db` acting as `owner`, dying at the `nth` time it passes
/// crash point `at`.
fn crashing_store(db: &Path, owner: Owner, at: &'static str, nth: u32) -> Store {
    let seen = Arc::new(AtomicU32::new(0));
    let hook: Hook = Arc::new(move |point| {
        if point == at && seen.fetch_add(1, Ordering::SeqCst) + 1 == nth {
            std::panic::panic_any(Crash);
        }
    });
    Store::open_with(
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
    .unwrap()
}

/// Field 22 of /proc/PID/stat: the process's start time.
fn start_time(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 1..];
    rest.split_whitespace().nth(19).unwrap().parse().unwrap()
}

/// A live process to own a transaction; killed (by its pid) on drop.
struct LiveOwner {
    child: Child,
    owner: Owner,
}

impl LiveOwner {
    fn spawn() -> LiveOwner {
        let child = Command::new("sleep")
            .arg("60")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id();
        LiveOwner {
            child,
            owner: Owner {
                pid,
                boot_id: Owner::current().boot_id,
                start: start_time(pid),
            },
        }
    }

    /// Its identity (still the same once it has died).
    fn owner(&self) -> Owner {
        self.owner.clone()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for LiveOwner {
    fn drop(&mut self) {
        self.kill();
    }
}

#[test]
fn help_and_version() {
    let mut s = Snap::new("help");
    let r = s.run(&["--version"]);
    assert_eq!(
        (r.code, r.stdout.as_str()),
        (0, concat!("ckptstore ", env!("CARGO_PKG_VERSION"), "\n"))
    );
    let r = s.run(&["--help"]);
    assert_eq!(r.code, 0);
    assert!(r.stdout.contains("Exit codes:") && r.stdout.contains("$ ckptstore demo"));
    for cmd in [
        "sync", "plan", "recover", "status", "import", "history", "metrics", "demo", "reclaim",
    ] {
        let r = s.run(&[cmd, "--help"]);
        assert_eq!(r.code, 0, "{cmd} --help");
        assert!(r.stdout.contains("Example:"), "{cmd} --help has no example");
        assert!(
            r.stdout.contains(&format!("$ ckptstore {cmd}")),
            "{cmd} --help's example does not run {cmd}"
        );
        assert!(r.stderr.is_empty());
    }
    s.check();
}

#[test]
fn usage_errors_exit_2() {
    let mut s = Snap::new("usage_errors");
    for args in [
        &[][..],
        &["frobnicate"],
        &["sync", "--chian", "c.json"],
        &["sync"],
        &["sync", "--chain", "c.json", "--domain", "vm"],
        &["history"],
        &["history", "--domain", "vm", "--limit", "many"],
        &["status", "--bogus"],
    ] {
        let r = s.run(args);
        assert_eq!(r.code, 2, "{args:?}");
        assert!(r.stdout.is_empty(), "{args:?}");
        assert_eq!(
            r.stderr.lines().count(),
            1,
            "{args:?}: one line on stderr:\n{}",
            r.stderr
        );
        assert!(r.stderr.starts_with("ckptstore: "), "{args:?}");
    }
    assert!(
        !s.db().exists(),
        "a usage error must not create the journal"
    );
    s.check();
}

#[test]
fn bad_chains_exit_2_before_libvirt_is_asked() {
    // libvirt is unreachable here: every refusal must come first.
    let mut s = Snap::new("bad_chains");
    let good = chain("vm", 2, &["vda"]);
    let good_json = serde_json::to_string(&good).unwrap();
    let mut cycle = good.clone();
    cycle.checkpoints[0].parent = Some(ckpt_id(1));
    let mut duplicate = chain("vm", 3, &["vda"]);
    duplicate.checkpoints[2].id = ckpt_id(0);
    let mut orphan = good.clone();
    orphan.checkpoints[1].parent = Some(ckpt_id(7));
    let cases: Vec<(&str, String)> = vec![
        (
            "malformed",
            good_json[..good_json.len() / 2].replace(',', ",\n"),
        ),
        (
            "wrong type",
            good_json.replacen(
                "\"vm_id\":\"93a5c045-6457-2c09-e56c-927cdf34e178\"",
                "\"vm_id\":42",
                1,
            ),
        ),
        (
            "unknown field",
            good_json.replacen("\"disks\"", "\"disk_map\"", 1),
        ),
        ("cycle", serde_json::to_string(&cycle).unwrap()),
        ("duplicate", serde_json::to_string(&duplicate).unwrap()),
        ("unknown parent", serde_json::to_string(&orphan).unwrap()),
    ];
    for (what, text) in &cases {
        for json in [false, true] {
            let mut args = vec!["--connect", NOWHERE, "sync", "--chain", "-"];
            if json {
                args.push("--json");
            }
            let r = s.run_with(&args, Some(text));
            assert_eq!(r.code, 2, "{what}: {}", r.stderr);
            assert_eq!(r.stderr.lines().count(), 1, "{what}: {}", r.stderr);
            if json {
                assert_eq!(r.json()["error"]["exit_code"], 2);
            }
        }
    }
    let file = s.write(
        "malformed.json",
        "{\n  \"vm_id\": \"93a5c045-6457-2c09-e56c-927cdf34e178\",\n  \"disks\": {}\n  \"checkpoints\": []\n}\n",
    );
    let r = s.run(&[
        "--connect",
        NOWHERE,
        "plan",
        "--chain",
        &file.display().to_string(),
    ]);
    assert_eq!(r.code, 2);
    assert!(
        r.stderr.contains("line 4 column 3"),
        "serde's line and column: {}",
        r.stderr
    );
    let r = s.run(&[
        "--connect",
        NOWHERE,
        "sync",
        "--chain",
        "/nonexistent/chain.json",
    ]);
    assert_eq!(r.code, 2);
    let r = s.run(&["--connect", NOWHERE, "sync", "--domain", "never-synced"]);
    assert_eq!(r.code, 2, "no committed chain to re-apply");
    s.check();
}

#[test]
fn sync_plan_status_history_on_qemu() {
    let conn = support::system();
    let dom = TestDomain::define(&conn, "cli-sync", 2);
    let mut s = Snap::new("sync_on_qemu");
    s.redact(&dom.name, "[DOMAIN]");
    let three = chain(&dom.name, 3, &["vda", "vdb"]);
    let five = chain(&dom.name, 5, &["vda", "vdb"]);
    let c3 = write_chain(&s, "chain3.json", &three);
    let c5 = write_chain(&s, "chain5.json", &five);

    let r = s.run(&["plan", "--chain", &c3]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(libvirt(&dom.name).is_empty(), "plan changes nothing");
    let r = s.run(&["sync", "--chain", &c3]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(same_content(&libvirt(&dom.name), &defs(&three)));

    let r = s.run(&["sync", "--chain", &c3, "--json"]);
    assert_eq!(r.code, 0);
    let j = r.json();
    assert_eq!(
        (j["outcome"].as_str(), j["libvirt_calls"].as_u64()),
        (Some("unchanged"), Some(0))
    );
    assert_eq!(j["unchanged"].as_array().unwrap().len(), 3);

    let r = s.run(&["plan", "--chain", &c5, "--json"]);
    assert_eq!(r.code, 0);
    let steps = r.json()["steps"].as_array().unwrap().clone();
    assert_eq!(steps.len(), 2);
    assert_eq!(
        (steps[0]["op"].as_str(), steps[0]["checkpoint"].as_str()),
        (Some("redefine"), Some(&*ckpt_id(3)))
    );
    let r = s.run(&["sync", "--chain", &c5, "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let j = r.json();
    assert_eq!(
        (j["outcome"].as_str(), j["libvirt_calls"].as_u64()),
        (Some("committed"), Some(2))
    );
    assert!(same_content(&libvirt(&dom.name), &defs(&five)));

    // Re-apply the committed chain: libvirt already has it.
    let r = s.run(&["sync", "--domain", &dom.name]);
    assert_eq!(r.code, 0, "{}", r.stderr);

    assert_eq!(s.run(&["status"]).code, 0);
    let r = s.run(&["status", "--domain", &dom.name, "--json"]);
    let j = r.json();
    assert_eq!(j["incomplete"], serde_json::json!([]));
    assert_eq!(j["domains"][0]["checkpoints"], 5);
    assert_eq!(j["domains"][0]["root"], ckpt_id(0));
    assert_eq!(j["domains"][0]["leaf"], ckpt_id(4));

    assert_eq!(s.run(&["history", "--domain", &dom.name]).code, 0);
    let r = s.run(&["history", "--domain", &dom.name, "--limit", "2", "--json"]);
    assert_eq!(r.json()["transactions"].as_array().unwrap().len(), 2);

    // A disk target the domain does not have: refused before any change.
    let wrong = write_chain(
        &s,
        "wrong-target.json",
        &chain(&dom.name, 3, &["vda", "sdz"]),
    );
    let r = s.run(&["sync", "--chain", &wrong]);
    assert_eq!(r.code, 2);
    let r = s.run(&["plan", "--chain", &wrong, "--json"]);
    assert_eq!(r.code, 2);
    assert!(same_content(&libvirt(&dom.name), &defs(&five)));
    s.check();
}

#[test]
fn import_adopts_libvirts_checkpoints_on_qemu() {
    let conn = support::system();
    let dom = TestDomain::define(&conn, "cli-import", 1);
    let mut s = Snap::new("import_on_qemu");
    s.redact(&dom.name, "[DOMAIN]");
    let three = chain(&dom.name, 3, &["vda"]);
    let c3 = write_chain(&s, "chain.json", &three);
    let other = s.dir().join("other.db").display().to_string();
    // Another journal put the chain into libvirt; this one knows nothing.
    assert_eq!(s.run(&["--db", &other, "sync", "--chain", &c3]).code, 0);
    assert_eq!(s.run(&["status"]).code, 0);

    let r = s.run(&["import", "--domain", &dom.name]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = s.run(&["status", "--json"]);
    assert_eq!(r.json()["domains"][0]["checkpoints"], 3);
    let r = s.run(&["import", "--domain", &dom.name, "--json"]);
    assert_eq!(r.json()["libvirt_calls"], 0);
    // The imported chain can be re-applied.
    let r = s.run(&["sync", "--domain", &dom.name, "--json"]);
    assert_eq!(r.json()["outcome"], "unchanged");
    assert!(same_content(&libvirt(&dom.name), &defs(&three)));
    s.check();
}

/// `export` prints the committed chain as a chain file that `sync --chain`
/// takes without a call; `plan --domain` previews the re-apply with the
/// document `plan --chain` gives. Checkpoints named like a backup tool's.
#[test]
fn export_round_trips_and_plan_previews_a_reapply_on_qemu() {
    let conn = support::system();
    let dom = TestDomain::define(&conn, "cli-export", 2);
    let mut s = Snap::new("export_on_qemu");
    s.redact(&dom.name, "[DOMAIN]");
    let mut c = chain(&dom.name, 4, &["vda", "vdb"]);
    let name = |i: usize| format!("virtnbdbackup.{i}");
    for (i, cp) in c.checkpoints.iter_mut().enumerate() {
        cp.id = name(i);
        cp.parent = i.checked_sub(1).map(name);
    }
    let file = write_chain(&s, "chain.json", &c);
    let r = s.run(&["export", "--domain", &dom.name]);
    assert_eq!(r.code, 2, "no committed chain yet: {}", r.stderr);
    assert_eq!(s.run(&["sync", "--chain", &file]).code, 0);

    let r = s.run(&["export", "--domain", &dom.name]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let exported: Chain = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(exported, c);
    let again = s.write("exported.json", &r.stdout).display().to_string();
    let r = s.run(&["sync", "--chain", &again, "--json"]);
    assert_eq!(
        (
            r.json()["outcome"].clone(),
            r.json()["libvirt_calls"].clone()
        ),
        ("unchanged".into(), 0.into())
    );

    // libvirt loses the newest two: plan --domain previews their redefines.
    let backend = LibvirtBackend::connect(SYSTEM_URI).unwrap();
    backend.delete(&dom.name, &name(3)).unwrap();
    backend.delete(&dom.name, &name(2)).unwrap();
    let by_domain = s.run(&["plan", "--domain", &dom.name, "--json"]);
    let by_chain = s.run(&["plan", "--chain", &file, "--json"]);
    assert_eq!(by_domain.json(), by_chain.json());
    assert_eq!(by_domain.json()["steps"].as_array().unwrap().len(), 2);
    assert_eq!(libvirt(&dom.name).len(), 2, "plan changed libvirt");
    assert_eq!(s.run(&["plan", "--domain", &dom.name]).code, 0);

    // A journal that only imported: the chain is described from libvirt.
    let other = s.dir().join("other.db").display().to_string();
    assert_eq!(
        s.run(&["--db", &other, "import", "--domain", &dom.name])
            .code,
        0
    );
    let r = s.run(&["--db", &other, "export", "--domain", &dom.name]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let imported: Chain = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(imported.vm_id.to_string(), dom.uuid);
    assert_eq!(imported.checkpoints.len(), 2);
    let f = s.write("imported.json", &r.stdout).display().to_string();
    let r = s.run(&["--db", &other, "sync", "--chain", &f, "--json"]);
    assert_eq!(
        (
            r.json()["outcome"].clone(),
            r.json()["libvirt_calls"].clone()
        ),
        ("unchanged".into(), 0.into())
    );
    s.check();
}

/// `--bitmaps` on the command line, with real bitmaps on a shut-off
/// domain: `strict` refuses with exit 1 and changes nothing; `degrade` (the
/// default) leaves the disk whose bitmap is gone out and says so; `plan`
/// shows it first.
#[test]
fn bitmaps_policy_on_the_command_line_on_qemu() {
    let conn = support::system();
    let dom = TestDomain::define(&conn, "cli-bitmaps", 2);
    let mut s = Snap::new("bitmaps_on_qemu");
    s.redact(&dom.name, "[DOMAIN]");
    for p in &dom.images {
        s.redact(&p.display().to_string(), "[IMAGE]");
    }
    let c = chain(&dom.name, 3, &["vda", "vdb"]);
    for cp in &c.checkpoints {
        dom.add_bitmap_everywhere(&cp.id);
    }
    let out = std::process::Command::new("qemu-img")
        .args(["bitmap", "--remove"])
        .arg(&dom.images[1])
        .arg(&c.checkpoints[2].id)
        .output()
        .unwrap();
    assert!(out.status.success());
    let file = write_chain(&s, "chain.json", &c);
    let r = s.run(&["sync", "--chain", &file, "--bitmaps", "strict"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("strict refuses the sync"), "{}", r.stderr);
    assert!(libvirt(&dom.name).is_empty());
    let r = s.run(&["plan", "--chain", &file, "--bitmaps", "degrade", "--json"]);
    assert_eq!(r.json()["degraded"][0]["disk"], "vdb");
    let r = s.run(&["sync", "--chain", &file, "--bitmaps", "degrade"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("degraded: checkpoint"), "{}", r.stdout);
    let held = libvirt(&dom.name);
    assert_eq!(held.len(), 3);
    assert_eq!(held[2].disks.keys().collect::<Vec<_>>(), vec!["vda"]);
    let r = s.run(&["validate", "--domain", &dom.name, "--bitmaps", "degrade"]);
    assert_eq!(r.code, 0, "{}", r.stdout);
    s.check();
}

#[test]
fn refused_step_rolls_back_exit_1() {
    // libvirt's test driver loads this node; an inactive domain there
    // refuses every checkpoint redefine.
    let mut s = Snap::new("refused_rolls_back");
    let node = s.write(
        "node.xml",
        "<node>\n<domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'>\
         <name>stopped-vm</name><memory unit='MiB'>64</memory><os><type>hvm</type></os>\
         <devices><disk type='file' device='disk'><source file='/nonexistent/vda.qcow2'/>\
         <target dev='vda' bus='virtio'/></disk></devices><test:runstate>5</test:runstate></domain>\n</node>\n",
    );
    let uri = format!("test://{}", node.display());
    let c = write_chain(&s, "chain.json", &chain("stopped-vm", 2, &["vda"]));
    let r = s.run(&["--connect", &uri, "sync", "--chain", &c]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r
        .stderr
        .lines()
        .last()
        .unwrap()
        .starts_with("ckptstore: libvirt refused checkpoint"));
    let r = s.run(&["--connect", &uri, "sync", "--chain", &c, "--json"]);
    assert_eq!(r.code, 1);
    let j = r.json();
    assert_eq!(
        (j["outcome"].as_str(), j["domain"].as_str()),
        (Some("rolled_back"), Some("stopped-vm"))
    );
    assert_eq!(j["error"]["exit_code"], 1);
    let r = s.run(&["status"]);
    assert!(r.stdout.starts_with("incomplete transactions: none"));
    assert_eq!(s.run(&["history", "--domain", "stopped-vm"]).code, 0);
    s.check();
}

#[test]
fn live_owner_is_busy_exit_3_then_recover_on_qemu() {
    let conn = support::system();
    let dom = TestDomain::define(&conn, "cli-busy", 1);
    let mut s = Snap::new("busy_then_recover");
    s.redact(&dom.name, "[DOMAIN]");
    let three = chain(&dom.name, 3, &["vda"]);
    let c3 = write_chain(&s, "chain.json", &three);
    let backend = LibvirtBackend::connect(SYSTEM_URI).unwrap();

    // A live process (sleep) owns a transaction that has its intent
    // committed and has not made a libvirt call yet.
    let mut agent = LiveOwner::spawn();
    let store = crashing_store(&s.db(), agent.owner(), "txn.intent_committed", 1);
    crashes(|| store.sync(&backend, three.clone()));
    drop(store);

    let r = s.run(&["sync", "--chain", &c3]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    let r = s.run(&["sync", "--chain", &c3, "--json"]);
    assert_eq!(
        (r.code, &r.json()["error"]["exit_code"]),
        (3, &serde_json::json!(3))
    );
    let r = s.run(&["status", "--json"]);
    assert_eq!(r.json()["incomplete"][0]["owner_alive"], true);
    let r = s.run(&["recover"]);
    assert_eq!(r.code, 0, "a live owner's transaction is left alone");
    assert!(libvirt(&dom.name).is_empty());

    // The owner dies: its transaction can be undone ...
    agent.kill();
    let r = s.run(&["status"]);
    assert!(
        r.stdout.contains("applying  0/3 steps  owner pid") && r.stdout.contains(" dead\n"),
        "{}",
        r.stdout
    );
    let r = s.run(&["recover", "--domain", &dom.name, "--rollback"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(libvirt(&dom.name).is_empty());

    // ... or, by default, finished: this agent dies after two redefines.
    let store = crashing_store(&s.db(), agent.owner(), "step.recorded", 2);
    crashes(|| store.sync(&backend, three.clone()));
    drop(store);
    assert_eq!(libvirt(&dom.name).len(), 2);
    let r = s.run(&["status", "--json"]);
    let j = &r.json()["incomplete"][0];
    assert_eq!(
        (j["state"].as_str(), j["owner_alive"].as_bool()),
        (Some("applying"), Some(false))
    );
    assert_eq!(
        (j["done"].as_u64(), j["total"].as_u64()),
        (Some(2), Some(3))
    );
    let r = s.run(&["recover", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let rec = &r.json()["recovered"][0];
    assert_eq!(
        (rec["outcome"].as_str(), rec["libvirt_calls"].as_u64()),
        (Some("committed"), Some(1))
    );
    assert!(same_content(&libvirt(&dom.name), &defs(&three)));
    let r = s.run(&["status"]);
    assert!(r.stdout.starts_with("incomplete transactions: none"));
    assert_eq!(s.run(&["recover"]).code, 0);
    s.check();
}

#[test]
fn libvirt_unreachable_or_domain_unknown_exit_4() {
    support::system();
    let mut s = Snap::new("libvirt_unreachable");
    let missing = "ckpt-test-no-such-domain";
    let c = write_chain(&s, "chain.json", &chain(missing, 1, &["vda"]));
    for args in [
        &["import", "--domain", missing][..],
        &["import", "--domain", missing, "--json"],
    ] {
        let r = s.run(args);
        assert_eq!(r.code, 4, "{}", r.stderr);
        assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);
    }
    let r = s.run(&["sync", "--chain", &c]);
    assert_eq!(r.code, 4);
    let r = s.run(&["--connect", NOWHERE, "sync", "--chain", &c]);
    assert_eq!(r.code, 4);
    assert!(r.stderr.contains("/nonexistent/ckptstore.sock"));
    let r = s.run(&["--connect", NOWHERE, "plan", "--chain", &c, "--json"]);
    assert_eq!(
        (r.code, &r.json()["error"]["exit_code"]),
        (4, &serde_json::json!(4))
    );
    let r = s.run(&["--connect", NOWHERE, "import", "--domain", missing]);
    assert_eq!(r.code, 4);
    // Nothing to recover needs no libvirt.
    assert_eq!(s.run(&["--connect", NOWHERE, "recover"]).code, 0);
    s.check();
}

#[test]
fn unusable_journal_exit_5() {
    let mut s = Snap::new("journal_unusable");
    let c = write_chain(&s, "chain.json", &chain("vm", 1, &["vda"]));

    // Random bytes (a fixed sequence, so the snapshot is stable).
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let noise: Vec<u8> = (0..8192)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let corrupt = s.write("corrupt.db", &noise).display().to_string();
    let r = s.run(&["--db", &corrupt, "status"]);
    assert_eq!(r.code, 5);
    let r = s.run(&["--db", &corrupt, "status", "--json"]);
    assert_eq!(r.json()["error"]["exit_code"], 5);
    let r = s.run(&[
        "--db",
        &corrupt,
        "--connect",
        NOWHERE,
        "sync",
        "--chain",
        &c,
    ]);
    assert_eq!(r.code, 5);
    assert_eq!(std::fs::read(&corrupt).unwrap(), noise);

    // A journal from a newer ckptstore is left untouched, byte for byte.
    let newer = s.dir().join("newer.db");
    {
        let db = rusqlite::Connection::open(&newer).unwrap();
        db.execute_batch(
            "CREATE TABLE future (x); INSERT INTO future VALUES (1); PRAGMA user_version = 99;",
        )
        .unwrap();
    }
    let before = std::fs::read(&newer).unwrap();
    let newer = newer.display().to_string();
    for args in [
        &["status"][..],
        &["recover"],
        &["history", "--domain", "vm"],
        &["sync", "--chain", &c],
    ] {
        let mut full = vec!["--db", newer.as_str(), "--connect", NOWHERE];
        full.extend(args);
        let r = s.run(&full);
        assert_eq!(r.code, 5, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains("schema version 99"), "{}", r.stderr);
    }
    assert_eq!(
        std::fs::read(&newer).unwrap(),
        before,
        "the newer journal was changed"
    );
    assert!(!Path::new(&format!("{newer}-wal")).exists());

    // A journal that cannot be created.
    let r = s.run(&["--db", "/proc/ckptstore/journal.db", "status"]);
    assert_eq!(r.code, 5);
    s.check();
}

#[test]
fn demo_tells_the_whole_story() {
    let mut s = Snap::new("demo");
    let r = s.run(&["demo"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("owner pid") && r.stdout.contains("equal to the chain: yes"));
    let r = s.run(&["demo", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let j = r.json();
    assert_eq!(j["libvirt_equals_chain"], true);
    assert_eq!(j["crashed_after"], 4);
    // The demo plays the agent itself: its owner is this live process,
    // which holds no lock any more, so it finishes the transaction itself.
    assert_eq!(
        j["status_after_crash"]["incomplete"][0]["owner_alive"],
        true
    );
    assert_eq!(j["status_after_crash"]["incomplete"][0]["done"], 4);
    assert_eq!(j["recovered"][0]["outcome"], "committed");
    assert!(!s.db().exists(), "the demo uses a journal of its own");
    s.check();
}

#[test]
fn validate_exit_0_when_clean_and_1_with_findings_on_qemu() {
    let conn = support::system();
    let dom = TestDomain::define(&conn, "cli-validate", 1);
    let three = chain(&dom.name, 3, &["vda"]);
    for c in &three.checkpoints {
        dom.add_bitmap(0, &c.id.clone());
    }
    let mut s = Snap::new("validate_on_qemu");
    s.redact(&dom.name, "[DOMAIN]");
    s.redact(&dom.images[0].display().to_string(), "[IMAGE]");
    let c3 = write_chain(&s, "chain.json", &three);
    assert_eq!(s.run(&["sync", "--chain", &c3]).code, 0);
    let r = s.run(&["validate", "--domain", &dom.name]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // Break the image for real: the leaf's bitmap removed, a stray one added.
    let leaf = ckpt_id(2);
    let status = Command::new("qemu-img")
        .args(["bitmap", "--remove"])
        .arg(&dom.images[0])
        .arg(&leaf)
        .status()
        .expect("qemu-img");
    assert!(status.success());
    dom.add_bitmap(0, "stray");
    let r = s.run(&["validate", "--domain", &dom.name]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let r = s.run(&["validate", "--domain", &dom.name, "--json"]);
    assert_eq!(r.code, 1);
    let doc = r.json();
    assert_eq!(doc["ok"], false);
    let kinds: Vec<&str> = doc["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["missing_bitmap", "orphan_bitmap"]);
    assert_eq!(doc["findings"][0]["checkpoint"], leaf.as_str());
    assert_eq!(doc["findings"][0]["disk"], "vda");
    assert_eq!(doc["usable"], ckpt_id(1).as_str());
    assert_eq!(doc["error"]["exit_code"], 1);
    // Unknown domain: exit 4.
    assert_eq!(
        s.run(&["validate", "--domain", "ckptstore-no-such-domain"])
            .code,
        4
    );
    s.check();
}
