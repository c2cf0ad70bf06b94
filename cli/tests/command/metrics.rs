//! `ckptstore metrics` as a real binary, on a journal made through the
//! library on the fake backend (`metrics` reads the journal only, libvirt
//! is never asked): the snapshot of its text and JSON, `--textfile`
//! written by rename (mode 0644, no temporary file left, a hard link to the
//! old file keeps the old text), and the exit code of each path it cannot
//! write.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use ckptstore::testing::{validate_with, FakeBackend, Fault, Op, Phase, Seams};
use ckptstore::{BackendErrorKind, BitmapPolicy, Chain, Owner, Store, StoreOptions};
use testkit::sim::{linear_chain, quiet_crashes, run_crashing, FakeImages, SimCrash};

use crate::snap::Snap;

const VM: &str = "vm-metrics";
const ODD: &str = "odd \"name\" \\ here";

fn chain(domain: &str, n: usize) -> Chain {
    let mut c = linear_chain(n, 2);
    c.domain = Some(domain.to_string());
    c
}

fn store(db: &Path, owner: u32, hook: Option<ckptstore::testing::Hook>) -> Store {
    Store::open_with(
        db,
        StoreOptions {
            bitmaps: BitmapPolicy::Ignore,
            seams: Seams {
                owner: Some(Owner {
                    pid: owner,
                    boot_id: "metrics-test".into(),
                    start: u64::from(owner),
                }),
                liveness: Some(Arc::new(|_| false)),
                hook,
                ..Seams::default()
            },
            ..StoreOptions::default()
        },
    )
    .unwrap()
}

/// A journal with two domains: `vm-metrics` synced twice (once with
/// nothing to do), a sync rolled back, validated with one missing bitmap;
/// the odd name with an interrupted sync whose owner is dead.
fn known_journal(db: &Path) {
    let fake = Arc::new(FakeBackend::new());
    fake.define_domain(
        VM,
        "93a5c045-6457-2c09-e56c-927cdf34e178",
        &["sda", "sdb"],
        false,
    );
    fake.define_domain(
        ODD,
        "93a5c045-6457-2c09-e56c-927cdf34e179",
        &["sda", "sdb"],
        false,
    );
    let s = store(db, 1, None);
    s.sync(&*fake, chain(VM, 3)).unwrap();
    s.sync(&*fake, chain(VM, 3)).unwrap();
    fake.inject(Fault {
        op: Some(Op::Redefine),
        nth: 1,
        phase: Phase::BeforeEffect,
        kind: BackendErrorKind::InvalidArgument,
        forever: false,
    });
    s.sync(&*fake, chain(VM, 4)).unwrap_err();
    for c in fake.peek(VM).iter().skip(1) {
        for disk in ["sda", "sdb"] {
            fake.add_bitmap(VM, disk, &c.name);
        }
    }
    let r = validate_with(&s, &*fake, VM, &FakeImages(fake.clone())).unwrap();
    assert_eq!(r.findings.len(), 2, "the first checkpoint's two bitmaps");
    drop(s);
    quiet_crashes();
    let hook: ckptstore::testing::Hook = Arc::new(|p| {
        if p == "step.recorded" {
            std::panic::panic_any(SimCrash);
        }
    });
    let crashing = store(db, 2, Some(hook));
    assert!(run_crashing(|| crashing.sync(&*fake, chain(ODD, 2))).is_none());
}

#[test]
fn metrics_of_a_known_journal() {
    let mut s = Snap::new("metrics");
    known_journal(&s.db());
    let text = s.run(&["metrics"]);
    assert_eq!((text.code, text.stderr.as_str()), (0, ""));
    assert!(
        text.stdout
            .contains("ckptstore_checkpoints{domain=\"vm-metrics\"} 3\n"),
        "{}",
        text.stdout
    );
    assert!(text.stdout.contains(
        "ckptstore_open_transactions{domain=\"odd \\\"name\\\" \\\\ here\",owner_alive=\"false\"} 1\n"
    ));
    assert!(text.stdout.contains(
        "ckptstore_transactions_total{domain=\"vm-metrics\",kind=\"sync\",outcome=\"committed\"} 2\n"
    ));
    assert!(text.stdout.contains(
        "ckptstore_transactions_total{domain=\"vm-metrics\",kind=\"sync\",outcome=\"rolled_back\"} 1\n"
    ));
    assert!(text.stdout.contains(
        "ckptstore_validate_findings{domain=\"vm-metrics\",kind=\"missing_bitmap\"} 2\n"
    ));
    let json = s.run(&["metrics", "--json"]);
    assert_eq!(json.code, 0);
    let doc: ckptstore::Metrics = serde_json::from_str(&json.stdout).unwrap();
    assert_eq!(
        doc.to_prometheus(),
        text.stdout,
        "the text is the document's"
    );

    // The textfile holds exactly what stdout shows, and only --json prints.
    let prom = s.dir().join("ckptstore.prom");
    let r = s.run(&["metrics", "--textfile", &prom.display().to_string()]);
    assert_eq!((r.code, r.stdout.as_str(), r.stderr.as_str()), (0, "", ""));
    assert_eq!(std::fs::read_to_string(&prom).unwrap(), text.stdout);
    s.check();
}

#[test]
fn the_textfile_is_replaced_by_a_rename_with_mode_0644() {
    let mut s = Snap::new("metrics_textfile");
    known_journal(&s.db());
    let dir = s.dir().join("textfile");
    std::fs::create_dir(&dir).unwrap();
    let prom = dir.join("ckptstore.prom");
    std::fs::write(&prom, "old\n").unwrap();
    std::fs::set_permissions(&prom, std::fs::Permissions::from_mode(0o600)).unwrap();
    // A second name for the old file: a rename leaves it as it was, a
    // rewrite in place would change it.
    let keep = s.dir().join("old-link");
    std::fs::hard_link(&prom, &keep).unwrap();
    let old_inode = std::fs::metadata(&prom).unwrap().ino();

    let r = s.run(&[
        "metrics",
        "--textfile",
        &prom.display().to_string(),
        "--json",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let doc: ckptstore::Metrics = serde_json::from_str(&r.stdout).unwrap();
    let meta = std::fs::metadata(&prom).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o644);
    assert_ne!(meta.ino(), old_inode, "a new file took the name");
    assert_eq!(std::fs::read_to_string(&keep).unwrap(), "old\n");
    assert_eq!(std::fs::read_to_string(&prom).unwrap(), doc.to_prometheus());
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["ckptstore.prom"], "no temporary file is left");

    // A relative path writes in the current folder.
    let out = std::process::Command::new(crate::snap::BIN)
        .current_dir(&dir)
        .args([
            "--db",
            &s.db().display().to_string(),
            "metrics",
            "--textfile",
            "rel.prom",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(
        std::fs::read_to_string(dir.join("rel.prom")).unwrap(),
        doc.to_prometheus()
    );
}

#[test]
fn a_textfile_that_cannot_be_written_exits_2_and_leaves_everything_as_it_was() {
    let mut s = Snap::new("metrics_unwritable");
    known_journal(&s.db());
    let file = s.write("a-file", "not a folder\n");
    let dir = s.dir().join("folder");
    std::fs::create_dir(&dir).unwrap();
    let before = std::fs::read(s.db()).unwrap();
    for path in [
        s.dir().join("missing/ckptstore.prom"),
        file.join("ckptstore.prom"),
        dir.clone(),
    ] {
        let r = s.run(&["metrics", "--textfile", &path.display().to_string()]);
        assert_eq!(r.code, 2, "{}: {}", path.display(), r.stderr);
        assert!(r.stdout.is_empty());
        assert_eq!(r.stderr.lines().count(), 1);
        assert!(r
            .stderr
            .starts_with("ckptstore: cannot write the metrics to "));
    }
    let r = s.run(&[
        "metrics",
        "--json",
        "--textfile",
        &dir.display().to_string(),
    ]);
    assert_eq!(r.code, 2);
    assert_eq!(r.json()["error"]["kind"], "bad_input");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "not a folder\n");
    assert_eq!(
        std::fs::read(s.db()).unwrap(),
        before,
        "the journal is only read"
    );
    // A journal that cannot be used: exit 5, as every command.
    let r = s.run(&["--db", &dir.display().to_string(), "metrics"]);
    assert_eq!(r.code, 5, "{}", r.stderr);
    s.check();
}
