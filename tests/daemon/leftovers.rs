//! libvirt's own crash leftovers (`NAME.xml.new` beside a checkpoint's
//! metadata, which libvirt loads at its next start): found by `validate`,
//! repaired with a warning by `sync`, `recover` and `import`.
//!
//! On the fake, which models what a restart does with them; and on
//! `qemu:///system` with leftovers planted in the daemon's folder of a
//! test domain (no restart here: `cli/tests/kills/daemon_leftovers.rs`
//! kills and restarts the daemon).

use testkit::sim;
use testkit::support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ckptstore::testing::same_content;
use ckptstore::testing::Hook;
use ckptstore::testing::{FakeBackend, Fault, Op, Phase};
use ckptstore::LeftoverScan;
use ckptstore::{
    validate, Backend, BackendErrorKind, CheckpointDef, FindingKind, LibvirtBackend, Outcome,
    Policy, Store,
};
use sim::*;

fn fake_with_domain() -> FakeBackend {
    let fake = FakeBackend::new();
    fake.define_domain(DOMAIN, VM_UUID, &["sda", "sdb"], false);
    fake
}

fn defs(n: usize) -> Vec<CheckpointDef> {
    linear_chain(n, 2).validate().unwrap().defs()
}

fn leftover_names(b: &dyn Backend, domain: &str) -> Vec<String> {
    match b.leftovers(domain).unwrap() {
        LeftoverScan::Checked(v) => v.into_iter().map(|l| l.checkpoint).collect(),
        LeftoverScan::CannotCheck(why) => panic!("cannot check: {why}"),
    }
}

fn warned<'a>(warnings: &'a [String], checkpoint: &str) -> &'a str {
    let needle = format!("checkpoint {checkpoint}'s metadata");
    warnings
        .iter()
        .find(|w| w.contains(&needle))
        .unwrap_or_else(|| panic!("no warning about {checkpoint}: {warnings:#?}"))
}

/// The case: a checkpoint whose metadata rewrite was cut short is
/// deleted by a later sync (or a rollback); libvirt's next start loads the
/// leftover and the checkpoint is back. The sync must consume it first.
#[test]
fn a_deleted_checkpoint_does_not_come_back_at_the_next_restart() {
    let fake = fake_with_domain();
    let store = TempJournal::new().store(1);
    store.sync(&fake, linear_chain(4, 2)).unwrap();
    let all = defs(4);
    let doomed = all[3].name.clone();
    // The daemon died while rewriting the leaf's file, and came back.
    fake.plant_leftover(DOMAIN, &doomed, Some(all[3].clone()), true);
    fake.restart();
    assert!(same_content(&fake.peek(DOMAIN), &all));

    // The model first: without a repair, a delete leaves the file, and the
    // next restart brings the checkpoint back.
    let bare = fake_with_domain();
    bare.set_checkpoints(DOMAIN, all.clone());
    bare.plant_leftover(DOMAIN, &doomed, Some(all[3].clone()), true);
    bare.delete(DOMAIN, &doomed).unwrap();
    bare.restart();
    assert!(
        same_content(&bare.peek(DOMAIN), &all),
        "the model: it comes back"
    );

    let r = store.sync(&fake, linear_chain(3, 2)).unwrap();
    assert_eq!(r.deleted, vec![doomed.clone()]);
    let w = warned(&r.warnings, &doomed);
    assert!(w.contains("xml.new"), "{w}");
    assert!(w.contains("rewrote"), "{w}");
    assert!(leftover_names(&fake, DOMAIN).is_empty());
    fake.restart();
    fake.restart();
    assert!(same_content(&fake.peek(DOMAIN), &defs(3)));
}

#[test]
fn every_kind_of_leftover_is_reported_and_repaired() {
    let fake = fake_with_domain();
    let store = TempJournal::new().store(1);
    store.sync(&fake, linear_chain(3, 2)).unwrap();
    let all = defs(3);
    // Listed, with another definition; listed, cut short; not listed, a
    // whole checkpoint; not listed, cut short; not listed, being written.
    let mut older = all[1].clone();
    older.description = Some("an older definition".into());
    fake.plant_leftover(DOMAIN, &all[1].name, Some(older), true);
    fake.plant_leftover(DOMAIN, &all[2].name, None, true);
    let ghost = extra_def("ghost", Some(&all[2].name), 1_700_000_000);
    fake.plant_leftover(DOMAIN, "ghost", Some(ghost), true);
    fake.plant_leftover(DOMAIN, "cut", None, true);
    fake.plant_leftover(DOMAIN, "young", Some(extra_def("young", None, 1)), false);

    // validate finds each, with its file and what it would do.
    let report = validate(&store, &fake, DOMAIN).unwrap();
    assert!(!report.ok);
    let found: BTreeMap<String, (Option<PathBuf>, String)> = report
        .of_kind(FindingKind::LibvirtLeftover)
        .map(|f| {
            (
                f.checkpoint.clone().unwrap(),
                (f.image.clone(), f.detail.clone()),
            )
        })
        .collect();
    assert_eq!(found.len(), 5, "{report:#?}");
    assert_eq!(
        found["ghost"].0.as_deref(),
        Some(Path::new("/fake/sim-domain/checkpoint/ghost.xml.new"))
    );
    assert!(found["ghost"]
        .1
        .contains("would bring back checkpoint ghost"));
    assert!(found[&all[1].name].1.contains("may replace"));
    assert!(found["cut"].1.contains("cut short"));
    assert_eq!(
        serde_json::to_value(FindingKind::LibvirtLeftover).unwrap(),
        "libvirt_leftover"
    );
    assert!(
        !report.notes.iter().any(|n| n.contains("leftover")),
        "{:?}",
        report.notes
    );

    // A sync with nothing to do repairs them all but the young one.
    fake.reset_calls();
    let r = store.sync(&fake, linear_chain(3, 2)).unwrap();
    assert_eq!((r.outcome, r.libvirt_calls), (Outcome::Unchanged, 0));
    assert_eq!(r.warnings.len(), 5, "{:#?}", r.warnings);
    assert!(warned(&r.warnings, &all[1].name).contains("rewrote"));
    assert!(warned(&r.warnings, &all[2].name).contains("rewrote"));
    assert!(warned(&r.warnings, "ghost").ends_with("removed it"));
    assert!(warned(&r.warnings, "cut").ends_with("removed it"));
    assert!(warned(&r.warnings, "young").contains("left alone"));
    // The two rewrites are libvirt calls (not counted as the sync's own).
    assert_eq!(fake.calls(Op::Redefine), 2);
    assert_eq!(leftover_names(&fake, DOMAIN), vec!["young".to_string()]);
    fake.restart();
    let mut expected = all.clone();
    expected.push(extra_def("young", None, 1));
    assert!(same_content(&fake.peek(DOMAIN), &expected));
}

#[test]
fn recover_repairs_what_a_dead_daemon_left_and_says_so() {
    let fake = fake_with_domain();
    let j = TempJournal::new();
    let store = j.store(1);
    store.sync(&fake, linear_chain(2, 2)).unwrap();
    // A sync to 6 loses the daemon for good after its third call: left open.
    fake.inject(Fault {
        op: Some(Op::Redefine),
        nth: 3,
        phase: Phase::BeforeEffect,
        kind: BackendErrorKind::ConnectionLost,
        forever: true,
    });
    let e = j.store(2).sync(&fake, linear_chain(6, 2)).unwrap_err();
    assert!(e.is_unreachable(), "{e:?}");
    fake.clear_faults();
    // The daemon died writing the fourth checkpoint's file, before it
    // could rename it: a restart loads it. The rollback deletes it.
    let all = defs(6);
    fake.plant_leftover(DOMAIN, &all[3].name, Some(all[3].clone()), true);
    fake.restart();
    let out = store
        .recover(&fake, Policy::Rollback, None)
        .unwrap()
        .recovered;
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].outcome, Outcome::RolledBack);
    let w = warned(&out[0].warnings, &all[3].name);
    assert!(
        w.contains("would bring back") && w.ends_with("removed it"),
        "{w}"
    );
    let doc = serde_json::to_value(&out[0]).unwrap();
    assert_eq!(doc["warnings"].as_array().unwrap().len(), 1);
    fake.restart();
    fake.restart();
    assert!(same_content(&fake.peek(DOMAIN), &defs(2)));
    // With nothing repaired, a recovery's document has no warnings key.
    let clean = serde_json::to_value(ckptstore::Recovered {
        warnings: Vec::new(),
        ..out[0].clone()
    })
    .unwrap();
    assert!(clean.get("warnings").is_none());
}

/// A leftover that appears while the transaction runs (the daemon was
/// killed and restarted under it) is repaired at the end of the phase —
/// here the rollback's, which deletes the checkpoint it belongs to.
#[test]
fn a_rollback_does_not_leave_a_leftover_behind() {
    let fake = Arc::new(fake_with_domain());
    let j = TempJournal::new();
    let all = defs(4);
    fake.refuse_def(DOMAIN, &all[3]);
    let planted = Arc::new(AtomicBool::new(false));
    let (f2, p2, c2) = (fake.clone(), planted.clone(), all[2].clone());
    let hook: Hook = Arc::new(move |point| {
        // Once the third checkpoint is redefined: its file was cut short.
        if point == "step.recorded"
            && f2.peek(DOMAIN).iter().any(|d| d.name == c2.name)
            && !p2.swap(true, Ordering::SeqCst)
        {
            f2.plant_leftover(DOMAIN, &c2.name, Some(c2.clone()), true);
            f2.restart();
        }
    });
    let store = Store::open_with(
        j.path(),
        ckptstore::StoreOptions {
            seams: ckptstore::testing::Seams {
                hook: Some(hook),
                ..Default::default()
            },
            ..ckptstore::StoreOptions::default()
        },
    )
    .unwrap();
    let e = store.sync(&*fake, linear_chain(4, 2)).unwrap_err();
    assert!(e.is_rolled_back(), "{e:?}");
    assert!(planted.load(Ordering::SeqCst));
    assert!(fake.peek(DOMAIN).is_empty());
    assert!(leftover_names(&*fake, DOMAIN).is_empty());
    fake.restart();
    assert!(fake.peek(DOMAIN).is_empty(), "{:?}", fake.peek(DOMAIN));
}

#[test]
fn import_repairs_before_it_adopts() {
    let fake = fake_with_domain();
    let all = defs(3);
    fake.set_checkpoints(DOMAIN, all.clone());
    fake.plant_leftover(DOMAIN, "ghost", Some(extra_def("ghost", None, 5)), true);
    let store = TempJournal::new().store(1);
    let r = store.import(&fake, DOMAIN).unwrap();
    assert!(warned(&r.warnings, "ghost").ends_with("removed it"));
    assert_eq!(r.unchanged.len(), 3);
    fake.restart();
    assert!(same_content(&fake.peek(DOMAIN), &all));
}

/// A backend that does not implement the leftover check.
struct Plain(FakeBackend);
impl Backend for Plain {
    fn list(&self, d: &str) -> Result<Vec<CheckpointDef>, ckptstore::BackendError> {
        self.0.list(d)
    }
    fn redefine(&self, d: &str, x: &str, v: bool) -> Result<(), ckptstore::BackendError> {
        self.0.redefine(d, x, v)
    }
    fn delete(&self, d: &str, n: &str) -> Result<(), ckptstore::BackendError> {
        self.0.delete(d, n)
    }
    fn domain_info(&self, d: &str) -> Result<ckptstore::DomainInfo, ckptstore::BackendError> {
        self.0.domain_info(d)
    }
    fn describe(&self) -> String {
        "plain".into()
    }
}

#[test]
fn where_the_files_cannot_be_read_nothing_is_guessed() {
    let b = LibvirtBackend::connect(support::TEST_URI).unwrap();
    match b.leftovers("test").unwrap() {
        LeftoverScan::CannotCheck(why) => {
            assert!(why.contains("test:///default"), "{why}");
        }
        other @ LeftoverScan::Checked(_) => panic!("{other:?}"),
    }
    let j = TempJournal::new();
    let store = j.store(1);
    let report = validate(&store, &b, "test").unwrap();
    assert!(
        report
            .notes
            .iter()
            .any(|n| n.starts_with("libvirt's metadata files not checked for crash leftovers")),
        "{:?}",
        report.notes
    );
    assert_eq!(report.of_kind(FindingKind::LibvirtLeftover).count(), 0);
    // A backend that does not implement the check says so too.
    let plain = Plain(fake_with_domain());
    assert!(matches!(
        plain.leftovers(DOMAIN).unwrap(),
        LeftoverScan::CannotCheck(_)
    ));
    let r = store.sync(&plain, linear_chain(2, 2)).unwrap();
    assert!(r.warnings.is_empty());
}

// ---------------------------------------------------------------------------
// On qemu:///system: leftovers planted in the daemon's folder of a test
// domain, the way its daemon leaves them.

const CHECKPOINT_DIR: &str = "/var/lib/libvirt/qemu/checkpoint";

/// Plants leftovers in the daemon's folder of a test domain, and removes
/// what is left of them when dropped (a failed test leaves none behind).
#[derive(Default)]
struct Planted(std::cell::RefCell<Vec<PathBuf>>);

impl Planted {
    fn plant(&self, dom: &str, name: &str, content: &str, age: Duration) -> PathBuf {
        let path = Path::new(CHECKPOINT_DIR)
            .join(dom)
            .join(format!("{name}.xml.new"));
        self.0.borrow_mut().push(path.clone());
        std::fs::write(&path, content).unwrap();
        let f = std::fs::File::options().write(true).open(&path).unwrap();
        f.set_modified(SystemTime::now() - age).unwrap();
        path
    }
}

impl Drop for Planted {
    fn drop(&mut self) {
        for p in self.0.borrow().iter() {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[test]
fn planted_leftovers_on_qemu_are_found_and_repaired() {
    let conn = support::system();
    let dom = support::TestDomain::define(&conn, "leftover", 1);
    let backend = LibvirtBackend::connect(support::SYSTEM_URI).unwrap();
    let j = TempJournal::new();
    let store = j.store(1);
    let chain = rel_chain(&dom.name, 3);
    for c in &chain.checkpoints {
        dom.add_bitmap_everywhere(&c.id);
    }
    store.sync(&backend, chain.clone()).unwrap();
    let all = chain.clone().validate().unwrap().defs();
    assert_eq!(leftover_names(&backend, &dom.name), Vec::<String>::new());
    let dir = Path::new(CHECKPOINT_DIR).join(&dom.name);
    let file_of = |name: &str| std::fs::read_to_string(dir.join(format!("{name}.xml"))).unwrap();
    let hour = Duration::from_secs(3600);
    let planted = Planted::default();
    let plant = |dom: &str, name: &str, content: &str, age: Duration| {
        planted.plant(dom, name, content, age)
    };
    // Listed, another definition (as libvirt wrote it, comment and all).
    let c1 = &all[1].name;
    let older = file_of(c1).replace(
        "<creationTime>",
        "<description>older</description><creationTime>",
    );
    plant(&dom.name, c1, &older, hour);
    // Not listed: a whole checkpoint, one cut short, one being written.
    let ghost = file_of(&all[2].name).replace(&all[2].name, "ghost");
    plant(&dom.name, "ghost", &ghost, hour);
    let cut = &ghost[..ghost.len() / 2];
    plant(&dom.name, "cut", cut, hour);
    let young = plant(
        &dom.name,
        "young",
        &ghost.replace("ghost", "young"),
        Duration::ZERO,
    );

    let report = validate(&store, &backend, &dom.name).unwrap();
    let mut found: Vec<(String, PathBuf)> = report
        .of_kind(FindingKind::LibvirtLeftover)
        .map(|f| (f.checkpoint.clone().unwrap(), f.image.clone().unwrap()))
        .collect();
    found.sort();
    let mut want: Vec<(String, PathBuf)> = [c1.as_str(), "cut", "ghost", "young"]
        .iter()
        .map(|n| (n.to_string(), dir.join(format!("{n}.xml.new"))))
        .collect();
    want.sort();
    assert_eq!(found, want, "{report:#?}");
    assert!(report.notes.is_empty(), "{:?}", report.notes);

    let r = store.sync(&backend, chain.clone()).unwrap();
    assert_eq!(r.outcome, Outcome::Unchanged);
    assert!(warned(&r.warnings, c1).contains("rewrote"));
    assert!(warned(&r.warnings, "ghost").ends_with("removed it"));
    assert!(warned(&r.warnings, "cut").ends_with("removed it"));
    assert!(warned(&r.warnings, "young").contains("left alone"));
    assert_eq!(
        leftover_names(&backend, &dom.name),
        vec!["young".to_string()]
    );
    // libvirt's own rewrite replaced c1's file with what it lists.
    assert!(!file_of(c1).contains("older"));
    assert!(same_content(&backend.list(&dom.name).unwrap(), &all));
    // Once it is older than the quiet time, the next sync removes it.
    let f = std::fs::File::options().write(true).open(&young).unwrap();
    f.set_modified(SystemTime::now() - hour).unwrap();
    let r = store.sync(&backend, chain).unwrap();
    assert!(warned(&r.warnings, "young").ends_with("removed it"));
    let report = validate(&store, &backend, &dom.name).unwrap();
    assert_eq!(report.of_kind(FindingKind::LibvirtLeftover).count(), 0);
    assert!(report.notes.is_empty(), "{:?}", report.notes);
    // A leftover that is not this domain's is never removed.
    let outside = ckptstore::Leftover {
        checkpoint: "x".into(),
        path: "/etc/hostname".into(),
        content: None,
        modified: SystemTime::UNIX_EPOCH,
        stale: true,
    };
    let e = backend.remove_leftover(&dom.name, &outside).unwrap_err();
    assert!(e.message.contains("is not a leftover"), "{e:?}");
    assert!(Path::new("/etc/hostname").exists());
}

/// A line of `n` checkpoints of `domain` on its disk `vda`.
fn rel_chain(domain: &str, n: usize) -> ckptstore::Chain {
    let mut c = linear_chain(n, 1);
    c.domain = Some(domain.to_string());
    c.disks = BTreeMap::from([(disk_id(0), "vda".to_string())]);
    c
}
