//! `reclaim` against the real daemon (`qemu:///system`) and real qcow2
//! images: orphan bitmaps added with `qemu-img bitmap --add`, an in-use one
//! left by a writer killed with SIGKILL; the dry run leaves the images
//! byte-identical, `apply` removes exactly those, and `validate` is clean
//! afterwards.

use testkit::qemu;
use testkit::support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};

use chrono::DateTime;
use ckptstore::{
    validate, Backend, BitmapPolicy, Chain, Checkpoint, CheckpointAction, InconsistentReason,
    LibvirtBackend, Store, StoreOptions,
};
use qemu::{info, info_bitmaps, leave_in_use, InUseWriter};
use support::TestDomain;
use uuid::Uuid;

fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// The bitmap names `qemu-img info` lists for an image, sorted.
fn bitmaps_of(image: &Path) -> Vec<String> {
    let mut v: Vec<String> = info_bitmaps(&info(image))
        .into_iter()
        .map(|b| b.0)
        .collect();
    v.sort();
    v
}

/// A line of checkpoints over every disk of `dom`, named `names`.
fn chain(dom: &TestDomain, names: &[String]) -> Chain {
    let disks: BTreeMap<String, String> = dom
        .targets
        .iter()
        .map(|t| (format!("disk-{t}"), t.clone()))
        .collect();
    Chain {
        scope: None,
        vm_id: Uuid::new_v4(),
        domain: Some(dom.name.clone()),
        checkpoints: names
            .iter()
            .enumerate()
            .map(|(i, n)| Checkpoint {
                id: n.clone(),
                parent: i.checked_sub(1).map(|p| names[p].clone()),
                created: DateTime::from_timestamp(1_700_000_000 + 60 * i as i64, 0).unwrap(),
                description: None,
                disks: disks.keys().cloned().collect(),
            })
            .collect(),
        disks,
    }
}

#[test]
fn reclaim_removes_exactly_the_orphan_and_in_use_bitmaps_of_a_shut_off_domain() {
    let dom = TestDomain::define(&support::system(), "reclaim-off", 2);
    let names: Vec<String> = (0..3).map(|i| format!("c{i}")).collect();
    // c1 on vda is left in use by a killed writer; the rest are added after.
    dom.add_bitmap(0, &names[1]);
    leave_in_use(&dom.images[0]);
    for n in [&names[0], &names[2]] {
        dom.add_bitmap(0, n);
    }
    for n in &names {
        dom.add_bitmap(1, n);
    }
    dom.add_bitmap(0, "stray-a");
    dom.add_bitmap(1, "stray-b");
    let journal = tempfile::tempdir().unwrap();
    let store = Store::open_with(
        journal.path().join("journal.db"),
        StoreOptions {
            bitmaps: BitmapPolicy::Ignore,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    let backend = LibvirtBackend::connect(support::SYSTEM_URI).unwrap();
    store.sync(&backend, chain(&dom, &names)).unwrap();
    assert!(!validate(&store, &backend, &dom.name).unwrap().ok);

    // The dry run: the report, and not one byte changed.
    let sums: Vec<String> = dom.images.iter().map(|i| sha256(i)).collect();
    let held = backend.list(&dom.name).unwrap();
    let dry = store.reclaim(&backend, &dom.name, false).unwrap();
    assert_eq!(
        dom.images.iter().map(|i| sha256(i)).collect::<Vec<_>>(),
        sums
    );
    assert_eq!(backend.list(&dom.name).unwrap(), held);
    assert!(!dry.applied && dry.txn.is_none());
    let orphans: Vec<(&str, &str)> = dry
        .orphans
        .iter()
        .map(|b| (b.target.as_str(), b.bitmap.as_str()))
        .collect();
    assert_eq!(orphans, [("vda", "stray-a"), ("vdb", "stray-b")]);
    assert_eq!(dry.inconsistent.len(), 1, "{dry:#?}");
    let bad = &dry.inconsistent[0];
    assert_eq!(
        (bad.target.as_str(), bad.bitmap.as_str(), bad.reason),
        ("vda", "c1", InconsistentReason::InUse)
    );
    assert_eq!(bad.image, dom.images[0]);
    assert_eq!(dry.checkpoints.len(), 1);
    assert_eq!(dry.checkpoints[0].checkpoint, "c1");
    assert_eq!(dry.checkpoints[0].action, CheckpointAction::Degraded);
    assert_eq!(dry.checkpoints[0].disks, ["vda"]);

    // Apply: exactly those bitmaps go; c1 keeps vdb only.
    let done = store.reclaim(&backend, &dom.name, true).unwrap();
    assert!(done.applied && done.txn.is_some(), "{done:#?}");
    assert_eq!(done.orphans, dry.orphans);
    assert_eq!(bitmaps_of(&dom.images[0]), ["c0", "c2"]);
    assert_eq!(bitmaps_of(&dom.images[1]), ["c0", "c1", "c2"]);
    let after = backend.list(&dom.name).unwrap();
    assert_eq!(after.len(), 3);
    assert_eq!(
        after[1]
            .disks
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        ["vdb"]
    );
    let report = validate(&store, &backend, &dom.name).unwrap();
    assert!(report.ok, "{report:#?}");
    // A second reclaim finds nothing.
    let again = store.reclaim(&backend, &dom.name, false).unwrap();
    assert!(
        again.orphans.is_empty() && again.inconsistent.is_empty() && again.checkpoints.is_empty(),
        "{again:#?}"
    );
}

/// On a running domain, libvirt's way: a root checkpoint naming the orphan
/// bitmap is defined, then deleted for real; QEMU drops the bitmap and the
/// image file with it. The checkpoint made while running (its bitmap only
/// in QEMU yet) is kept.
#[test]
fn reclaim_removes_an_orphan_bitmap_of_a_running_domain_through_libvirt() {
    let dom = TestDomain::define(&support::system(), "reclaim-run", 1);
    dom.add_bitmap(0, "stray");
    dom.start();
    let st = Command::new("virsh")
        .args([
            "-c",
            support::SYSTEM_URI,
            "checkpoint-create-as",
            &dom.name,
            "c0",
        ])
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let journal = tempfile::tempdir().unwrap();
    let store = Store::open(journal.path().join("journal.db")).unwrap();
    let backend = LibvirtBackend::connect(support::SYSTEM_URI).unwrap();
    store.import(&backend, &dom.name).unwrap();
    let held = backend.list(&dom.name).unwrap();

    let dry = store.reclaim(&backend, &dom.name, false).unwrap();
    let orphans: Vec<&str> = dry.orphans.iter().map(|b| b.bitmap.as_str()).collect();
    assert_eq!(orphans, ["stray"], "{dry:#?}");
    assert!(
        dry.inconsistent.is_empty() && dry.checkpoints.is_empty(),
        "{dry:#?}"
    );
    assert_eq!(backend.list(&dom.name).unwrap(), held);

    let done = store.reclaim(&backend, &dom.name, true).unwrap();
    assert!(done.applied && done.txn.is_some(), "{done:#?}");
    // A redefine and a real delete.
    assert_eq!(done.libvirt_calls, 2, "{done:#?}");
    assert!(
        bitmaps_of(&dom.images[0]).is_empty(),
        "{:?}",
        bitmaps_of(&dom.images[0])
    );
    assert_eq!(backend.list(&dom.name).unwrap(), held);
    let report = validate(&store, &backend, &dom.name).unwrap();
    assert!(report.ok, "{report:#?}");
    assert_eq!(report.usable.as_deref(), Some("c0"));
}

/// An image another process holds open (QEMU's lock, here `qemu-io`) is
/// refused before any change: exit 2, images and libvirt as they were, no
/// transaction.
#[test]
fn reclaim_refuses_an_image_another_process_holds() {
    let dom = TestDomain::define(&support::system(), "reclaim-held", 1);
    dom.add_bitmap(0, "stray");
    let journal = tempfile::tempdir().unwrap();
    let store = Store::open(journal.path().join("journal.db")).unwrap();
    let backend = LibvirtBackend::connect(support::SYSTEM_URI).unwrap();
    // qemu-io has the image open once it marked the bitmap in use.
    let holder = InUseWriter::start(&dom.images[0]);
    let before = sha256(&dom.images[0]);
    let err = store.reclaim(&backend, &dom.name, true).unwrap_err();
    assert!(
        matches!(err, ckptstore::Error::ImageInUse { txn: None, .. }),
        "{err:?}"
    );
    assert_eq!(err.kind().exit_code(), 2);
    assert_eq!(sha256(&dom.images[0]), before);
    assert!(store
        .history(&dom.name, 10)
        .unwrap()
        .transactions
        .is_empty());
    drop(holder);
}
