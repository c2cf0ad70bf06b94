//! REDEFINE_VALIDATE against a real running QEMU (TCG) domain: a real
//! checkpoint validates, one whose bitmap is missing is inconsistent, and a
//! shut-off domain cannot validate at all.

use testkit::support;

use ckptstore::testing::render_checkpoint;
use ckptstore::{Backend, BackendErrorKind as K, CheckpointDef, LibvirtBackend};
use support::TestDomain;

#[test]
fn validate_on_a_running_domain() {
    let dom = TestDomain::define(&support::system(), "validate", 1);
    let backend = LibvirtBackend::connect(support::SYSTEM_URI).unwrap();

    // Shut off: a redefine is fine, validating it is not.
    let before = CheckpointDef {
        name: "before".into(),
        parent: None,
        creation_time: 1_700_000_000,
        description: None,
        disks: [("vda".to_string(), "before".to_string())].into(),
    };
    backend
        .redefine(&dom.name, &render_checkpoint(&before), false)
        .unwrap();
    let e = backend
        .redefine(&dom.name, &render_checkpoint(&before), true)
        .unwrap_err();
    assert_eq!((e.kind, e.code), (K::NotRunning, 55), "{e:?}");
    assert_eq!(
        e.message,
        "Requested operation is not valid: domain is not running"
    );

    dom.start();
    assert!(backend.domain_info(&dom.name).unwrap().running);

    // A real checkpoint: QEMU adds the bitmap, libvirt takes the current
    // checkpoint ("before", the first one redefined) as its parent.
    let real = backend
        .create_checkpoint(
            &dom.name,
            "<domaincheckpoint><name>real</name></domaincheckpoint>",
        )
        .unwrap();
    assert_eq!(real.parent.as_deref(), Some("before"));
    assert_eq!(real.disks, [("vda".to_string(), "real".to_string())].into());
    assert_eq!(backend.checkpoint(&dom.name, "real").unwrap(), real);

    // Redefining it as libvirt describes it, with validation: accepted.
    backend
        .redefine(&dom.name, &render_checkpoint(&real), true)
        .unwrap();
    assert_eq!(
        backend.list(&dom.name).unwrap(),
        vec![before.clone(), real.clone()]
    );

    // A checkpoint whose bitmap is in no image: inconsistent, and nothing
    // is defined. "before" itself has no bitmap either.
    let ghost = CheckpointDef {
        name: "ghost".into(),
        parent: Some("real".into()),
        creation_time: real.creation_time + 1,
        description: None,
        disks: [("vda".to_string(), "ghost".to_string())].into(),
    };
    for def in [&ghost, &before] {
        let e = backend
            .redefine(&dom.name, &render_checkpoint(def), true)
            .unwrap_err();
        assert_eq!((e.kind, e.code), (K::Inconsistent, 109), "{e:?}");
        assert_eq!(
            e.message,
            format!(
                "checkpoint inconsistent: missing or broken bitmap '{}' for disk 'vda'",
                def.name
            )
        );
    }
    assert_eq!(backend.list(&dom.name).unwrap(), vec![before, real]);
    // Without validation libvirt takes it on trust.
    backend
        .redefine(&dom.name, &render_checkpoint(&ghost), false)
        .unwrap();
    assert_eq!(backend.list(&dom.name).unwrap().len(), 3);
}

/// The real-world path: an operator skips the only disk
/// (`virsh checkpoint-create-as D k1 --diskspec vda,checkpoint=no`), so
/// libvirt describes k1 with every disk `checkpoint='no'`; the store
/// imports it, and must be able to redefine it again — when the metadata
/// is lost and the chain re-applied, and when `validate` checks the running
/// domain (each redefined with `REDEFINE_VALIDATE`).
#[test]
fn a_checkpoint_without_bitmaps_is_imported_and_redefined_again() {
    let dom = TestDomain::define(&support::system(), "nobitmap", 1);
    let backend = LibvirtBackend::connect(support::SYSTEM_URI).unwrap();
    dom.start();
    let virsh = |args: &[&str]| {
        let out = std::process::Command::new("virsh")
            .args(["-c", support::SYSTEM_URI])
            .args(args)
            .output()
            .expect("virsh");
        assert!(
            out.status.success(),
            "virsh {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    virsh(&[
        "checkpoint-create-as",
        &dom.name,
        "k1",
        "--diskspec",
        "vda,checkpoint=no",
    ]);
    virsh(&["checkpoint-create-as", &dom.name, "k2"]);
    let listed = backend.list(&dom.name).unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!((listed[0].name.as_str(), listed[0].disks.len()), ("k1", 0));
    assert_eq!(listed[1].parent.as_deref(), Some("k1"));
    assert_eq!(
        listed[1].disks,
        [("vda".to_string(), "k2".to_string())].into()
    );

    let dir = tempfile::tempdir().unwrap();
    let store = ckptstore::Store::open(dir.path().join("journal.db")).unwrap();
    store.import(&backend, &dom.name).unwrap();
    // libvirt loses the metadata (a transient domain recreated): re-apply.
    for d in listed.iter().rev() {
        backend.delete(&dom.name, &d.name).unwrap();
    }
    let r = store
        .resync(&backend, &dom.name)
        .unwrap_or_else(|e| panic!("re-apply: {e}"));
    assert_eq!(r.outcome, ckptstore::Outcome::Committed);
    assert_eq!(r.redefined, ["k1", "k2"]);
    assert_eq!(backend.list(&dom.name).unwrap(), listed);

    let report = ckptstore::validate(&store, &backend, &dom.name)
        .unwrap_or_else(|e| panic!("validate: {e}"));
    assert!(report.running);
    assert_eq!(report.libvirt_validations, 2);
    assert!(report.ok, "{report:#?}");
    assert_eq!(report.usable.as_deref(), Some("k2"));
}
