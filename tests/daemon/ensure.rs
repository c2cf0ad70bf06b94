//! `ensure` on a real running QEMU (TCG) domain with two qcow2 disks:
//! checkpoints made for real (so QEMU holds their bitmaps), libvirt's
//! metadata lost, one disk's bitmap of the base removed; `ensure` reports
//! the per-disk modes, a push-mode incremental backup from the ensured base
//! completes, and a second `ensure` makes no libvirt call.

use testkit::support;

use std::process::Command;
use std::time::{Duration, Instant};

use ckptstore::{Backend, BitmapPolicy, DiskMode, LibvirtBackend, Store, StoreOptions};
use support::TestDomain;

fn virsh(args: &[&str]) -> String {
    let out = Command::new("virsh")
        .args(["-c", support::SYSTEM_URI])
        .args(args)
        .output()
        .expect("virsh");
    assert!(
        out.status.success(),
        "virsh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn ensure_then_an_incremental_backup_from_the_base_on_a_running_domain() {
    let dom = TestDomain::define(&support::system(), "ensure-run", 2);
    let backend = LibvirtBackend::connect(support::SYSTEM_URI).unwrap();
    dom.start();
    for name in ["k0", "k1", "k2"] {
        backend
            .create_checkpoint(
                &dom.name,
                &format!("<domaincheckpoint><name>{name}</name></domaincheckpoint>"),
            )
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let opts = StoreOptions {
        bitmaps: BitmapPolicy::Degrade,
        ..StoreOptions::default()
    };
    let store = Store::open_with(dir.path().join("journal.db"), opts).unwrap();
    store.import(&backend, &dom.name).unwrap();

    // Stopped (QEMU writes its bitmaps back), libvirt's metadata lost, and
    // vdb's bitmap of k2 removed; then started again.
    dom.domain().destroy().unwrap();
    for name in ["k2", "k1", "k0"] {
        backend.delete(&dom.name, name).unwrap();
    }
    let out = Command::new("qemu-img")
        .args(["bitmap", "--remove"])
        .arg(&dom.images[1])
        .arg("k2")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dom.start();
    assert!(backend.list(&dom.name).unwrap().is_empty());

    let r = store.ensure(&backend, &dom.name, "k2", None).unwrap();
    println!("ensure: {r:?}");
    assert_eq!(
        r.disks
            .iter()
            .map(|d| (d.target.as_str(), d.mode))
            .collect::<Vec<_>>(),
        vec![("vda", DiskMode::Incremental), ("vdb", DiskMode::Full)]
    );
    assert!(
        r.disks[1]
            .reason
            .as_deref()
            .is_some_and(|w| w.contains("REDEFINE_VALIDATE")),
        "{r:?}"
    );
    assert!(r.redefined);
    let held = backend.list(&dom.name).unwrap();
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].parent, None);
    assert_eq!(
        held[0].disks.keys().map(String::as_str).collect::<Vec<_>>(),
        vec!["vda"]
    );

    // A push-mode incremental backup from k2 of the disk that has its
    // bitmap, with a new checkpoint.
    let target = dir.path().join("vda.inc.qcow2");
    let backup_xml = dir.path().join("backup.xml");
    std::fs::write(
        &backup_xml,
        format!(
            "<domainbackup mode='push'><incremental>k2</incremental><disks>\
             <disk name='vda' backup='yes' type='file'><target file='{}'/><driver type='qcow2'/></disk>\
             <disk name='vdb' backup='no'/></disks></domainbackup>",
            target.display()
        ),
    )
    .unwrap();
    let ckpt_xml = dir.path().join("checkpoint.xml");
    std::fs::write(
        &ckpt_xml,
        "<domaincheckpoint><name>k3</name></domaincheckpoint>",
    )
    .unwrap();
    let started = Instant::now();
    virsh(&[
        "backup-begin",
        &dom.name,
        &backup_xml.display().to_string(),
        &ckpt_xml.display().to_string(),
    ]);
    loop {
        let info = virsh(&["domjobinfo", &dom.name]);
        if info.contains("None") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{info}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let done = virsh(&["domjobinfo", &dom.name, "--completed"]);
    assert!(done.contains("Completed"), "{done}");
    assert!(target.exists());
    // The backup's checkpoint hangs off the ensured base.
    let k3 = backend
        .list(&dom.name)
        .unwrap()
        .into_iter()
        .find(|d| d.name == "k3")
        .unwrap();
    assert_eq!(k3.parent.as_deref(), Some("k2"));

    // Again: libvirt holds k2 as computed; no call.
    let again = store.ensure(&backend, &dom.name, "k2", None).unwrap();
    assert_eq!((again.libvirt_calls, again.redefined), (0, false));
    assert_eq!(
        again.disks.iter().map(|d| d.mode).collect::<Vec<_>>(),
        vec![DiskMode::Incremental, DiskMode::Full]
    );
}
