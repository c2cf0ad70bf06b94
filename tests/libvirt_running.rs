//! REDEFINE_VALIDATE against a real running QEMU (TCG) domain: a real
//! checkpoint validates, one whose bitmap is missing is inconsistent, and a
//! shut-off domain cannot validate at all.

use testkit::support;

use ckptstore::xml::render_checkpoint;
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
