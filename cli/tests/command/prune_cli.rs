//! `ckptstore prune` as a real binary on a shut-off domain of
//! `qemu:///system` with real qcow2 images and bitmaps: the dry run and the
//! apply (human and JSON, snapshots), the bitmaps gone from the images,
//! and every refusal's exit code, nothing changed.

use chrono::DateTime;
use ckptstore::{Backend, Chain, Checkpoint, LibvirtBackend};
use testkit::qemu;
use testkit::support::{self, TestDomain, SYSTEM_URI};
use uuid::Uuid;

use crate::snap::Snap;

fn ckpt_id(i: usize) -> String {
    Uuid::from_u128(0xc4e0_0000 + i as u128).to_string()
}

/// A line of `n` hourly checkpoints over the domain's disks.
fn chain(dom: &TestDomain, n: usize) -> Chain {
    Chain {
        scope: None,
        vm_id: Uuid::parse_str(&dom.uuid).unwrap(),
        domain: Some(dom.name.clone()),
        disks: dom.targets.iter().map(|t| (t.clone(), t.clone())).collect(),
        checkpoints: (0..n)
            .map(|i| Checkpoint {
                id: ckpt_id(i),
                parent: i.checked_sub(1).map(ckpt_id),
                created: DateTime::from_timestamp(1_700_000_000 + i as i64 * 3600, 0).unwrap(),
                description: None,
                disks: dom.targets.clone(),
            })
            .collect(),
    }
}

fn names(dom: &TestDomain) -> Vec<String> {
    LibvirtBackend::connect(SYSTEM_URI)
        .unwrap()
        .list(&dom.name)
        .unwrap()
        .into_iter()
        .map(|d| d.name)
        .collect()
}

fn image_bitmaps(dom: &TestDomain) -> Vec<Vec<String>> {
    dom.images
        .iter()
        .map(|p| {
            qemu::info_bitmaps(&qemu::info(p))
                .into_iter()
                .map(|b| b.0)
                .collect()
        })
        .collect()
}

#[test]
fn prune_dry_run_apply_and_refusals_on_qemu() {
    let conn = support::system();
    let dom = TestDomain::define(&conn, "cli-prune", 2);
    let mut s = Snap::new("prune_on_qemu");
    s.redact(&dom.name, "[DOMAIN]");
    for (i, p) in dom.images.iter().enumerate() {
        s.redact(&p.display().to_string(), &format!("[IMAGE-{i}]"));
    }
    let c = chain(&dom, 5);
    for cp in &c.checkpoints {
        dom.add_bitmap_everywhere(&cp.id);
    }
    let file = s.write("chain.json", serde_json::to_string_pretty(&c).unwrap());
    let r = s.run(&["sync", "--chain", file.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let all: Vec<String> = (0..5).map(ckpt_id).collect();

    // Refusals: exit 2 (bad input) or 4 (no such domain), nothing changed.
    let r = s.run(&["prune", "--domain", &dom.name, "--keep", "0", "--apply"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    let r = s.run(&[
        "prune",
        "--domain",
        &dom.name,
        "--older-than",
        "7x",
        "--apply",
    ]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    let r = s.run(&[
        "prune",
        "--domain",
        &dom.name,
        "--keep",
        "2",
        "--older-than",
        "7d",
    ]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    let r = s.run(&[
        "prune",
        "--domain",
        "ckptstore-no-such-domain",
        "--keep",
        "2",
        "--apply",
    ]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    {
        let _held = testkit::qemu::ImageHolder::hold(&dom.images[1]);
        let r = s.run(&[
            "prune", "--domain", &dom.name, "--keep", "2", "--apply", "--json",
        ]);
        assert_eq!(r.code, 2, "{}", r.stderr);
        assert_eq!(r.json()["error"]["kind"], "bad_input");
    }
    assert_eq!(names(&dom), all);
    assert!(image_bitmaps(&dom).iter().all(|b| *b == all));

    // The dry run says what would go and changes nothing.
    let r = s.run(&["prune", "--domain", &dom.name, "--keep", "2"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = s.run(&["prune", "--domain", &dom.name, "--keep", "2", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()["applied"], false);
    assert_eq!(r.json()["bitmaps_removed"].as_array().unwrap().len(), 6);
    assert_eq!(names(&dom), all);
    assert!(image_bitmaps(&dom).iter().all(|b| *b == all));

    let r = s.run(&[
        "prune", "--domain", &dom.name, "--keep", "2", "--apply", "--json",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()["libvirt_calls"], 3);
    assert_eq!(names(&dom), all[3..]);
    assert!(image_bitmaps(&dom).iter().all(|b| *b == all[3..]));
    let r = s.run(&["prune", "--domain", &dom.name, "--keep", "1", "--apply"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(names(&dom), all[4..]);
    let r = s.run(&["validate", "--domain", &dom.name]);
    assert_eq!(r.code, 0, "{}", r.stdout);
    s.check();
}
