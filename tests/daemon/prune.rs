//! `prune` on the real daemon with real qcow2 images: a running TCG domain
//! (libvirt's real delete) and a shut-off one (`qemu-img bitmap --remove`,
//! then a metadata delete); the kept checkpoints pass `REDEFINE_VALIDATE`,
//! the old bitmaps are gone from the images, the next checkpoint hangs off
//! the leaf; an image held by another process is refused, nothing changed.

use std::time::{Duration, Instant};

use testkit::{qemu, support};

use ckptstore::testing::render_checkpoint;
use ckptstore::{
    Backend, CheckpointDef, Error, ErrorKind, LibvirtBackend, Retention, Store, TxnState,
};
use support::TestDomain;

fn images(dom: &TestDomain) -> Vec<Vec<String>> {
    dom.images
        .iter()
        .map(|p| {
            let mut v: Vec<String> = qemu::info_bitmaps(&qemu::info(p))
                .into_iter()
                .map(|b| b.0)
                .collect();
            v.sort();
            v
        })
        .collect()
}

fn names(defs: &[CheckpointDef]) -> Vec<String> {
    defs.iter().map(|d| d.name.clone()).collect()
}

fn create(backend: &LibvirtBackend, dom: &TestDomain, name: &str) -> CheckpointDef {
    backend
        .create_checkpoint(
            &dom.name,
            &format!("<domaincheckpoint><name>{name}</name></domaincheckpoint>"),
        )
        .unwrap()
}

/// The kept checkpoints pass libvirt's REDEFINE_VALIDATE (running domain).
fn assert_validate(backend: &LibvirtBackend, dom: &TestDomain) {
    for d in backend.list(&dom.name).unwrap() {
        backend
            .redefine(&dom.name, &render_checkpoint(&d), true)
            .unwrap_or_else(|e| panic!("{} fails REDEFINE_VALIDATE: {e}", d.name));
    }
}

fn store(dir: &tempfile::TempDir) -> Store {
    Store::open(dir.path().join("journal.db")).unwrap()
}

#[test]
fn keep_two_on_a_running_domain() {
    let dom = TestDomain::define(&support::system(), "prune-on", 2);
    let backend = LibvirtBackend::connect(support::SYSTEM_URI).unwrap();
    dom.start();
    let all: Vec<String> = (0..5).map(|i| format!("c{i}")).collect();
    for n in &all {
        create(&backend, &dom, n);
    }
    assert_eq!(running(&dom), vec![all.clone(); 2]);
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir);
    store.import(&backend, &dom.name).unwrap();
    let r = store
        .prune(&backend, &dom.name, Retention::Keep(2), true)
        .unwrap();
    assert_eq!(r.pruned, all[..3]);
    assert_eq!(r.kept, all[3..]);
    assert_eq!(r.libvirt_calls, 3);
    let left = backend.list(&dom.name).unwrap();
    assert_eq!(names(&left), all[3..]);
    assert_eq!(left[0].parent, None);
    assert_eq!(running(&dom), vec![all[3..].to_vec(); 2]);
    assert_validate(&backend, &dom);
    let committed = store.committed(&dom.name).unwrap().unwrap();
    assert_eq!(names(&committed.defs), all[3..]);
    assert_eq!(create(&backend, &dom, "c5").parent.as_deref(), Some("c4"));
    // QEMU writes the bitmaps into the images when it closes them.
    dom.domain().destroy().unwrap();
    let left = vec!["c3".to_string(), "c4".into(), "c5".into()];
    assert_eq!(images(&dom), vec![left; 2]);
}

/// What the running QEMU holds per image.
fn running(dom: &TestDomain) -> Vec<Vec<String>> {
    dom.images
        .iter()
        .map(|p| qemu::running_bitmaps(support::SYSTEM_URI, &dom.name, p))
        .collect()
}

#[test]
fn keep_two_on_a_shut_off_domain_with_qemu_img() {
    let dom = TestDomain::define(&support::system(), "prune-off", 2);
    let backend = LibvirtBackend::connect(support::SYSTEM_URI).unwrap();
    dom.start();
    let all: Vec<String> = (0..5).map(|i| format!("c{i}")).collect();
    for n in &all {
        create(&backend, &dom, n);
    }
    dom.domain().destroy().unwrap();
    // The killed QEMU may hold its images' locks a moment longer.
    for image in &dom.images {
        wait_released(image);
    }
    let dir = tempfile::tempdir().unwrap();
    let store = store(&dir);
    store.import(&backend, &dom.name).unwrap();

    // Another process holds one image: refused before any change.
    {
        let _held = qemu::ImageHolder::hold(&dom.images[1]);
        let e = store
            .prune(&backend, &dom.name, Retention::Keep(2), true)
            .unwrap_err();
        assert!(matches!(e, Error::ImageInUse { txn: None, .. }), "{e}");
        assert_eq!(e.kind(), ErrorKind::BadInput);
    }
    assert_eq!(names(&backend.list(&dom.name).unwrap()), all);
    assert_eq!(images(&dom), vec![all.clone(); 2]);
    assert!(store.status(None).unwrap().incomplete.is_empty());

    let r = store
        .prune(&backend, &dom.name, Retention::Keep(2), true)
        .unwrap();
    assert_eq!(r.bitmaps_removed.len(), 6);
    assert_eq!(r.libvirt_calls, 3);
    assert_eq!(names(&backend.list(&dom.name).unwrap()), all[3..]);
    assert_eq!(images(&dom), vec![all[3..].to_vec(); 2]);
    let last = &store.history(&dom.name, 1).unwrap().transactions[0];
    assert_eq!(last.state, TxnState::Committed);
    dom.start();
    assert_validate(&backend, &dom);
    assert_eq!(create(&backend, &dom, "c5").parent.as_deref(), Some("c4"));
}

/// Wait until no process holds `image` (a writer is not refused).
fn wait_released(image: &std::path::Path) {
    let start = Instant::now();
    while String::from_utf8_lossy(
        &qemu::qemu_img_output(&[
            "bitmap",
            "--remove",
            image.to_str().unwrap(),
            "ckptstore-holder-probe",
        ])
        .stderr,
    )
    .contains("lock")
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{} stays locked",
            image.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
