//! `ckptstore ensure` as a real binary on `qemu:///system`: a shut-off
//! domain whose checkpoints libvirt forgot and one of whose disks lost the
//! base's bitmap (real qcow2 images, real bitmaps). Snapshots of the JSON
//! and human output; the exit codes of a missing checkpoint and a missing
//! domain.

use crate::snap::Snap;
use testkit::support::{self, TestDomain, SYSTEM_URI};

use chrono::DateTime;
use ckptstore::{Backend, Chain, Checkpoint, LibvirtBackend};
use uuid::Uuid;

fn id(base: u128, i: usize) -> String {
    Uuid::from_u128(base + i as u128).to_string()
}

/// c0 ← c1 ← c2 of `domain` over vda and vdb.
fn chain(domain: &str) -> Chain {
    Chain {
        scope: None,
        vm_id: Uuid::parse_str("93a5c045-6457-2c09-e56c-927cdf34e178").unwrap(),
        domain: Some(domain.to_string()),
        disks: [
            (id(0xd15c_0000, 0), "vda".to_string()),
            (id(0xd15c_0000, 1), "vdb".to_string()),
        ]
        .into(),
        checkpoints: (0..3)
            .map(|i| Checkpoint {
                id: id(0xc4e0_0000, i),
                parent: i.checked_sub(1).map(|p| id(0xc4e0_0000, p)),
                created: DateTime::from_timestamp(1_700_000_000 + i as i64 * 3600, 0).unwrap(),
                description: Some(format!("backup {i}")),
                disks: vec![id(0xd15c_0000, 0), id(0xd15c_0000, 1)],
            })
            .collect(),
    }
}

#[test]
fn ensure_reports_each_disks_mode_on_qemu() {
    // (The snapshot runs default to `--bitmaps ignore`; the runs that
    // check bitmaps say `degrade`.)
    let conn = support::system();
    let dom = TestDomain::define(&conn, "cli-ensure", 2);
    let mut s = Snap::new("ensure_on_qemu");
    s.redact(&dom.name, "[DOMAIN]");
    let c = chain(&dom.name);
    for cp in &c.checkpoints {
        dom.add_bitmap_everywhere(&cp.id);
    }
    let file = s.write("chain.json", serde_json::to_string_pretty(&c).unwrap());
    let file = file.display().to_string();
    let r = s.run(&["sync", "--chain", &file]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    // libvirt forgets every checkpoint (metadata only); vdb loses c2's
    // bitmap.
    let lv = LibvirtBackend::connect(SYSTEM_URI).unwrap();
    for cp in c.checkpoints.iter().rev() {
        lv.delete(&dom.name, &cp.id).unwrap();
    }
    let base = &c.checkpoints[2].id;
    let out = std::process::Command::new("qemu-img")
        .args(["bitmap", "--remove"])
        .arg(&dom.images[1])
        .arg(base)
        .output()
        .unwrap();
    assert!(out.status.success());

    let r = s.run(&[
        "ensure",
        "--domain",
        &dom.name,
        "--checkpoint",
        base,
        "--bitmaps",
        "degrade",
        "--json",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let doc = r.json();
    assert_eq!(doc["disks"][0]["mode"], "incremental");
    assert_eq!(doc["disks"][1]["mode"], "full");
    assert_eq!(
        doc["disks"][1]["disk"],
        c.disks.keys().nth(1).unwrap().as_str()
    );
    assert_eq!(
        (doc["redefined"].as_bool(), doc["libvirt_calls"].as_u64()),
        (Some(true), Some(1))
    );
    let held = lv.list(&dom.name).unwrap();
    assert_eq!(held.len(), 1);
    assert_eq!(
        (
            held[0].parent.as_deref(),
            held[0].disks.keys().map(String::as_str).collect::<Vec<_>>()
        ),
        (None, vec!["vda"])
    );
    // Again, human: the same modes, no call.
    let r = s.run(&[
        "ensure",
        "--domain",
        &dom.name,
        "--checkpoint",
        base,
        "--bitmaps",
        "degrade",
    ]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stdout.contains("already usable") && r.stdout.contains("0 libvirt calls"),
        "{}",
        r.stdout
    );
    assert_eq!(lv.list(&dom.name).unwrap(), held);

    // A checkpoint the committed chain lacks: exit 2, nothing changed.
    let r = s.run(&["ensure", "--domain", &dom.name, "--checkpoint", "nope"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    // A domain libvirt lacks (its chain given): exit 4.
    let mut gone = chain("ckptstore-no-such-domain");
    gone.domain = Some("ckptstore-no-such-domain".into());
    let gone_file = s.write("gone.json", serde_json::to_string_pretty(&gone).unwrap());
    let r = s.run(&[
        "ensure",
        "--domain",
        "ckptstore-no-such-domain",
        "--checkpoint",
        base,
        "--chain",
        &gone_file.display().to_string(),
    ]);
    assert_eq!(r.code, 4, "{}", r.stderr);
    // A domain with no committed chain and no chain file: exit 2.
    let r = s.run(&[
        "ensure",
        "--domain",
        "ckptstore-no-such-domain",
        "--checkpoint",
        base,
    ]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert_eq!(lv.list(&dom.name).unwrap(), held);
    s.check();
}
