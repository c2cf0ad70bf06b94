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

/// `virsh checkpoint-dumpxml D NAME`: the checkpoint's XML as libvirt holds
/// it, `<domain>` included (without the line end virsh adds).
fn dumpxml(domain: &str, name: &str) -> String {
    let out = std::process::Command::new("virsh")
        .args([
            "-c",
            support::SYSTEM_URI,
            "checkpoint-dumpxml",
            domain,
            name,
        ])
        .output()
        .expect("virsh");
    assert!(
        out.status.success(),
        "virsh checkpoint-dumpxml {domain} {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut xml = String::from_utf8(out.stdout).unwrap();
    assert_eq!(xml.pop(), Some('\n'));
    xml
}

/// Every checkpoint's XML as libvirt holds it, by name.
fn dump_all(backend: &LibvirtBackend, domain: &str) -> Vec<(String, String)> {
    backend
        .list(domain)
        .unwrap()
        .into_iter()
        .map(|d| {
            let xml = dumpxml(domain, &d.name);
            (d.name, xml)
        })
        .collect()
}

/// Real checkpoints, as a backup makes them: libvirt stores each with the
/// domain's definition.
fn create_real(backend: &LibvirtBackend, domain: &str, names: &[&str]) {
    for name in names {
        backend
            .create_checkpoint(
                domain,
                &format!("<domaincheckpoint><name>{name}</name></domaincheckpoint>"),
            )
            .unwrap();
    }
}

/// A backend that lacks the per-disk check ([`Backend::bitmap_states`]
/// left to its provided answer, `Unsupported`), as a backend of another
/// maker may: validate then has libvirt check each checkpoint with
/// `REDEFINE_VALIDATE` of exactly the XML libvirt holds.
struct WholeCheckpointOnly<'a>(&'a LibvirtBackend);

impl Backend for WholeCheckpointOnly<'_> {
    fn list(&self, domain: &str) -> Result<Vec<CheckpointDef>, ckptstore::BackendError> {
        self.0.list(domain)
    }
    fn redefine(
        &self,
        domain: &str,
        xml: &str,
        validate: bool,
    ) -> Result<(), ckptstore::BackendError> {
        self.0.redefine(domain, xml, validate)
    }
    fn delete(&self, domain: &str, name: &str) -> Result<(), ckptstore::BackendError> {
        self.0.delete(domain, name)
    }
    fn domain_info(&self, domain: &str) -> Result<ckptstore::DomainInfo, ckptstore::BackendError> {
        self.0.domain_info(domain)
    }
    fn describe(&self) -> String {
        self.0.describe()
    }
    fn checkpoint_xml(&self, domain: &str, name: &str) -> Result<String, ckptstore::BackendError> {
        self.0.checkpoint_xml(domain, name)
    }
}

/// The first complaint: `validate` of a running domain rewrote
/// libvirt's checkpoint XML with the minimal form, dropping the `<domain>`
/// its creator stored (57 lines became 13). Now every checkpoint's XML is
/// byte for byte what it was, and libvirt's hidden current checkpoint is
/// where it was — with the per-disk check, and with the whole-checkpoint
/// `REDEFINE_VALIDATE` a backend without it falls back to.
#[test]
fn validate_leaves_libvirts_checkpoint_xml_as_it_was() {
    let dom = TestDomain::define(&support::system(), "v-keepxml", 2);
    let backend = LibvirtBackend::connect(support::SYSTEM_URI).unwrap();
    dom.start();
    create_real(&backend, &dom.name, &["k0", "k1", "k2"]);
    let before = dump_all(&backend, &dom.name);
    assert_eq!(before.len(), 3);
    for (name, xml) in &before {
        assert!(
            xml.contains("<domain type='qemu'>") && xml.lines().count() > 40,
            "{name}: libvirt stores the domain with a checkpoint it made:\n{xml}"
        );
        assert_eq!(&backend.checkpoint_xml(&dom.name, name).unwrap(), xml);
    }
    let dir = tempfile::tempdir().unwrap();
    let store = ckptstore::Store::open(dir.path().join("journal.db")).unwrap();
    store.import(&backend, &dom.name).unwrap();

    let report = ckptstore::validate(&store, &backend, &dom.name)
        .unwrap_or_else(|e| panic!("validate: {e}"));
    assert!(report.running && report.ok, "{report:#?}");
    assert_eq!(report.usable.as_deref(), Some("k2"));
    let after = dump_all(&backend, &dom.name);
    for ((name, was), (_, is)) in before.iter().zip(&after) {
        assert_eq!(
            was,
            is,
            "validate changed checkpoint {name}'s XML ({} lines, now {})",
            was.lines().count(),
            is.lines().count()
        );
    }

    let whole = WholeCheckpointOnly(&backend);
    let report = ckptstore::validate(&store, &whole, &dom.name)
        .unwrap_or_else(|e| panic!("validate without the per-disk check: {e}"));
    assert!(report.running && report.ok, "{report:#?}");
    assert_eq!(report.libvirt_validations, 3);
    assert_eq!(dump_all(&backend, &dom.name), before);

    // The hidden current checkpoint is still the leaf: a backup's next
    // checkpoint hangs off it.
    let next = backend
        .create_checkpoint(
            &dom.name,
            "<domaincheckpoint><name>k3</name></domaincheckpoint>",
        )
        .unwrap();
    assert_eq!(next.parent.as_deref(), Some("k2"));
}

/// The second complaint: on a running domain `validate` reported
/// only the first bad disk of each checkpoint (libvirt's
/// `REDEFINE_VALIDATE` stops there). The same damage — bitmaps removed
/// with `qemu-img bitmap --remove` on both disks, across several
/// checkpoints — must give the same findings shut off and running.
#[test]
fn a_running_domain_reports_every_broken_disk() {
    let dom = TestDomain::define(&support::system(), "v-everydisk", 2);
    let backend = LibvirtBackend::connect(support::SYSTEM_URI).unwrap();
    dom.start();
    let names = ["k0", "k1", "k2", "k3"];
    create_real(&backend, &dom.name, &names);
    // A clean stop: QEMU writes every bitmap back to the images.
    dom.domain().destroy().unwrap();
    let damage = [("k1", 0), ("k1", 1), ("k2", 0), ("k2", 1), ("k3", 1)];
    for (bitmap, disk) in damage {
        let out = std::process::Command::new("qemu-img")
            .args(["bitmap", "--remove"])
            .arg(&dom.images[disk])
            .arg(bitmap)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let store = ckptstore::Store::open(dir.path().join("journal.db")).unwrap();
    store.import(&backend, &dom.name).unwrap();
    let findings = |r: &ckptstore::Report| {
        let mut f: Vec<(ckptstore::FindingKind, String, String)> = r
            .findings
            .iter()
            .map(|f| {
                (
                    f.kind,
                    f.checkpoint.clone().unwrap_or_default(),
                    f.disk.clone().unwrap_or_default(),
                )
            })
            .collect();
        f.sort();
        f
    };
    let expected: Vec<(ckptstore::FindingKind, String, String)> = damage
        .iter()
        .map(|(b, d)| {
            (
                ckptstore::FindingKind::MissingBitmap,
                b.to_string(),
                dom.targets[*d].clone(),
            )
        })
        .collect();

    let off = ckptstore::validate(&store, &backend, &dom.name).unwrap();
    assert!(!off.running);
    assert_eq!(findings(&off), expected, "{off:#?}");
    assert_eq!(off.usable.as_deref(), Some("k0"));

    dom.start();
    let before = dump_all(&backend, &dom.name);
    let on = ckptstore::validate(&store, &backend, &dom.name).unwrap();
    assert!(on.running);
    println!(
        "shut off: {} findings; running: {} findings, {} libvirt checks",
        off.findings.len(),
        on.findings.len(),
        on.libvirt_validations
    );
    assert_eq!(findings(&on), findings(&off), "{on:#?}");
    assert_eq!(on.usable, off.usable);
    assert_eq!(dump_all(&backend, &dom.name), before);

    // What each way of asking costs, per checkpoint (printed for TESTING.md).
    let rounds = 10;
    let time = |f: &dyn Fn()| {
        let t = std::time::Instant::now();
        for _ in 0..rounds {
            f();
        }
        t.elapsed().as_secs_f64() * 1000.0 / f64::from(rounds)
    };
    let per_disk = time(&|| {
        for n in names {
            backend.bitmap_states(&dom.name, n).unwrap();
        }
    }) / names.len() as f64;
    let xml = backend.checkpoint_xml(&dom.name, "k0").unwrap();
    let whole = time(&|| backend.redefine(&dom.name, &xml, true).unwrap());
    let read = time(&|| {
        backend.checkpoint_xml(&dom.name, "k0").unwrap();
    });
    println!(
        "per checkpoint: bitmap_states {per_disk:.1} ms; REDEFINE_VALIDATE of the full XML {whole:.1} ms; \
         reading the full XML {read:.1} ms"
    );
    assert_eq!(dump_all(&backend, &dom.name), before);
    // Nothing left in the images either: stopped again, the same findings
    // (a bitmap left behind would be an orphan).
    dom.domain().destroy().unwrap();
    let again = ckptstore::validate(&store, &backend, &dom.name).unwrap();
    assert_eq!(findings(&again), expected, "{again:#?}");
}

/// A same-content redefine (one that only moves libvirt's hidden current
/// checkpoint back to the leaf) writes libvirt's own XML back, `<domain>`
/// included: every checkpoint libvirt keeps has its XML byte for byte.
#[test]
fn a_same_content_redefine_keeps_libvirts_own_xml() {
    let conn = support::system();
    let dom = TestDomain::define(&conn, "run-forced", 1);
    dom.start();
    let backend = LibvirtBackend::connect(support::SYSTEM_URI).unwrap();
    let name = dom.name.as_str();
    // c0 <- {a, c1 <- c2}, real checkpoints: a is put back as a side
    // branch once c1 and c2 exist.
    create_real(&backend, name, &["c0", "a"]);
    let a = dumpxml(name, "a");
    backend.delete(name, "a").unwrap();
    create_real(&backend, name, &["c1", "c2"]);
    backend.redefine(name, &a, false).unwrap();
    let before = dump_all(&backend, name);
    assert_eq!(before.len(), 4);
    assert!(before.iter().all(|(_, xml)| xml.contains("<domain")));

    let dir = tempfile::tempdir().unwrap();
    let store = ckptstore::Store::open(dir.path().join("journal.db")).unwrap();
    store.import(&backend, name).unwrap();
    // The chain drops the side branch: libvirt's checkpoints branch, so
    // the current checkpoint may be none (as after a daemon restart), and
    // the plan moves it to c2 with a same-content redefine.
    let mut chain = store.export(&backend, name).unwrap();
    chain.checkpoints.retain(|c| c.id != "a");
    let plan = store.plan(&backend, chain.clone()).unwrap();
    assert!(
        plan.steps.iter().any(|s| matches!(
            s,
            ckptstore::PlanStep::Redefine { forced: true, checkpoint, .. } if checkpoint == "c2"
        )),
        "{plan:#?}"
    );
    store.sync(&backend, chain).unwrap();
    let after = dump_all(&backend, name);
    assert_eq!(after.len(), 3);
    for (n, xml) in &after {
        let was = &before.iter().find(|(m, _)| m == n).unwrap().1;
        assert_eq!(xml, was, "checkpoint {n}'s XML changed");
    }
}
